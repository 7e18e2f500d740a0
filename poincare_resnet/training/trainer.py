"""The training loop: one function, :func:`train`, driven by a :class:`TrainConfig`.

A run directory holds ``config.json`` (resolved), ``metrics.jsonl`` (one line per epoch),
``checkpoints/`` (rotating, atomic resume checkpoints: model, optimizer, scheduler, RNG and
data-order position), ``best.safetensors`` / ``last.safetensors`` (weights + JSON metadata),
``training_curves.png``, ``summary.json`` and ``report.md``. Only rank 0 writes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import platform
import random
import shutil
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
from ..data import DatasetSplits, TensorLoader, load_dataset
from ..models import create_model
from .checkpoint import (
    CheckpointManager,
    atomic_write_text,
    capture_rng_state,
    load_model_state,
    restore_rng_state,
    save_checkpoint,
)
from .distributed import DistInfo, all_reduce_sum, barrier, cleanup_distributed, init_distributed

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "step", "none")
PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"float32": torch.float32, "float64": torch.float64}
NAN_POLICIES = ("stop", "skip")
LOGGERS = ("jsonl", "tensorboard")
# options that say how this process runs, not what the run is: taken from the caller on --resume
RUNTIME_OPTIONS = ("max_steps", "progress", "threads", "log_every", "eval_batch_size")


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
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if self.precision != "fp32" and self.dtype != "float32":
            raise ValueError("--precision bf16/fp16 needs --dtype float32")


# ------------------------------------------------------------------------------ helpers


def resolve_device(name: str) -> torch.device:
    """``auto`` → the local CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
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
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            nesterov=cfg.momentum > 0,
        )
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


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


def prepare_run_dir(cfg: TrainConfig, resume: str | None) -> Path:
    """Create (or check) the run directory without touching another run's files."""
    if resume:
        run = Path(resume)
        if not (run / "config.json").is_file():
            raise RunDirError(f"--resume {run}: no config.json there; not a poincare-resnet run")
        return run
    run = Path(cfg.out or _default_out(cfg))
    if run.exists() and any(run.iterdir()):
        if not cfg.overwrite:
            raise RunDirError(
                f"output directory {run} already holds files (another run?); pass --resume {run} "
                f"to continue it, --overwrite to replace it, or choose another --out"
            )
    return run


def load_run_config(run: Path) -> TrainConfig:
    data = json.loads((run / "config.json").read_text())
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in data.items() if k in known})


def _sums_to_float(t: Tensor) -> list[float]:
    return [float(v) for v in t.detach().double().cpu()]


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
    data = load_dataset(cfg.dataset, cfg.data_dir, cfg.val_fraction, cfg.seed, cfg.limit_train)
    _check_finite_inputs(data)
    seed_everything(cfg.seed)
    model = create_model(
        cfg.model, num_classes=data.num_classes, in_chans=data.in_chans, **cfg.model_kwargs
    ).to(device=device, dtype=dtype)
    _prepare_native_kernels(device, log if main else (lambda _m: None))
    if cfg.sync_bn and info.enabled:
        from ..nn.sync_batchnorm import convert_sync_batchnorm

        model = convert_sync_batchnorm(model)
    optimizer = build_optimizer(cfg, model)
    per_rank_batch = max(1, cfg.batch_size // info.world_size)
    loader = TensorLoader(
        data.train_x,
        data.train_y,
        per_rank_batch,
        shuffle=True,
        seed=cfg.seed,
        augment=(data.crop_padding, data.hflip) if cfg.augment else None,
        rank=info.rank,
        world_size=info.world_size,
    )
    steps_per_epoch = len(loader)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg, steps_per_epoch)
    )
    manager = CheckpointManager(run / "checkpoints", keep=cfg.keep_checkpoints)

    state = {
        "epoch": 0,
        "step": 0,
        "best_val_top1": -1.0,
        "best_epoch": -1,
        "history": [],
        "partial": [0.0, 0.0, 0.0],
        "lr_scale": 1.0,
    }
    if resuming:
        ck = manager.latest_valid(log=log)
        if ck is not None:
            load_model_state(model, ck.model_state, source=str(ck.path))
            optimizer.load_state_dict(ck.optimizer_state)
            scheduler.load_state_dict(ck.scheduler_state)
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
    elif main:
        if run.exists() and cfg.overwrite:
            shutil.rmtree(run)
        run.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run / "config.json", json.dumps(dataclasses.asdict(cfg), indent=2))
    barrier(info)

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
                rng_state=capture_rng_state(),
                meta={
                    **model_meta,
                    "train_state": state,
                    "loader": loader.state_dict(),
                    "config": dataclasses.asdict(cfg),
                },
            )
        barrier(info)

    bad = torch.zeros((), dtype=torch.bool, device=device)

    def check_finite(where: str) -> None:
        if bool(all_reduce_sum(bad.to(torch.int32), info) > 0):
            last = manager.paths()[-1] if manager.paths() else None
            kept = f"; the last good checkpoint {last} is untouched" if last else ""
            raise NonFiniteError(
                f"non-finite loss or gradient at {where} (epoch {state['epoch'] + 1}, step "
                f"{state['step']}, lr {optimizer.param_groups[0]['lr']:.3g}); stopping{kept}. "
                "Try a lower --lr, --grad-clip, or --nan-policy skip"
            )

    params = [p for p in model.parameters() if p.requires_grad]
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
        sums = torch.tensor(state["partial"], dtype=torch.float64, device=device)
        t_epoch, seen = time.perf_counter(), 0
        bar = _progress(cfg, main, steps_per_epoch, epoch, loader.start_batch)
        for xb, yb in loader:
            xb = xb.to(device=device, dtype=dtype, non_blocking=True)
            yb = yb.to(device, non_blocking=True)
            if cfg.nan_policy == "skip":  # a skipped step must not touch the BN statistics
                buffers = [b.clone() for b in model.buffers()]
            with autocast_context(cfg.precision, device):
                logits = train_model(xb).float()
            loss = F.cross_entropy(logits, yb, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                gnorm = nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            else:
                gnorm = torch.linalg.vector_norm(
                    torch.stack(torch._foreach_norm([p.grad for p in params if p.grad is not None]))
                )
            step_bad = ~(torch.isfinite(loss) & torch.isfinite(gnorm))
            if cfg.nan_policy == "skip":
                if bool(all_reduce_sum(step_bad.to(torch.int32), info) > 0):  # one sync per step
                    with torch.no_grad():
                        for b, saved in zip(model.buffers(), buffers, strict=True):
                            b.copy_(saved)
                    state["lr_scale"] *= 0.5
                    scheduler.step()
                    for g in optimizer.param_groups:
                        g["lr"] *= state["lr_scale"]
                    if main:
                        log(
                            f"skipped step {state['step']} (non-finite loss/gradient); "
                            f"learning rate scaled by {state['lr_scale']:.3g} to "
                            f"{optimizer.param_groups[0]['lr']:.3g}"
                        )
                    state["step"] += 1
                    if bar is not None:
                        bar.update(1)
                    continue
            else:
                bad |= step_bad
            optimizer.step()
            scheduler.step()
            if state["lr_scale"] != 1.0:
                for g in optimizer.param_groups:
                    g["lr"] *= state["lr_scale"]
            state["step"] += 1
            n = yb.shape[0]
            seen += n
            sums += torch.stack(
                [
                    loss.detach().double() * n,
                    (logits.argmax(1) == yb).sum().double(),
                    torch.tensor(float(n), dtype=torch.float64, device=device),
                ]
            )
            if state["step"] % cfg.log_every == 0:
                check_finite(f"step {state['step']}")
                if bar is not None:
                    s = _sums_to_float(sums)
                    bar.set_postfix(
                        loss=f"{s[0] / max(s[2], 1):.4f}",
                        acc=f"{s[1] / max(s[2], 1):.3f}",
                        img_s=f"{seen / (time.perf_counter() - t_epoch):.0f}",
                    )
            if bar is not None:
                bar.update(1)
            if cfg.ckpt_every_steps and state["step"] % cfg.ckpt_every_steps == 0:
                check_finite(f"step {state['step']}")
                state["partial"] = _sums_to_float(sums)
                save_resume_checkpoint()
            if cfg.max_steps and state["step"] >= cfg.max_steps:
                stop = True
                break
        if bar is not None:
            bar.close()
        check_finite(f"the end of epoch {epoch + 1}")
        if stop and loader.position < steps_per_epoch:
            state["partial"] = _sums_to_float(sums)
            save_resume_checkpoint()
            break
        epoch_time = time.perf_counter() - t_epoch
        s = _sums_to_float(all_reduce_sum(sums, info))
        val = evaluate_split(
            model, data.val_x, data.val_y, cfg.eval_batch_size, device, cfg.precision
        )
        row = {
            "epoch": epoch + 1,
            "step": state["step"],
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": s[0] / max(s[2], 1),
            "train_top1": s[1] / max(s[2], 1),
            "val_loss": val["loss"],
            "val_top1": val["top1"],
            "val_top5": val["top5"],
            "epoch_time_s": epoch_time,
            "images_per_s": seen * info.world_size / epoch_time,
        }
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
        if not bool(torch.isfinite(t).all()):
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
    plot_training_curves(hist, run / "training_curves.png")
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
