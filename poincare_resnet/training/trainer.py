"""The training loop: one function, :func:`train`, driven by a :class:`TrainConfig`.

The package is split by concern: :mod:`.config` (the options and their validation),
:mod:`.optim` (optimiser, schedule, mixed precision), :mod:`.rundir` (the run directory),
:mod:`.checkpoint`, :mod:`.evaluate`, :mod:`.report`; this module holds one optimisation step
(:func:`train_step`, with the NaN policies) and the loop around it, which builds one :class:`Run`
and passes it to each part of an epoch.

A run directory holds ``config.json`` (resolved), ``metrics.jsonl`` (one line per epoch),
``checkpoints/`` (rotating, atomic resume checkpoints: model, optimizer, scheduler, RNG and
data-order position), ``best.safetensors`` / ``last.safetensors`` (weights + JSON metadata),
``training_curves.png``, ``summary.json`` and ``report.md``. Only rank 0 writes; under
``torchrun`` rank 0 names the run directory and broadcasts the name.
"""

from __future__ import annotations

import dataclasses
import json
import random
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..data import DatasetSplits, TensorLoader, load_dataset, make_loader
from ..models import create_model
from ..models.registry import build_from_config
from .checkpoint import (
    CheckpointManager,
    atomic_write_text,
    capture_rng_state,
    load_checkpoint,
    load_model_state,
    restore_rng_state,
    save_checkpoint,
)
from .config import (
    DTYPES,
    LOGGERS,
    NAN_POLICIES,
    OPTIMIZERS,
    PRECISIONS,
    RUNTIME_OPTIONS,
    SCHEDULES,
    TrainConfig,
    resolve_device,
)
from .distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    broadcast_object,
    cleanup_distributed,
    init_distributed,
)
from .evaluate import evaluate_split
from .optim import (
    autocast_context,
    build_optimizer,
    build_scheduler,
    lr_factor,
    make_grad_scaler,
)
from .report import summarize, versions, write_report
from .rundir import (
    RUN_FORMAT_VERSION,
    TOOL,
    RunDirError,
    check_output_dir,
    check_replaceable,
    load_run_config,
    prepare_run_dir,
    remove_run_files,
    start_run_dir,
)

__all__ = [
    "DTYPES",
    "LOGGERS",
    "MIN_LOSS_SCALE",
    "NAN_POLICIES",
    "OPTIMIZERS",
    "PRECISIONS",
    "RUNTIME_OPTIONS",
    "RUN_FORMAT_VERSION",
    "SCHEDULES",
    "TOOL",
    "LateFlags",
    "NonFiniteError",
    "Run",
    "RunDirError",
    "StepState",
    "TrainConfig",
    "autocast_context",
    "build_loader",
    "build_optimizer",
    "build_scheduler",
    "check_output_dir",
    "check_replaceable",
    "evaluate_split",
    "halve_lr_for_skipped",
    "nan_event_seen",
    "load_run_config",
    "lr_factor",
    "make_grad_scaler",
    "prepare_run_dir",
    "ranks_in_sync",
    "remove_run_files",
    "resolve_device",
    "train",
    "train_step",
    "versions",
]

# fp16: a gradient overflow at a loss scale <= this is a NaN event, not the scaler's business
MIN_LOSS_SCALE = 1.0


class NonFiniteError(RuntimeError):
    """Training produced a NaN/Inf loss or gradient and the policy is ``stop``."""


