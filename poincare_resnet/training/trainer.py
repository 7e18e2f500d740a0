"""The training loop: one function, :func:`train`, driven by a :class:`TrainConfig`.

A run directory holds ``config.json`` (resolved), ``metrics.jsonl`` (one line per epoch),
``checkpoints/`` (rotating, atomic resume checkpoints: model, optimizer, scheduler, RNG and
data-order position), ``best.safetensors`` / ``last.safetensors`` (weights + JSON metadata),
``training_curves.png``, ``summary.json`` and ``report.md``. Only rank 0 writes; under
``torchrun`` rank 0 names the run directory and broadcasts the name.

``config.json`` carries the marker ``"tool": "poincare-resnet"`` and a ``format_version``;
``--overwrite`` replaces only such a directory, deleting only the files this tool writes there,
and refuses (before deleting anything) a directory that holds anything else.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import random
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import __version__
from ..data import DatasetSplits, load_dataset, make_loader
from ..models import create_model
from ..models.registry import build_from_config, check_model_kwargs
from .checkpoint import (
    CheckpointManager,
    atomic_output,
    atomic_write_text,
    capture_rng_state,
    load_model_state,
    restore_rng_state,
    save_checkpoint,
)
from .distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    broadcast_object,
    cleanup_distributed,
    init_distributed,
)

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "step", "none")
PRECISIONS = ("fp32", "bf16", "fp16")
# fp16: a gradient overflow at a loss scale <= this is a NaN event, not the scaler's business
MIN_LOSS_SCALE = 1.0
DTYPES = {"float32": torch.float32, "float64": torch.float64}
NAN_POLICIES = ("stop", "skip")
LOGGERS = ("jsonl", "tensorboard")
# options that say how this process runs, not what the run is: taken from the caller on --resume
RUNTIME_OPTIONS = ("max_steps", "progress", "threads", "log_every", "eval_batch_size", "workers")
# config.json's marker: a directory is a run of this tool (and --overwrite may replace it) only
# when its config.json says so. Format 2: the marker and the resolved ``model_config``.
TOOL = "poincare-resnet"
RUN_FORMAT_VERSION = 2
# what a run directory of this tool holds: files at its top, and per subdirectory a pattern
_RUN_FILES = frozenset(
    {
        "config.json",
        "metrics.jsonl",
        "summary.json",
        "report.md",
        "training_curves.png",
        "best.safetensors",
        "best.json",
        "last.safetensors",
        "last.json",
    }
)
_RUN_SUBDIRS = {
    "checkpoints": re.compile(r"ckpt-\d+\.(safetensors|json)"),
    "ood": re.compile(r"ood\.(csv|md)|(roc|hist)_\w+\.png"),
    "attack": re.compile(r"attack\.(csv|md)|accuracy_vs_eps\.png"),
    "explain": re.compile(r"explanations\.(csv|md|png)"),
}
# a temporary file of checkpoint.atomic_stem left by a crash: .<stem>.<16 hex>.tmp<suffix>
_TMP_FILE = re.compile(r"\.(?P<stem>.+)\.[0-9a-f]{16}\.tmp(?P<suffix>\.\w+)?")


class NonFiniteError(RuntimeError):
    """Training produced a NaN/Inf loss or gradient and the policy is ``stop``."""


class RunDirError(ValueError):
    """The output directory cannot be used (holds another run, or no run to resume)."""


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


# ------------------------------------------------------------------------------ helpers


def resolve_device(name: str) -> torch.device:
    """``auto`` → the local CUDA device when there is one, else the CPU."""
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


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - user code may use the global state
    torch.manual_seed(seed)


def versions() -> dict[str, str]:
    return {
        "poincare_resnet": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer ``cfg`` names, PyTorch's fused implementation where the device has one.

    A fused optimizer updates every parameter in one kernel and takes the decision to skip a
    step (fp16 gradient overflow, a NaN event) as a device tensor (``found_inf``), so that
    deciding costs no host sync; its step counter lives on the device too.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    fused = True if _fused_available(params) else None
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            nesterov=cfg.momentum > 0,
            fused=fused,
        )
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


def lr_factor(step: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    """Per-step learning-rate factor: linear warm-up, then cosine / step / constant."""
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "cosine":
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if cfg.schedule == "step":
        return cfg.gamma ** ((step // steps_per_epoch) // max(1, cfg.step_size))
    return 1.0


def autocast_context(precision: str, device: torch.device):
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


@torch.no_grad()
def evaluate_split(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    return_logits: bool = False,
) -> dict[str, Any]:
    """Loss, top-1 and top-5 accuracy (fractions) of ``model`` in eval mode."""
    device = torch.device(device)
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    loss_sum, logits_all = 0.0, []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].to(device, dtype)
        with autocast_context(precision, device):
            logits = model(xb).float()
        loss_sum += float(
            F.cross_entropy(logits, y[i : i + batch_size].to(device), reduction="sum")
        )
        logits_all.append(logits.cpu())
    model.train(was_training)
    logits = torch.cat(logits_all)
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hit = top.eq(y.view(-1, 1))
    out: dict[str, Any] = {
        "loss": loss_sum / len(x),
        "top1": float(hit[:, :1].any(1).float().mean()),
        "top5": float(hit.any(1).float().mean()),
    }
    if return_logits:
        out["logits"] = logits
    return out


def _default_out(cfg: TrainConfig) -> str:
    return str(Path("runs") / f"{cfg.model}-{cfg.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")


def _is_tool_file(name: str, known) -> bool:
    """``name`` is a file this tool writes (``known(name)``) or an atomic write's leftover."""
    if known(name):
        return True
    m = _TMP_FILE.fullmatch(name)
    return bool(m) and known(m["stem"] + (m["suffix"] or ""))


