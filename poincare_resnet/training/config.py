"""The options of a training run: :class:`TrainConfig`, its validation, and the device it names."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch

from ..models.registry import check_model_kwargs

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "step", "none")
PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
NAN_POLICIES = ("stop", "skip")
LOGGERS = ("jsonl", "tensorboard")
#: ``--no-decay``: which parameters weight decay spares
#: (:func:`~poincare_resnet.training.optim.no_decay_parameter_names`). ``"standard"``:
#: curvatures, norm weights and biases; ``"curvature"``: curvatures only; ``"none"``: nothing,
#: every parameter decays (the runs before the option).
NO_DECAY = ("standard", "curvature", "none")
#: options added after runs were recorded, with the value a run's ``config.json`` without the
#: key implies (what that run did), so that a resumed old run keeps its behaviour
ABSENT_RUN_OPTIONS: dict[str, Any] = {"no_decay": "none"}
# options that say how this process runs, not what the run is: taken from the caller on --resume
RUNTIME_OPTIONS = ("max_steps", "progress", "threads", "log_every", "eval_batch_size", "workers")


@dataclass
class TrainConfig:
    """Every option of a training run (the CLI's ``train`` flags map one-to-one)."""

    model: str = "poincare_resnet20"
    dataset: str = "digits"
    data_dir: str | None = None
    image_size: int | None = None  # on-disk datasets: default 64 (Tiny-ImageNet) or 224
    workers: int | None = None  # on-disk datasets: decoding processes (None: min(2, cores))
    epochs: int = 40
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 5e-3
    momentum: float = 0.9
    weight_decay: float = 1e-4
    no_decay: str = "standard"
    schedule: str = "cosine"
    step_size: int = 30
    gamma: float = 0.1
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    grad_clip: float = 0.0
    seed: int = 0
    device: str = "auto"
    dtype: str = "float32"
    precision: str = "fp32"
    compile: bool = False
    val_fraction: float = 0.1
    augment: bool = True
    limit_train: int | None = None
    out: str | None = None
    overwrite: bool = False
    ckpt_every_steps: int = 0
    keep_checkpoints: int = 3
    log_every: int = 20
    log: str = "jsonl"
    nan_policy: str = "stop"
    sync_bn: bool = False
    deterministic: bool = False
    threads: int | None = None
    eval_batch_size: int = 512
    progress: bool = True
    max_steps: int | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the first impossible option."""
        self._check_types()
        checks = [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}"),
            (math.isfinite(self.lr) and self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (0 <= self.momentum < 1, f"--momentum must be in [0, 1), got {self.momentum}"),
            (self.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {self.warmup_epochs}"),
            (
                0 < self.val_fraction < 1,
                f"--val-fraction must be in (0, 1), got {self.val_fraction}",
            ),
            (self.optimizer in OPTIMIZERS, f"--optimizer must be one of {OPTIMIZERS}"),
            (self.no_decay in NO_DECAY, f"--no-decay must be one of {NO_DECAY}"),
            (self.schedule in SCHEDULES, f"--schedule must be one of {SCHEDULES}"),
            (self.precision in PRECISIONS, f"--precision must be one of {PRECISIONS}"),
            (self.dtype in DTYPES, f"--dtype must be one of {tuple(DTYPES)}"),
            (self.nan_policy in NAN_POLICIES, f"--nan-policy must be one of {NAN_POLICIES}"),
            (self.ckpt_every_steps >= 0, "--ckpt-every-steps must be >= 0"),
            (self.keep_checkpoints >= 1, "--keep-checkpoints must be >= 1"),
            (self.log_every >= 1, "--log-every must be >= 1"),
            (self.log in LOGGERS, f"--log must be one of {LOGGERS}"),
            (self.limit_train is None or self.limit_train >= 1, "--limit-train must be >= 1"),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps must be >= 1"),
            (0 <= self.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
            (self.grad_clip >= 0, "--grad-clip must be >= 0"),
            (self.step_size >= 1, f"--step-size must be >= 1, got {self.step_size}"),
            (
                math.isfinite(self.gamma) and self.gamma > 0,
                f"--gamma must be finite and > 0, got {self.gamma}",
            ),
            (0 <= self.seed < 2**63, f"--seed must be in [0, 2**63), got {self.seed}"),
            (self.threads is None or self.threads >= 1, "--threads must be >= 1"),
            (self.eval_batch_size >= 1, "--eval-batch-size must be >= 1"),
            (self.workers is None or self.workers >= 0, "--workers must be >= 0"),
            (self.image_size is None or self.image_size >= 1, "--image-size must be >= 1"),
            (self.out is None or str(self.out).strip() != "", "--out must not be empty"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        for name in ("weight_decay", "warmup_epochs", "grad_clip"):  # inf passes the checks
            value = getattr(self, name)
            if not math.isfinite(value):
                raise ValueError(f"--{name.replace('_', '-')} must be finite, got {value}")
        if self.precision != "fp32" and self.dtype != "float32":
            raise ValueError("--precision bf16/fp16 needs --dtype float32")
        check_model_kwargs(self.model, self.model_kwargs)
        resolve_device(self.device)

    def _check_types(self) -> None:
        """Raise ``ValueError`` for an option of the wrong type (e.g. from an edited
        ``config.json``): each must match its annotation (``int`` also passes as ``float``)."""
        kinds = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,)}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            names = [t.strip() for t in str(f.type).split("|")]
            if value is None and "None" in names:
                continue
            if names[0].startswith("dict"):
                ok = isinstance(value, dict) and all(isinstance(k, str) for k in value)
            else:
                allowed = kinds[names[0]]
                ok = isinstance(value, allowed) and (bool in allowed or not isinstance(value, bool))
            if not ok:
                raise ValueError(
                    f"--{f.name.replace('_', '-')} must be of type {f.type}, got {value!r}"
                )


def resolve_device(name: str) -> torch.device:
    """The device ``--device`` names: ``auto`` → the local CUDA device if there is one, else
    the CPU.

    Parameters
    ----------
    name : str
        ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.

    Returns
    -------
    torch.device
        The device; ``ValueError`` names the problem when it is not one of these or CUDA is
        missing.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"--device {name!r} is not a device (auto, cpu, cuda, cuda:N)") from exc
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: only auto, cpu, cuda and cuda:N are supported")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return device