# ------------------------------------------------------------------------------ one step


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
        """Fresh flags and sums on ``device`` (the sums are set per epoch by the loop).

        Parameters
        ----------
        cfg : TrainConfig
            The run's options.
        model : nn.Module
            The network (its buffers are what ``--nan-policy skip`` restores).
        train_model : nn.Module
            The module the step calls (``model``, DDP-wrapped or compiled).
        optimizer : torch.optim.Optimizer
            The optimizer.
        scaler : torch.amp.GradScaler
            The fp16 loss scaler (disabled otherwise).
        device : torch.device
            The training device.
        info : DistInfo
            The run's processes.

        Returns
        -------
        StepState
            With ``bad`` false, zero sums and no scaler skips.
        """
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

    Parameters
    ----------
    st : StepState
        The model, optimizer, scaler, flags and sums (updated in place).
    xb : Tensor
        A batch of images on the training device.
    yb : Tensor
        Its labels.

    Returns
    -------
    Tensor
        The step's NaN-event flag (0-dim bool, on the device).
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
        """Queue the flag of ``step`` (a 0-dim bool tensor on the device).

        Parameters
        ----------
        step : int
            The step's index.
        flag : Tensor
            Its NaN-event flag.
        """
        event = None
        if self.cuda:
            host = torch.empty((), dtype=torch.bool, pin_memory=True)
            host.copy_(flag, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            flag = host
        self._pending.append((step, flag, event))

    def pop_set(self, flush: bool = False) -> list[int]:
        """Steps whose flag was set, among those at least ``lag`` steps old (all if ``flush``).

        Parameters
        ----------
        flush : bool
            Read every queued flag, however recent.

        Returns
        -------
        list of int
            The steps whose flag was set (the others are dropped too).
        """
        cut = len(self._pending) - (0 if flush else self.lag)
        ready, self._pending = self._pending[: max(cut, 0)], self._pending[max(cut, 0) :]
        out = []
        for step, flag, event in ready:
            if event is not None:
                event.synchronize()
            if bool(flag):
                out.append(step)
        return out


# ------------------------------------------------------------------------------ NaN policies


def halve_lr_for_skipped(
    state: dict[str, Any],
    skipped: LateFlags,
    lr: float,
    log: Callable[[str], None],
    flush: bool = False,
) -> list[int]:
    """``--nan-policy skip``: halve the learning-rate scale once per skipped step whose flag
    has arrived (all queued ones if ``flush``), logging each.

    With :math:`k` skipped steps so far the learning rate is :math:`2^{-k}` times the
    schedule's; :func:`scale_lr` applies the scale before each step.

    Parameters
    ----------
    state : dict
        The loop's state; its ``"lr_scale"`` is updated.
    skipped : LateFlags
        The per-step NaN-event flags :func:`train_step` returned.
    lr : float
        The schedule's current learning rate (for the message).
    log : callable
        Where the messages go.
    flush : bool
        Read every queued flag, not only those ``skipped.lag`` steps old.

    Returns
    -------
    list of int
        The skipped steps read now.
    """
    steps = skipped.pop_set(flush)
    for step in steps:
        state["lr_scale"] *= 0.5
        log(
            f"skipped step {step} (non-finite loss/gradient); learning rate scaled by "
            f"{state['lr_scale']:.3g} to {lr * state['lr_scale']:.3g}"
        )
    return steps


def scale_lr(optimizer: torch.optim.Optimizer, scale: float) -> None:
    """Multiply every parameter group's learning rate by ``scale`` (the scheduler's next step
    sets the schedule's value again).

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        Its ``param_groups`` are updated in place.
    scale : float
        The factor (the skip policy's ``lr_scale``).
    """
    if scale != 1.0:
        for g in optimizer.param_groups:
            g["lr"] *= scale


def nan_event_seen(st: StepState) -> bool:
    """``--nan-policy stop``: whether any rank had a NaN event since the run started (reads
    the device flag ``st.bad``: one host sync, done at logging, checkpoints and epoch ends).

    Parameters
    ----------
    st : StepState
        Its ``bad`` flag is read and summed over ranks.

    Returns
    -------
    bool
        True when the loop must raise :class:`NonFiniteError`.
    """
    return bool(all_reduce_sum(st.bad.to(torch.int32), st.info) > 0)


# ------------------------------------------------------------------------------ the run


@dataclass
class Run:
    """One training run, built once by :func:`_setup` and passed to each part of the loop.

    ``state`` is what a resume checkpoint stores as ``train_state``: ``epoch``, ``step``,
    ``best_val_top1``, ``best_epoch``, ``history`` (the rows of ``metrics.jsonl``), ``partial``
    (the epoch's sums so far), ``lr_scale`` (the skip policy's) and ``scaler_skips``.
    """

    cfg: TrainConfig
    dir: Path
    device: torch.device
    info: DistInfo
    log: Callable[[str], None]
    data: DatasetSplits
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    loader: TensorLoader
    manager: CheckpointManager
    state: dict[str, Any]
    meta: dict[str, Any]
    skipped: LateFlags
    step: StepState | None = None
    tb: Any = None

    @property
    def main_log(self) -> Callable[[str], None]:
        """``log`` on rank 0, silent on the other ranks."""
        return self.log if self.info.is_main else _quiet

    @property
    def lr(self) -> float:
        """The schedule's current learning rate (before the skip policy's scale)."""
        return self.optimizer.param_groups[0]["lr"]


def _quiet(_message: str) -> None:
    """A log that drops its message."""


def _new_state() -> dict[str, Any]:
    """The loop's state at the start of a run."""
    return {
        "epoch": 0,
        "step": 0,
        "best_val_top1": -1.0,
        "best_epoch": -1,
        "history": [],
        "partial": [0.0, 0.0, 0.0],
        "lr_scale": 1.0,
        "scaler_skips": 0,
    }


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's global and PyTorch's random generators.

    Parameters
    ----------
    seed : int
        The seed (NumPy gets it modulo :math:`2^{32}`).
    """
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - user code may use the global state
    torch.manual_seed(seed)


def build_loader(cfg: TrainConfig, data: DatasetSplits, info: DistInfo) -> TensorLoader:
    """The training loader of this rank: shuffled, augmented as ``cfg`` says, its share of
    each global batch of ``cfg.batch_size``.

    Parameters
    ----------
    cfg : TrainConfig
        ``batch_size``, ``seed``, ``augment``, ``workers`` (decoding processes of an on-disk
        dataset).
    data : DatasetSplits
        The dataset (its training split and augmentation settings).
    info : DistInfo
        This process's rank and the world size.

    Returns
    -------
    TensorLoader
        Resumable (``state_dict``) and reshuffled per epoch (``set_epoch``); a
        :class:`~poincare_resnet.data.DiskLoader` (a ``TensorLoader`` that decodes files in
        worker processes) for a dataset on disk.
    """
    return make_loader(
        data,
        max(1, cfg.batch_size // info.world_size),
        cfg.seed,
        cfg.augment,
        info.rank,
        info.world_size,
        cfg.workers,
    )


def _model_meta(model: nn.Module, data: DatasetSplits, cfg: TrainConfig) -> dict[str, Any]:
    """The metadata every checkpoint of the run carries (what ``evaluate`` rebuilds from)."""
    return {
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


def _wrap_model(model: nn.Module, cfg: TrainConfig, info: DistInfo, device) -> nn.Module:
    """The module the step calls: ``model`` under DDP (``torchrun``), compiled if asked."""
    train_model: nn.Module = model
    if info.enabled:
        ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
        train_model = nn.parallel.DistributedDataParallel(
            model, gradient_as_bucket_view=True, **ddp_kwargs
        )
    if cfg.compile:
        train_model = torch.compile(train_model)
    return train_model


def _build_network(cfg, run_dir, resuming, device, info, log) -> tuple[DatasetSplits, nn.Module]:
    """Load the data and build the network on ``device`` (sync batch norm under DDP if asked)."""
    data = load_dataset(
        cfg.dataset, cfg.data_dir, cfg.val_fraction, cfg.seed, cfg.limit_train, cfg.image_size
    )
    _check_finite_inputs(data)
    seed_everything(cfg.seed)
    model = _build_model(cfg, data, run_dir if resuming else None)
    model = model.to(device=device, dtype=DTYPES[cfg.dtype])
    _prepare_native_kernels(device, log if info.is_main else _quiet)
    if cfg.sync_bn and info.enabled:
        from ..nn.sync_batchnorm import convert_sync_batchnorm

        model = convert_sync_batchnorm(model)
    return data, model


def _setup(cfg: TrainConfig, run_dir: Path, resuming: bool, device, info, log) -> Run:
    """Build everything the run needs, create its directory (rank 0) and resume if asked."""
    data, model = _build_network(cfg, run_dir, resuming, device, info, log)
    optimizer = build_optimizer(cfg, model)
    loader = build_loader(cfg, data, info)
    scheduler = build_scheduler(cfg, optimizer, len(loader))
    if info.is_main and not resuming:
        start_run_dir(run_dir, cfg, model)
    barrier(info)  # the other ranks use the directory rank 0 created
    scaler = make_grad_scaler(cfg, device)
    run = Run(
        cfg=cfg,
        dir=run_dir,
        device=device,
        info=info,
        log=log,
        data=data,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=scaler,
        loader=loader,
        manager=CheckpointManager(run_dir / "checkpoints", keep=cfg.keep_checkpoints),
        state=_new_state(),
        meta=_model_meta(model, data, cfg),
        skipped=LateFlags(device),  # --nan-policy skip: which steps were skipped, read lazily
    )
    if resuming:
        _resume(run)
    train_model = _wrap_model(model, cfg, info, device)
    run.step = StepState.create(cfg, model, train_model, optimizer, scaler, device, info)
    return run


def _resume(run: Run) -> None:
    """Restore the newest valid checkpoint of the run (or say there is none)."""
    ck = run.manager.latest_valid(log=run.log)
    if ck is None:
        run.main_log(f"no usable checkpoint in {run.dir / 'checkpoints'}; starting from scratch")
        return
    load_model_state(run.model, ck.model_state, source=str(ck.path))
    run.optimizer.load_state_dict(ck.optimizer_state)
    run.scheduler.load_state_dict(ck.scheduler_state)
    if run.scaler.is_enabled() and ck.scaler_state:  # the scale and its growth tracker
        run.scaler.load_state_dict(ck.scaler_state)
    restore_rng_state(ck.rng_state)
    run.state.update(ck.meta["train_state"])
    run.loader.load_state_dict(ck.meta["loader"])
    run.main_log(
        f"resumed {run.dir} from {ck.path.name} (epoch {run.state['epoch']}, step "
        f"{run.state['step']})"
    )


def save_resume_checkpoint(run: Run) -> None:
    """Rank 0 writes a rotating resume checkpoint of the whole run; every rank waits for it.

    Parameters
    ----------
    run : Run
        The run (its model, optimizer, scheduler, scaler, RNG, loader position and state).
    """
    if run.info.is_main:
        run.manager.save(
            run.state["step"],
            model_state=run.model.state_dict(),
            optimizer_state=run.optimizer.state_dict(),
            scheduler_state=run.scheduler.state_dict(),
            scaler_state=run.scaler.state_dict() if run.scaler.is_enabled() else None,
            rng_state=capture_rng_state(),
            meta={
                **run.meta,
                "train_state": run.state,
                "loader": run.loader.state_dict(),
                "config": dataclasses.asdict(run.cfg),
            },
        )
    barrier(run.info)


def _sync_state(run: Run) -> None:
    """Host copies of the device-side counters (at logging, checkpoints, epoch ends)."""
    halve_lr_for_skipped(run.state, run.skipped, run.lr, run.main_log, flush=True)
    run.state["partial"] = _sums_to_float(run.step.sums)
    if run.scaler.is_enabled():
        run.state["scaler_skips"] += int(run.step.scaler_skips)
        run.step.scaler_skips.zero_()


def _check_and_sync(run: Run, where: str) -> None:
    """Stop on a NaN event (``--nan-policy stop``), then :func:`_sync_state`."""
    if nan_event_seen(run.step):
        last = run.manager.paths()[-1] if run.manager.paths() else None
        kept = f"; the last good checkpoint {last} is untouched" if last else ""
        raise NonFiniteError(
            f"non-finite loss or gradient at {where} (epoch {run.state['epoch'] + 1}, step "
            f"{run.state['step']}, lr {run.lr:.3g}); stopping{kept}. "
            "Try a lower --lr, --grad-clip, or --nan-policy skip"
        )
    _sync_state(run)


# ------------------------------------------------------------------------------ the loop


def _loop_step(run: Run, xb: Tensor, yb: Tensor) -> None:
    """One step of the loop: the skip policy's lr scale, :func:`train_step`, the schedule."""
    cfg, state = run.cfg, run.state
    xb = xb.to(device=run.device, dtype=DTYPES[cfg.dtype], non_blocking=True)
    yb = yb.to(run.device, non_blocking=True)
    halve_lr_for_skipped(state, run.skipped, run.lr, run.main_log)
    scale_lr(run.optimizer, state["lr_scale"])
    event = train_step(run.step, xb, yb)
    if cfg.nan_policy == "skip":
        run.skipped.push(state["step"], event)
    run.scheduler.step()  # the next step's lr, before the skip scale
    state["step"] += 1


def _show_progress(run: Run, bar, seen: int, t_epoch: float) -> None:
    """The progress bar's loss, accuracy and throughput (after a sync)."""
    if bar is not None:
        s = run.state["partial"]
        bar.set_postfix(
            loss=f"{s[0] / max(s[2], 1):.4f}",
            acc=f"{s[1] / max(s[2], 1):.3f}",
            img_s=f"{seen / (time.perf_counter() - t_epoch):.0f}",
        )


def _train_steps(run: Run, t_epoch: float) -> tuple[bool, int]:
    """The steps of one epoch (from the loader's position); returns (stop, images seen)."""
    cfg, state = run.cfg, run.state
    bar = _progress(cfg, run.info.is_main, len(run.loader), state["epoch"], run.loader.start_batch)
    seen, stop = 0, False
    for xb, yb in run.loader:
        _loop_step(run, xb, yb)
        seen += yb.shape[0]
        if state["step"] % cfg.log_every == 0:
            _check_and_sync(run, f"step {state['step']}")
            _show_progress(run, bar, seen, t_epoch)
        if bar is not None:
            bar.update(1)
        if cfg.ckpt_every_steps and state["step"] % cfg.ckpt_every_steps == 0:
            _check_and_sync(run, f"step {state['step']}")
            save_resume_checkpoint(run)
        if cfg.max_steps and state["step"] >= cfg.max_steps:
            stop = True
            break
    if bar is not None:
        bar.close()
    return stop, seen


def _run_epoch(run: Run) -> bool:
    """Train one epoch (or what is left of it); returns whether ``--max-steps`` was reached."""
    epoch = run.state["epoch"]
    run.loader.set_epoch(epoch)
    run.model.train()
    run.step.sums = torch.tensor(run.state["partial"], dtype=torch.float64, device=run.device)
    t_epoch = time.perf_counter()
    stop, seen = _train_steps(run, t_epoch)
    _check_and_sync(run, f"the end of epoch {epoch + 1}")
    if stop and run.loader.position < len(run.loader):
        save_resume_checkpoint(run)
        return True
    _end_epoch(run, time.perf_counter() - t_epoch, seen)
    return stop


def _epoch_row(run: Run, epoch_time: float, seen: int, val: dict[str, Any]) -> dict[str, Any]:
    """The epoch's line of ``metrics.jsonl``."""
    s = _sums_to_float(all_reduce_sum(run.step.sums, run.info))
    row = {
        "epoch": run.state["epoch"] + 1,
        "step": run.state["step"],
        "lr": run.lr * run.state["lr_scale"],
        "train_loss": s[0] / max(s[2], 1),
        "train_top1": s[1] / max(s[2], 1),
        "val_loss": val["loss"],
        "val_top1": val["top1"],
        "val_top5": val["top5"],
        "epoch_time_s": epoch_time,
        "images_per_s": seen * run.info.world_size / epoch_time,
    }
    if run.scaler.is_enabled():  # fp16: the loss scale and the overflow steps it skipped
        row["grad_scale"] = run.scaler.get_scale()
        row["scaler_skipped_steps"] = run.state["scaler_skips"]
        run.state["scaler_skips"] = 0
    return row


def _end_epoch(run: Run, epoch_time: float, seen: int) -> None:
    """Validate, record the epoch, save ``last``/``best`` weights and a resume checkpoint."""
    cfg, state = run.cfg, run.state
    val = evaluate_split(
        run.model, run.data.val_x, run.data.val_y, cfg.eval_batch_size, run.device, cfg.precision
    )
    row = _epoch_row(run, epoch_time, seen, val)
    state["history"].append(row)
    state["epoch"] += 1
    state["partial"] = [0.0, 0.0, 0.0]
    improved = val["top1"] > state["best_val_top1"]
    if improved:
        state["best_val_top1"], state["best_epoch"] = val["top1"], state["epoch"]
    if run.info.is_main:
        _write_epoch(run, row, improved)
    save_resume_checkpoint(run)


def _write_epoch(run: Run, row: dict[str, Any], improved: bool) -> None:
    """Rank 0: ``last`` (and ``best``) weights, ``metrics.jsonl``, the log line, TensorBoard."""
    meta = {**run.meta, "epoch": row["epoch"], "metrics": row}
    state_dict = run.model.state_dict()
    save_checkpoint(run.dir / "last.safetensors", model_state=state_dict, meta=meta)
    if improved:
        save_checkpoint(run.dir / "best.safetensors", model_state=state_dict, meta=meta)
    history = run.state["history"]
    atomic_write_text(run.dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in history))
    run.log(
        f"epoch {row['epoch']}/{run.cfg.epochs}  train_loss {row['train_loss']:.4f}  "
        f"train_top1 {row['train_top1']:.4f}  val_top1 {row['val_top1']:.4f}  "
        f"({row['epoch_time_s']:.1f}s, {row['images_per_s']:.0f} img/s)"
    )
    if run.tb is not None:
        run.tb.log_epoch(row, run.model)


# ------------------------------------------------------------------------------ train


def train(cfg: TrainConfig, resume: str | None = None, log=print) -> dict[str, Any]:
    """Train a model as ``cfg`` says (or continue the run in directory ``resume``).

    Parameters
    ----------
    cfg : TrainConfig
        The run's options. On resume the recipe comes from the run's ``config.json`` and only
        the :data:`RUNTIME_OPTIONS` (how this process runs) from ``cfg``.
    resume : str, optional
        A run directory to continue from its newest valid checkpoint.
    log : callable
        Where progress messages go (rank 0's; a few come from every rank).

    Returns
    -------
    dict
        The summary (also written to ``summary.json``); empty when the run stopped early
        (``max_steps``) or on ranks other than 0. Raises :class:`NonFiniteError` when a loss or
        gradient becomes NaN/Inf under ``nan_policy="stop"``; the last good checkpoint is left
        untouched.
    """
    cfg, run_dir = _resolve_config(cfg, resume)
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
        run_dir = Path(broadcast_object(str(run_dir), info))
        return _train(_setup(cfg, run_dir, resume is not None, device, info, log))
    finally:
        cleanup_distributed()


def _resolve_config(cfg: TrainConfig, resume: str | None) -> tuple[TrainConfig, Path]:
    """The validated options of the run and its directory (on resume: the stored recipe)."""
    if not resume:
        cfg.validate()
        return cfg, prepare_run_dir(cfg, None)
    run_dir = prepare_run_dir(cfg, resume)
    stored = load_run_config(run_dir)
    # the run's recipe comes from its config.json; how this process runs it from `cfg`
    for name in RUNTIME_OPTIONS:
        setattr(stored, name, getattr(cfg, name))
    stored.validate()
    return stored, run_dir


def _train(run: Run) -> dict[str, Any]:
    """The epochs of ``run``, then (rank 0, all epochs done) the test evaluation and report."""
    cfg, state, info = run.cfg, run.state, run.info
    if info.is_main:
        from .tb_logger import make_logger

        val_x = run.data.val_x[:256].to(device=run.device, dtype=DTYPES[cfg.dtype])
        run.tb = make_logger(cfg.log, run.dir, val_x)
    t_start = time.perf_counter()
    stop = bool(cfg.max_steps and state["step"] >= cfg.max_steps)
    while state["epoch"] < cfg.epochs and not stop:
        stop = _run_epoch(run)
    if run.tb is not None:
        run.tb.close()
    summary: dict[str, Any] = {}
    in_sync = ranks_in_sync(run.model, info) if info.enabled else None
    if state["epoch"] >= cfg.epochs and info.is_main:
        extra = {"world_size": info.world_size, "ranks_in_sync": in_sync}
        summary = _finish(run, time.perf_counter() - t_start, extra)
    barrier(info)
    return summary


def _finish(run: Run, elapsed: float, extra: dict[str, Any]) -> dict[str, Any]:
    """Evaluate the best checkpoint on the test set; write summary, curves and report."""
    cfg, model = run.cfg, run.model
    best_path = run.dir / "best.safetensors"
    if best_path.exists():
        load_model_state(model, load_checkpoint(best_path).model_state, source=str(best_path))
    data = run.data
    test = evaluate_split(
        model, data.test_x, data.test_y, cfg.eval_batch_size, run.device, cfg.precision
    )
    summary = summarize(
        cfg,
        run.state,
        test,
        train_time_s=elapsed,
        params=sum(p.numel() for p in model.parameters()),
        sizes=data.sizes(),
        run_dir=str(run.dir),
        versions=versions(),
        **extra,
    )
    write_report(run.dir, cfg, summary, run.state["history"])
    run.log(
        f"test top-1 {test['top1'] * 100:.2f} %  (top-5 {test['top5'] * 100:.2f} %)  -> {run.dir}"
    )
    return summary


# ------------------------------------------------------------------------------ helpers


def _sums_to_float(t: Tensor) -> list[float]:
    """A device tensor of sums as host floats (one sync)."""
    return [float(v) for v in t.detach().double().cpu()]


def _check_finite_inputs(data: DatasetSplits) -> None:
    """Refuse a dataset whose images hold NaN or Inf (``ValueError`` naming the split)."""
    for name in ("train_x", "val_x", "test_x"):
        t = getattr(data, name)
        if isinstance(t, Tensor) and not bool(torch.isfinite(t).all()):  # decoded: finite
            raise ValueError(f"dataset {data.name}: {name} contains NaN or Inf values")


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


def ranks_in_sync(model: nn.Module, info: DistInfo) -> bool:
    """Whether every process holds bit-identical parameters and buffers (compared to rank 0).

    Parameters
    ----------
    model : nn.Module
        This process's replica.
    info : DistInfo
        The run's processes (a process group must exist).

    Returns
    -------
    bool
        True when no floating-point entry of the state differs from rank 0's.
    """
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
