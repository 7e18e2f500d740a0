"""Shared helpers of the tests that run the command line in a child interpreter."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]


def cli_env() -> dict[str, str]:
    """This process's environment with the checkout on ``PYTHONPATH`` and one OpenMP thread."""
    paths = [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1"}


def launch_train(args: list[str]) -> subprocess.Popen:
    """``python -m poincare_resnet train *args`` in the background (text pipes)."""
    return subprocess.Popen(
        [sys.executable, "-m", "poincare_resnet", "train", *args],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def ckpt_steps(run: Path) -> list[int]:
    """The steps of the step checkpoints in ``run/checkpoints``, ascending."""
    d = run / "checkpoints"
    if not d.is_dir():
        return []
    return sorted(
        int(m.group(1))
        for p in d.iterdir()
        if (m := re.fullmatch(r"ckpt-(\d+)\.safetensors", p.name))
    )


def sigkill_when(
    proc: subprocess.Popen,
    ready: Callable[[], bool],
    *,
    timeout: float,
    poll: float,
    delay: Callable[[], float] | None = None,
) -> None:
    """SIGKILL ``proc`` once ``ready()`` holds (after ``delay()`` seconds), polling every
    ``poll`` s for at most ``timeout`` s; then wait for it, killing it if it still runs."""
    try:
        deadline = time.monotonic() + timeout
        while proc.poll() is None and time.monotonic() < deadline:
            if ready():
                if delay is not None:
                    time.sleep(delay())
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(poll)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def one_epoch_digits(**overrides: Any) -> dict[str, Any]:
    """:class:`~poincare_resnet.training.TrainConfig` options of a quiet 1-epoch run on the
    digits in batches of 32 through a depth-8 ResNet, updated with ``overrides``."""
    base = dict(dataset="digits", batch_size=32, epochs=1, progress=False)
    return {**base, "model_kwargs": {"depth": 8}, **overrides}


def autocast_adam_steps(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    steps: int,
    device_type: str,
    dtype: torch.dtype = torch.bfloat16,
) -> list[torch.Tensor]:
    """``steps`` Adam (lr 1e-3) steps of ``model`` on one batch under ``torch.autocast``; the
    (detached, float32) cross-entropy losses."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(steps):
        with torch.autocast(device_type, dtype=dtype):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses
