"""DDP on CPU (Gloo) through torchrun: 2 processes vs 1 process with the same global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from poincare_resnet.training.checkpoint import load_checkpoint

COMMON = [
    "train",
    "--model",
    "poincare_resnet20",
    "--dataset",
    "digits",
    "--epochs",
    "2",
    "--limit-train",
    "64",
    "--batch-size",
    "32",
    "--no-augment",
    "--no-progress",
    "--threads",
    "1",
    "--optimizer",  # SGD, not Adam: Adam normalises near-zero gradients, which turns the
    "sgd",  # rounding differences of 2-process reductions into whole learning-rate steps
    "--lr",
    "0.05",
    "--seed",
    "3",
]


def _run(args: list[str], cwd: Path, nproc: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc > 1:
        torchrun = shutil.which("torchrun")
        launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
        cmd = [
            *launcher,
            "--nproc-per-node",
            str(nproc),
            "--master-port",
            "29533",
            "-m",
            "poincare_resnet",
            *args,
        ]
    else:
        cmd = [sys.executable, "-m", "poincare_resnet", *args]
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    (root / "single").mkdir()
    (root / "multi").mkdir()
    _run([*COMMON, "--out", "run"], root / "single", 1)
    _run([*COMMON, "--out", "run", "--sync-bn"], root / "multi", 2)
    return root / "single" / "run", root / "multi" / "run"


def test_ranks_hold_identical_weights(runs):
    summary = json.loads((runs[1] / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert summary["ranks_in_sync"] is True


def test_sync_bn_matches_single_process_with_same_global_batch(runs):
    single, multi = runs
    rows_1 = [json.loads(line) for line in (single / "metrics.jsonl").read_text().splitlines()]
    rows_2 = [json.loads(line) for line in (multi / "metrics.jsonl").read_text().splitlines()]
    assert len(rows_1) == len(rows_2) == 2
    # float32 reductions run in another order over 2 processes: relative tolerance 1e-4
    for a, b in zip(rows_1, rows_2, strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=1e-4)
    w1 = load_checkpoint(single / "last.safetensors").model_state
    w2 = load_checkpoint(multi / "last.safetensors").model_state
    # only reduction order differs: float32 rounding, tolerance 1e-5
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)


def test_only_rank0_wrote_files(runs):
    multi = runs[1]
    assert sorted(p.name for p in multi.parent.iterdir()) == ["run"]
    names = sorted(p.name for p in multi.iterdir())
    assert names == sorted(
        [
            "best.json",
            "best.safetensors",
            "checkpoints",
            "config.json",
            "last.json",
            "last.safetensors",
            "metrics.jsonl",
            "report.md",
            "summary.json",
            "training_curves.png",
        ]
    )
    ckpts = sorted(p.name for p in (multi / "checkpoints").iterdir())
    assert all(n.startswith("ckpt-") for n in ckpts) and len(ckpts) <= 2 * 3