def _foreign_entries(run: Path) -> list[str]:
    """Entries of run directory ``run`` that this tool does not write there (links count)."""
    foreign = []
    for entry in sorted(run.iterdir()):
        if entry.is_symlink():
            foreign.append(entry.name)
        elif entry.is_dir():
            pattern = _RUN_SUBDIRS.get(entry.name)
            if pattern is None:
                foreign.append(entry.name + "/")
                continue
            foreign += [
                f"{entry.name}/{sub.name}"
                for sub in sorted(entry.iterdir())
                if sub.is_symlink()
                or not sub.is_file()
                or not _is_tool_file(sub.name, pattern.fullmatch)
            ]
        elif not entry.is_file() or not _is_tool_file(entry.name, _RUN_FILES.__contains__):
            foreign.append(entry.name)
    return foreign


def _not_a_run(run: Path) -> str | None:
    """Why ``run`` is not a run directory written by this tool (``None`` if it is)."""
    config = run / "config.json"
    if config.is_symlink() or not config.is_file():
        return "it holds no config.json written by poincare-resnet"
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        return f"its config.json is unreadable ({exc})"
    if not isinstance(data, dict) or data.get("tool") != TOOL:
        return (
            f'its config.json has no "tool": "{TOOL}" marker (not written by this tool, '
            "or by a version before the marker)"
        )
    return None


def check_replaceable(run: Path) -> None:
    """Raise :class:`RunDirError` unless ``--overwrite`` may replace directory ``run``: its
    ``config.json`` carries this tool's marker and it holds nothing this tool did not write."""
    why = _not_a_run(run)
    if why is None:
        foreign = _foreign_entries(run)
        if foreign:
            shown = ", ".join(foreign[:5]) + (
                f" and {len(foreign) - 5} more" if foreign[5:] else ""
            )
            why = f"it holds files poincare-resnet did not write ({shown})"
    if why is not None:
        raise RunDirError(
            f"refusing to --overwrite {run}: {why}; nothing was deleted. Remove it yourself or "
            "choose another --out"
        )


def remove_run_files(run: Path) -> None:
    """Delete the files this tool wrote in run directory ``run`` (after :func:`check_replaceable`
    passes again), then its subdirectories that are left empty; ``run`` itself is kept."""
    check_replaceable(run)
    for entry in sorted(run.iterdir()):
        if entry.is_dir():
            for sub in sorted(entry.iterdir()):
                sub.unlink()
            entry.rmdir()
        else:
            entry.unlink()


def prepare_run_dir(cfg: TrainConfig, resume: str | None) -> Path:
    """Create (or check) the run directory without touching another run's files."""
    if resume:
        run = Path(resume)
        if not (run / "config.json").is_file():
            raise RunDirError(f"--resume {run}: no config.json there; not a poincare-resnet run")
        return run
    run = Path(cfg.out or _default_out(cfg))
    if run.exists() and not run.is_dir():
        raise RunDirError(f"output directory {run} exists and is not a directory")
    if run.exists() and any(run.iterdir()):
        if not cfg.overwrite:
            raise RunDirError(
                f"output directory {run} already holds files (another run?); pass --resume {run} "
                f"to continue it, --overwrite to replace it, or choose another --out"
            )
        check_replaceable(run)
    check_output_dir(run)
    return run


def check_output_dir(path: str | os.PathLike[str], what: str = "output directory") -> None:
    """Raise :class:`RunDirError` unless directory ``path`` exists or can be created: no
    component is a file and the nearest existing directory is writable. Creates nothing."""
    path = Path(path)
    if path.exists():
        if not path.is_dir():
            raise RunDirError(f"{what} {path} exists and is not a directory")
        existing = path
    else:
        existing = next((p for p in path.parents if p.exists()), Path("."))
        if not existing.is_dir():
            raise RunDirError(f"cannot create {what} {path}: {existing} is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(f"cannot write {what} {path}: {existing} is not writable")


def _start_run_dir(run: Path, cfg: TrainConfig, model: nn.Module) -> None:
    """Rank 0, new run: replace the old run (``--overwrite``), create ``run``, write
    ``config.json`` (the options, this tool's marker and the resolved model config)."""
    if cfg.overwrite and run.is_dir():
        remove_run_files(run)
    run.mkdir(parents=True, exist_ok=True)
    config = {
        "tool": TOOL,
        "format_version": RUN_FORMAT_VERSION,
        **dataclasses.asdict(cfg),
        "model_name": model.model_name,
        "model_config": model.model_config,
    }
    atomic_write_text(run / "config.json", json.dumps(config, indent=2))


def _build_model(cfg: TrainConfig, data: DatasetSplits, run: Path | None) -> nn.Module:
    """The run's network: on resume (``run`` given) exactly the one its ``config.json``
    describes, if it holds a resolved ``model_config``; else from the registry."""
    if run is not None:
        stored = json.loads((run / "config.json").read_text())
        if isinstance(stored.get("model_config"), dict) and stored.get("model_name"):
            return build_from_config(stored["model_name"], stored["model_config"])
    return create_model(
        cfg.model, num_classes=data.num_classes, in_chans=data.in_chans, **cfg.model_kwargs
    )


def load_run_config(run: Path) -> TrainConfig:
    """The options stored in ``run/config.json``; :class:`RunDirError` if it is unreadable."""
    try:
        data = json.loads((run / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{run / 'config.json'} is unreadable ({exc})") from exc
    if not isinstance(data, dict):
        raise RunDirError(f"{run / 'config.json'} does not hold a JSON object")
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in data.items() if k in known})


def _sums_to_float(t: Tensor) -> list[float]:
    return [float(v) for v in t.detach().double().cpu()]


# ------------------------------------------------------------------------------ one step


def make_grad_scaler(cfg: TrainConfig, device: torch.device) -> torch.amp.GradScaler:
    """A ``torch.amp.GradScaler`` for ``--precision fp16`` (CUDA or CPU), disabled otherwise.

    The loss is multiplied by the scale :math:`s` before the backward pass, so float16 gradients
    of small magnitude do not flush to zero; gradients are divided by :math:`s` again
    (``unscale_``) before clipping and the update. A step whose gradients overflow is skipped and
    :math:`s \\leftarrow s/2`; after 2000 steps in a row without overflow :math:`s \\leftarrow 2s`.
    bf16 has float32's exponent range and needs no scaler.
    """
    return torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")


@dataclass
class StepState:
    """What :func:`train_step` reads and updates; every tensor lives on the training device.

    ``bad`` says whether any step since the last check was a NaN event (read only every
    ``--log-every`` steps, before checkpoints and at epoch ends); ``sums`` accumulates
    ``[Σ loss·n, Σ correct, Σ n]`` over the steps that were not NaN events; ``scaler_skips``
    counts the fp16 steps the scaler skipped for overflowing gradients.
    """

    cfg: TrainConfig
    model: nn.Module
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    params: list[nn.Parameter]
    info: DistInfo
    bad: Tensor
    sums: Tensor
    scaler_skips: Tensor

    @classmethod
    def create(cls, cfg, model, train_model, optimizer, scaler, device, info) -> StepState:
        """Fresh flags and sums on ``device`` (the sums are set per epoch by the loop)."""
        return cls(
            cfg=cfg,
            model=model,
            train_model=train_model,
            optimizer=optimizer,
            scaler=scaler,
            params=[p for p in model.parameters() if p.requires_grad],
            info=info,
            bad=torch.zeros((), dtype=torch.bool, device=device),
            sums=torch.zeros(3, dtype=torch.float64, device=device),
            scaler_skips=torch.zeros((), dtype=torch.int64, device=device),
        )


def _grad_norm(st: StepState) -> Tensor:
    """Global gradient 2-norm :math:`\\lVert g \\rVert_2` (clipped to ``--grad-clip`` if set)."""
    if st.cfg.grad_clip > 0:
        return nn.utils.clip_grad_norm_(st.params, st.cfg.grad_clip)
    grads = [p.grad for p in st.params if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def _fused_available(params: list[nn.Parameter]) -> bool:
    """Whether PyTorch has fused optimizer kernels for these parameters' device and dtype."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return bool(params) and all(
        p.device.type in _get_fused_kernels_supported_devices() and p.is_floating_point()
        for p in params
    )


def _optimizer_step(st: StepState, skip: Tensor) -> None:
    """Update unless ``skip`` (a device flag): the fused optimizers read it as ``found_inf``."""
    opt: Any = st.optimizer
    if not opt.defaults.get("fused"):
        # no fused kernels for this device: deciding needs the flag on the host (one sync)
        if st.scaler.is_enabled() or st.cfg.nan_policy == "skip":
            if bool(skip):
                return
        opt.step()
        return
    opt.grad_scale, opt.found_inf = None, skip.to(torch.float32)  # grads are already unscaled
    try:
        opt.step()
    finally:
        del opt.grad_scale, opt.found_inf


def train_step(st: StepState, xb: Tensor, yb: Tensor) -> Tensor:
    """One optimisation step without a host↔device synchronisation; returns the NaN-event flag.

    A NaN event is a non-finite loss, or (without a grad scaler) a non-finite gradient norm;
    under fp16 a gradient overflow with a finite loss is the scaler's business: the update is
    skipped and the scale halved, and it counts in ``scaler_skips``, not as a NaN event, unless
    the scale was already <= ``MIN_LOSS_SCALE`` (1): then the gradients are non-finite even
    unscaled, and it is a NaN event. The update of a step with a non-finite loss or gradient is
    skipped on the device (the fused optimizer's ``found_inf``); under ``--nan-policy skip`` a
    NaN event also restores the batch norm running statistics. The sums leave NaN events out.
    The flag is a 0-dim device tensor.
    """
    cfg = st.cfg
    skip_policy = cfg.nan_policy == "skip"
    if skip_policy:  # a skipped step must not touch the BN statistics
        saved = [b.clone() for b in st.model.buffers()]
    with autocast_context(cfg.precision, xb.device):
        logits = st.train_model(xb).float()
    loss = F.cross_entropy(logits, yb, label_smoothing=cfg.label_smoothing)
    st.optimizer.zero_grad(set_to_none=True)
    st.scaler.scale(loss).backward()
    st.scaler.unscale_(st.optimizer)  # clipping and the norm see the true gradients
    grad_bad = ~torch.isfinite(_grad_norm(st))  # DDP has averaged the gradients: same on all
    loss_bad = ~torch.isfinite(loss.detach())
    if st.info.enabled:  # every rank must take the same skip decision
        loss_bad = all_reduce_sum(loss_bad.to(torch.int32), st.info) > 0
    if st.scaler.is_enabled():
        # at a scale s <= 1 an overflow means |true gradient| >= 65504 / s, or a NaN: no longer
        # the scaler's business (a NaN gradient at s = 2^16 becomes an event after 16 halvings)
        hopeless = grad_bad & (st.scaler._get_scale_async() <= MIN_LOSS_SCALE)
        event = loss_bad | hopeless
        st.scaler_skips += grad_bad & ~event
    else:
        event = loss_bad | grad_bad
    _optimizer_step(st, loss_bad | grad_bad)
    st.scaler.update()
    if skip_policy:
        with torch.no_grad():
            for b, old in zip(st.model.buffers(), saved, strict=True):
                b.copy_(torch.where(event, old, b))
    else:
        st.bad |= event
    n = yb.shape[0]
    count = st.sums.new_full((), n)  # a fill kernel, not a host-to-device copy
    counts = torch.stack(
        [loss.detach().double() * n, (logits.argmax(1) == yb).sum().double(), count]
    )
    st.sums += counts.masked_fill(event, 0.0)
    return event


class LateFlags:
    """Per-step device flags read on the host ``lag`` steps after their step was queued.

    On CUDA each flag is copied into pinned host memory with ``non_blocking=True`` and an event
    is recorded; reading it waits for that event only, ``lag`` steps later, while the newer steps
    keep the GPU busy (no pipeline drain). On the CPU there is no device to wait for: lag 0.
    """

    def __init__(self, device: torch.device, lag: int | None = None) -> None:
        self.cuda = device.type == "cuda"
        self.lag = (1 if self.cuda else 0) if lag is None else lag
        self._pending: list[tuple[int, Tensor, Any]] = []

    def push(self, step: int, flag: Tensor) -> None:
        """Queue the flag of ``step`` (a 0-dim bool tensor on the device)."""
        event = None
        if self.cuda:
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            flag = host
        self._pending.append((step, flag, event))

    def pop_set(self, flush: bool = False) -> list[int]:
        """Steps whose flag was set, among those at least ``lag`` steps old (all if ``flush``)."""
        cut = len(self._pending) - (0 if flush else self.lag)
        ready, self._pending = self._pending[: max(cut, 0)], self._pending[max(cut, 0) :]
        out = []
        for step, flag, event in ready:
            if event is not None:
                event.synchronize()
            if bool(flag):
                out.append(step)
        return out


# ------------------------------------------------------------------------------ train


def train(cfg: TrainConfig, resume: str | None = None, log=print) -> dict[str, Any]:
    """Train a model as ``cfg`` says (or continue the run in directory ``resume``).

    Returns the summary (also written to ``summary.json``). Raises :class:`NonFiniteError` when a
    loss or gradient becomes NaN/Inf under ``nan_policy="stop"``; the last good checkpoint is
    left untouched.
    """
    if resume:
        run = prepare_run_dir(cfg, resume)
        stored = load_run_config(run)
        # the run's recipe comes from its config.json; how this process runs it from `cfg`
        for name in RUNTIME_OPTIONS:
            setattr(stored, name, getattr(cfg, name))
        cfg = stored
        cfg.validate()
    else:
        cfg.validate()
        run = prepare_run_dir(cfg, None)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    device = resolve_device(cfg.device)
    info = init_distributed(device)
    if info.enabled and device.type == "cuda":
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    try:
        # one directory per run: rank 0's name (a default --out holds a timestamp) for all
        run = Path(broadcast_object(str(run), info))
        return _train(cfg, run, resume is not None, device, info, log)
    finally:
        cleanup_distributed()


def _prepare_native_kernels(device: torch.device, log) -> None:
    """Build (first run) or load the native CPU kernels before the first step, saying so."""
    from .. import _cpp

    if device.type != "cpu" or not _cpp.native_enabled():
        return
    names = _cpp.available_kernels()
    if all(_cpp.kernel_loaded(n) for n in names):
        return
    start = time.perf_counter()
    built = _cpp.build_all()  # compiled on first use (~1 min), then loaded from the cache
    ready = [n for n, ok in built.items() if ok]
    seconds = time.perf_counter() - start
    if seconds > 2 or len(ready) < len(names):
        log(
            f"native CPU kernels: {', '.join(ready) if ready else 'none, using PyTorch'} "
            f"(built in {seconds:.0f} s, cached for later runs)"
        )


def _train(
    cfg: TrainConfig, run: Path, resuming: bool, device: torch.device, info: DistInfo, log
) -> dict[str, Any]:
    main = info.is_main
    dtype = DTYPES[cfg.dtype]
    data = load_dataset(
        cfg.dataset, cfg.data_dir, cfg.val_fraction, cfg.seed, cfg.limit_train, cfg.image_size
    )
    _check_finite_inputs(data)
    seed_everything(cfg.seed)
    model = _build_model(cfg, data, run if resuming else None).to(device=device, dtype=dtype)
    _prepare_native_kernels(device, log if main else (lambda _m: None))
    if cfg.sync_bn and info.enabled:
        from ..nn.sync_batchnorm import convert_sync_batchnorm

        model = convert_sync_batchnorm(model)
    optimizer = build_optimizer(cfg, model)
    per_rank_batch = max(1, cfg.batch_size // info.world_size)
    loader = make_loader(
        data, per_rank_batch, cfg.seed, cfg.augment, info.rank, info.world_size, cfg.workers
    )
    steps_per_epoch = len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg, steps_per_epoch)
    )
    if main and not resuming:
        _start_run_dir(run, cfg, model)
    barrier(info)  # the other ranks use the directory rank 0 created
    manager = CheckpointManager(run / "checkpoints", keep=cfg.keep_checkpoints)
    scaler = make_grad_scaler(cfg, device)

    state = {
        "epoch": 0,
        "step": 0,
        "best_val_top1": -1.0,
        "best_epoch": -1,
        "history": [],
        "partial": [0.0, 0.0, 0.0],
        "lr_scale": 1.0,
        "scaler_skips": 0,
    }
    if resuming:
        ck = manager.latest_valid(log=log)
        if ck is not None:
            load_model_state(model, ck.model_state, source=str(ck.path))
            optimizer.load_state_dict(ck.optimizer_state)
            scheduler.load_state_dict(ck.scheduler_state)
            if scaler.is_enabled() and ck.scaler_state:  # the scale and its growth tracker
                scaler.load_state_dict(ck.scaler_state)
            restore_rng_state(ck.rng_state)
            state.update(ck.meta["train_state"])
            loader.load_state_dict(ck.meta["loader"])
            if main:
                log(
                    f"resumed {run} from {ck.path.name} (epoch {state['epoch']}, step "
                    f"{state['step']})"
                )
        elif main:
            log(f"no usable checkpoint in {run / 'checkpoints'}; starting from scratch")

    train_model: nn.Module = model
    if info.enabled:
        ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
        train_model = nn.parallel.DistributedDataParallel(
            model, gradient_as_bucket_view=True, **ddp_kwargs
        )
    if cfg.compile:
        train_model = torch.compile(train_model)

    model_meta = {
        "model_name": model.model_name,
        "model_kwargs": model.model_kwargs,
        "model_config": model.model_config,
        "dataset": data.name,
        "num_classes": data.num_classes,
        "in_chans": data.in_chans,
        "image_size": list(data.image_size),
        "class_names": list(data.class_names),
        "dtype": cfg.dtype,
        "versions": versions(),
    }

    def save_resume_checkpoint() -> None:
        if main:
            manager.save(
                state["step"],
                model_state=model.state_dict(),
                optimizer_state=optimizer.state_dict(),
                scheduler_state=scheduler.state_dict(),
                scaler_state=scaler.state_dict() if scaler.is_enabled() else None,
                rng_state=capture_rng_state(),
                meta={
                    **model_meta,
                    "train_state": state,
                    "loader": loader.state_dict(),
                    "config": dataclasses.asdict(cfg),
                },
            )
        barrier(info)

    st = StepState.create(cfg, model, train_model, optimizer, scaler, device, info)
    skipped = LateFlags(device)  # --nan-policy skip: which steps were skipped, read lazily

    def note_skipped(flush: bool = False) -> None:
        """Log the skipped steps whose flags have arrived; halve the lr scale for each."""
        for step in skipped.pop_set(flush):
            state["lr_scale"] *= 0.5
            if main:
                log(
                    f"skipped step {step} (non-finite loss/gradient); learning rate scaled by "
                    f"{state['lr_scale']:.3g} to "
                    f"{optimizer.param_groups[0]['lr'] * state['lr_scale']:.3g}"
                )

    def sync_state() -> None:
        """Host copies of the device-side counters (at logging, checkpoints, epoch ends)."""
        note_skipped(flush=True)
        state["partial"] = _sums_to_float(st.sums)
        if scaler.is_enabled():
            state["scaler_skips"] += int(st.scaler_skips)
            st.scaler_skips.zero_()

    def check_finite(where: str) -> None:
        if bool(all_reduce_sum(st.bad.to(torch.int32), info) > 0):
            last = manager.paths()[-1] if manager.paths() else None
            kept = f"; the last good checkpoint {last} is untouched" if last else ""
            raise NonFiniteError(
                f"non-finite loss or gradient at {where} (epoch {state['epoch'] + 1}, step "
                f"{state['step']}, lr {optimizer.param_groups[0]['lr']:.3g}); stopping{kept}. "
                "Try a lower --lr, --grad-clip, or --nan-policy skip"
            )

    tb = None
    if main:
        from .tb_logger import make_logger

        tb = make_logger(cfg.log, run, data.val_x[:256].to(device=device, dtype=dtype))
    t_start = time.perf_counter()
    stop = bool(cfg.max_steps and state["step"] >= cfg.max_steps)
    while state["epoch"] < cfg.epochs and not stop:
        epoch = state["epoch"]
        loader.set_epoch(epoch)
        model.train()
        st.sums = torch.tensor(state["partial"], dtype=torch.float64, device=device)
        t_epoch, seen = time.perf_counter(), 0
        bar = _progress(cfg, main, steps_per_epoch, epoch, loader.start_batch)
        for xb, yb in loader:
            xb = xb.to(device=device, dtype=dtype, non_blocking=True)
            yb = yb.to(device, non_blocking=True)
            note_skipped()
            if state["lr_scale"] != 1.0:
                for g in optimizer.param_groups:
                    g["lr"] *= state["lr_scale"]
            event = train_step(st, xb, yb)
            if cfg.nan_policy == "skip":
                skipped.push(state["step"], event)
            scheduler.step()  # the next step's lr, before the skip scale
            state["step"] += 1
            seen += yb.shape[0]
            if state["step"] % cfg.log_every == 0:
                check_finite(f"step {state['step']}")
                sync_state()
                if bar is not None:
                    s = state["partial"]
                    bar.set_postfix(
                        loss=f"{s[0] / max(s[2], 1):.4f}",
                        acc=f"{s[1] / max(s[2], 1):.3f}",
                        img_s=f"{seen / (time.perf_counter() - t_epoch):.0f}",
                    )
            if bar is not None:
                bar.update(1)
            if cfg.ckpt_every_steps and state["step"] % cfg.ckpt_every_steps == 0:
                check_finite(f"step {state['step']}")
                sync_state()
                save_resume_checkpoint()
            if cfg.max_steps and state["step"] >= cfg.max_steps:
                stop = True
                break
        if bar is not None:
            bar.close()
        check_finite(f"the end of epoch {epoch + 1}")
        sync_state()
        if stop and loader.position < steps_per_epoch:
            save_resume_checkpoint()
            break
        epoch_time = time.perf_counter() - t_epoch
        s = _sums_to_float(all_reduce_sum(st.sums, info))
        val = evaluate_split(
            model, data.val_x, data.val_y, cfg.eval_batch_size, device, cfg.precision
        )
        row = {
            "epoch": epoch + 1,
            "step": state["step"],
            "lr": optimizer.param_groups[0]["lr"] * state["lr_scale"],
            "train_loss": s[0] / max(s[2], 1),
            "train_top1": s[1] / max(s[2], 1),
            "val_loss": val["loss"],
            "val_top1": val["top1"],
            "val_top5": val["top5"],
            "epoch_time_s": epoch_time,
            "images_per_s": seen * info.world_size / epoch_time,
        }
        if scaler.is_enabled():  # fp16: the loss scale and the overflow steps it skipped
            row["grad_scale"] = scaler.get_scale()
            row["scaler_skipped_steps"] = state["scaler_skips"]
            state["scaler_skips"] = 0
        state["history"].append(row)
        state["epoch"] = epoch + 1
        state["partial"] = [0.0, 0.0, 0.0]
        improved = val["top1"] > state["best_val_top1"]
        if improved:
            state["best_val_top1"], state["best_epoch"] = val["top1"], epoch + 1
        if main:
            meta = {**model_meta, "epoch": epoch + 1, "metrics": row}
            save_checkpoint(run / "last.safetensors", model_state=model.state_dict(), meta=meta)
            if improved:
                save_checkpoint(run / "best.safetensors", model_state=model.state_dict(), meta=meta)
            atomic_write_text(
                run / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in state["history"])
            )
            log(
                f"epoch {epoch + 1}/{cfg.epochs}  train_loss {row['train_loss']:.4f}  "
                f"train_top1 {row['train_top1']:.4f}  val_top1 {val['top1']:.4f}  "
                f"({epoch_time:.1f}s, {row['images_per_s']:.0f} img/s)"
            )
            if tb is not None:
                tb.log_epoch(row, model)
        save_resume_checkpoint()

    if tb is not None:
        tb.close()
    summary: dict[str, Any] = {}
    in_sync = ranks_in_sync(model, info) if info.enabled else None
    if state["epoch"] >= cfg.epochs and main:
        summary = _finish(
            cfg,
            run,
            model,
            data,
            state,
            device,
            model_meta,
            time.perf_counter() - t_start,
            log,
            extra={"world_size": info.world_size, "ranks_in_sync": in_sync},
        )
    barrier(info)
    return summary


def ranks_in_sync(model: nn.Module, info: DistInfo) -> bool:
    """Whether every process holds bit-identical parameters and buffers (compared to rank 0)."""
    import torch.distributed as dist

    flat = torch.cat(
        [
            t.detach().double().flatten()
            for t in model.state_dict().values()
            if t.is_floating_point()
        ]
    )
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    mismatch = torch.tensor([float((ref != flat).sum())], device=flat.device)
    dist.all_reduce(mismatch)
    return bool(mismatch.item() == 0)


def _check_finite_inputs(data: DatasetSplits) -> None:
    for name in ("train_x", "val_x", "test_x"):
        t = getattr(data, name)
        if isinstance(t, Tensor) and not bool(torch.isfinite(t).all()):  # decoded: finite
            raise ValueError(f"dataset {data.name}: {name} contains NaN or Inf values")


def _progress(cfg: TrainConfig, main: bool, total: int, epoch: int, initial: int):
    if not (cfg.progress and main):
        return None
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        leave=False,
        file=sys.stderr,
        dynamic_ncols=True,
    )


def _finish(
    cfg,
    run,
    model,
    data,
    state,
    device,
    model_meta,
    elapsed,
    log,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate the best checkpoint on the test set; write summary, curves and report."""
    from ..evaluation.plots import plot_training_curves
    from .checkpoint import load_checkpoint

    best_path = run / "best.safetensors"
    if best_path.exists():
        load_model_state(model, load_checkpoint(best_path).model_state, source=str(best_path))
    test = evaluate_split(
        model, data.test_x, data.test_y, cfg.eval_batch_size, device, cfg.precision
    )
    hist = state["history"]
    times = [r["epoch_time_s"] for r in hist]
    summary = {
        "model": cfg.model,
        "dataset": cfg.dataset,
        "epochs": cfg.epochs,
        "best_epoch": state["best_epoch"],
        "best_val_top1": state["best_val_top1"],
        "test_top1": test["top1"],
        "test_top5": test["top5"],
        "test_loss": test["loss"],
        "final_train_top1": hist[-1]["train_top1"] if hist else None,
        "mean_epoch_time_s": float(np.mean(times)) if times else None,
        "train_time_s": elapsed,
        "params": sum(p.numel() for p in model.parameters()),
        "sizes": data.sizes(),
        "run_dir": str(run),
        "versions": versions(),
        **(extra or {}),
    }
    atomic_write_text(run / "summary.json", json.dumps(summary, indent=2))
    with atomic_output(run / "training_curves.png") as tmp:
        plot_training_curves(hist, tmp)
    report = [
        f"# {cfg.model} on {cfg.dataset}",
        "",
        f"- test top-1: **{test['top1'] * 100:.2f} %** (top-5 {test['top5'] * 100:.2f} %), "
        f"best checkpoint from epoch {state['best_epoch']} (val top-1 "
        f"{state['best_val_top1'] * 100:.2f} %)",
        f"- {cfg.epochs} epochs, mean epoch time {summary['mean_epoch_time_s']:.1f} s, "
        f"{summary['params']} parameters",
        f"- optimizer {cfg.optimizer}, lr {cfg.lr}, schedule {cfg.schedule}, batch "
        f"{cfg.batch_size}, seed {cfg.seed}",
        "",
        "![training curves](training_curves.png)",
        "",
    ]
    atomic_write_text(run / "report.md", "\n".join(report))
    log(f"test top-1 {test['top1'] * 100:.2f} %  (top-5 {test['top5'] * 100:.2f} %)  -> {run}")
    return summary
