"""``bn-speed``: Poincaré midpoint batch norm vs the Fréchet-mean batch norm, fairly.

Two comparisons, each forward + backward of one :class:`PoincareBatchNorm2d` in train mode (loss
``mean(out²)``) on a random tangent map ``0.5·N(0, 1)`` of shape ``(batch, width, size, size)``:

* **Algorithmic** (the paper's claim): the midpoint and the Fréchet mean in the *same
  implementation*, the plain-autograd chain of :mod:`poincare_resnet.ball` operations
  (``manual_backward(False)``; columns ``*_ref``). The Fréchet mean runs exactly
  ``frechet_iters`` Karcher steps from the gyromidpoint with no host read
  (``frechet_tol=0``) and its implicit-function backward (Lou et al. 2020); the column
  ``frechet_step_norm`` is the norm of the next Karcher step at the result (how far from the
  exact mean it stopped).
* **Implementation**: the same midpoint batch norm as the reference chain (``midpoint_ref``), as
  the PyTorch-path autograd Functions with hand-written backward (``midpoint_torch``: native
  and Triton kernels off) and as the fused kernel (``midpoint_fused``: the native C++ kernel on
  CPU, Triton on CUDA).

Time: the median of ``repeats`` timed calls (``time.perf_counter``, after one warm-up call).
Memory: the allocator's peak over one call above what was live before it (CPU: the running
total of the allocations ``torch.profiler`` records with ``profile_memory=True``; CUDA:
``torch.cuda.max_memory_allocated``), load-independent.

Accuracy: a short training run (:func:`poincare_resnet.training.train`) of the same model with
``bn_mean="midpoint"`` and ``bn_mean="frechet"``.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from .. import _cpp, ball
from ..ball.frechet import frechet_mean, karcher_step
from ..evaluation.tables import mean_over_seeds
from ..evaluation.tables import write_table_atomic as write_table
from ..nn import PoincareBatchNorm2d, _dispatch
from .common import (
    Log,
    TrainRecipe,
    as_tuple,
    median_time,
    new_figure,
    pick,
    save_figure,
    torch_threads,
    train_or_reuse,
    write_json,
)

SLUG = "bn_speed"
MEANS = ("midpoint", "frechet")
#: The speed table's variants: (column prefix, mean, implementation).
VARIANTS: tuple[tuple[str, str, str], ...] = (
    ("frechet_ref", "frechet", "reference"),
    ("midpoint_ref", "midpoint", "reference"),
    ("midpoint_torch", "midpoint", "torch"),
    ("midpoint_fused", "midpoint", "fused"),
)
#: The two speed-ups: (name, slower variant, faster variant).
SPEEDUPS = (
    ("algorithmic", "frechet_ref", "midpoint_ref"),
    ("implementation", "midpoint_ref", "midpoint_fused"),
)


@contextlib.contextmanager
def implementation(name: str) -> Iterator[None]:
    """Run the block with batch norm in one implementation, then restore the switches.

    Parameters
    ----------
    name : str
        ``"reference"`` (the plain-autograd chain of ball operations), ``"torch"`` (the
        PyTorch-path Functions: native and Triton kernels off) or ``"fused"`` (the default
        dispatch: the native kernel on CPU, Triton on CUDA).
    """
    if name not in ("reference", "torch", "fused"):
        raise ValueError(f"unknown implementation {name!r}; choose reference, torch or fused")
    native, triton = _cpp.native_enabled(), _dispatch.triton_enabled()
    kernels = name == "fused"
    _cpp.set_native(native and kernels)
    _dispatch.set_triton(triton and kernels)
    try:
        with ball.manual_backward(name != "reference"):
            yield
    finally:
        _cpp.set_native(native)
        _dispatch.set_triton(triton)


def bn_step(
    mean: str,
    batch: int,
    width: int,
    size: int,
    c: float = 0.1,
    seed: int = 0,
    device: str = "cpu",
    frechet_iters: int = 5,
) -> tuple[PoincareBatchNorm2d, torch.Tensor, Callable[[], None]]:
    """One batch norm, its input and its forward + backward step (``mean(out²)``).

    Parameters
    ----------
    mean : str
        ``"midpoint"`` or ``"frechet"`` (exactly ``frechet_iters`` Karcher steps, no host read).
    batch, width, size : int
        The map's shape ``(batch, width, size, size)``.
    c : float
        The curvature.
    seed : int
        Seed of the input ``0.5·N(0, 1)``.
    device : str
        Where it runs.
    frechet_iters : int
        Karcher steps of the Fréchet mean.

    Returns
    -------
    tuple
        ``(layer, input, step)``; ``step()`` runs in the implementation active when called.
    """
    dev = torch.device(device)
    bn = PoincareBatchNorm2d(width, c=c, mean=mean, frechet_iters=frechet_iters, frechet_tol=0.0)
    bn = bn.to(dev)
    gen = torch.Generator().manual_seed(seed)
    u = (0.5 * torch.randn(batch, width, size, size, generator=gen)).to(dev).requires_grad_(True)

    def step() -> None:
        u.grad = None
        bn(u).pow(2).mean().backward()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    return bn, u, step


def allocator_peak_mib(fn: Callable[[], Any], device: torch.device) -> float:
    """Peak tensor memory (MiB) that one call of ``fn`` allocates above what was live before.

    CPU: the maximum of the running sum of the allocation and free sizes (in time order) that
    ``torch.profiler`` records (``profile_memory=True``; frees of older blocks count, so it is
    the net growth); CUDA: ``max_memory_allocated`` minus the memory in use before the call.

    Parameters
    ----------
    fn : callable
        The work, run once.
    device : torch.device
        Where it allocates.

    Returns
    -------
    float
        MiB.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return max(0, torch.cuda.max_memory_allocated(device) - before) / 2**20
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):  # allocations > 0, frees < 0
        if e.device_type() == torch.autograd.DeviceType.CPU:
            live += e.nbytes()
            peak = max(peak, live)
    return peak / 2**20


def train_with_bn(
    mean: str, out: Path, *, model: str, recipe: TrainRecipe, log: Log
) -> dict[str, Any]:
    """Train ``model`` with ``bn_mean=mean``; return accuracy and epoch time.

    Parameters
    ----------
    mean : str
        ``"midpoint"`` or ``"frechet"``.
    out : Path
        The run directory.
    model : str
        A registered model name.
    recipe : TrainRecipe
        The training options.
    log : callable
        Where a divergence is reported.

    Returns
    -------
    dict
        The table row (``test_top1``, ``best_val_top1``, ``mean_epoch_time_s``; NaN and
        ``error`` when training diverged).
    """
    cfg = recipe.config(model, out, model_kwargs={"bn_mean": mean})
    row: dict[str, Any] = {
        "part": "train",
        "bn_mean": mean,
        "model": model,
        "dataset": recipe.dataset,
        "epochs": recipe.epochs,
    }
    s = train_or_reuse(cfg, log, f"bn-speed: training with {mean}, seed {recipe.seed}")
    if s is None:
        return {
            **row,
            "test_top1": float("nan"),
            "mean_epoch_time_s": float("nan"),
            "error": "non-finite",
        }
    return {
        **row,
        "test_top1": s["test_top1"],
        "best_val_top1": s["best_val_top1"],
        "mean_epoch_time_s": s["mean_epoch_time_s"],
    }


def run(
    out_dir: str | Path,
    tiny: bool = False,
    *,
    batch_sizes: Any = None,
    widths: Any = None,
    size: int | None = None,
    repeats: int | None = None,
    frechet_iters: int = 5,
    memory: bool = True,
    c: float = 0.1,
    model: str = "poincare_resnet20",
    dataset: str | None = None,
    data_dir: str | None = None,
    epochs: int | None = None,
    batch_size: int = 64,
    lr: float = 5e-3,
    limit_train: int | None = None,
    train_runs: bool = True,
    seeds: Any = None,
    seed: int = 0,
    threads: int | None = None,
    device: str = "cpu",
    log: Log = print,
) -> list[dict[str, Any]]:
    """Timing / memory table over batch sizes and widths, plus the accuracy of short runs.

    Parameters
    ----------
    out_dir, tiny, log
        The output directory of the bn-speed tables, figure and summary; tiny sizes
        (the ``None`` defaults depend on it); the progress log.
    batch_sizes, widths, size, repeats, frechet_iters, memory, c
        The speed and memory grid (``frechet_iters``: the Fréchet mean's fixed number of Karcher
        steps; ``memory``: measure the allocator peaks).
    model, dataset, data_dir, epochs, batch_size, lr, limit_train, train_runs
        The short training runs (``train_runs=False`` skips them).
    seeds : int, str or sequence of int, optional
        The training runs' seeds, e.g. ``"0,1,2"``: each mean is trained once per seed (into
        ``runs/<mean>-seed<k>``; a finished run of the same recipe is reused) and the training
        table reports the mean and sample standard deviation over seeds (per-seed rows in
        ``bn_speed_summary.json``). Default: ``seed`` alone, into ``runs/<mean>``.
    seed, threads, device
        Seed, torch CPU threads and device.

    Returns
    -------
    list of dict
        The table rows (speed rows, then training rows).
    """
    out = Path(out_dir)
    batch_sizes = as_tuple(pick(batch_sizes, (32, 128), (8,), tiny))
    widths = as_tuple(pick(widths, (8, 16), (4,), tiny))
    size = int(pick(size, 32, 8, tiny))
    repeats = int(pick(repeats, 5, 2, tiny))
    dataset = pick(dataset, "digits", "digits", tiny)
    epochs = int(pick(epochs, 3, 1, tiny))
    limit_train = pick(limit_train, None, 64, tiny)
    if frechet_iters < 1:
        raise ValueError(f"frechet_iters must be >= 1, got {frechet_iters}")
    grid = {"size": size, "c": c, "seed": seed, "device": device, "frechet_iters": frechet_iters}
    with torch_threads(threads):
        rows = [_speed_row(b, w, repeats, memory, grid, log) for b in batch_sizes for w in widths]
        per_seed = []
        if train_runs:
            recipe = TrainRecipe(
                dataset, data_dir, epochs, batch_size, lr, limit_train, seed, threads, device
            )
            for mean in MEANS:
                for s in as_tuple(seed if seeds is None else seeds, int):
                    run = dataclasses.replace(recipe, seed=s)
                    name = mean if seeds is None else f"{mean}-seed{s}"
                    row = train_with_bn(mean, out / "runs" / name, model=model, recipe=run, log=log)
                    per_seed.append({**row, "seed": s})
    train_rows = mean_over_seeds(per_seed, ("part", "bn_mean", "model", "dataset", "epochs"))
    _write_outputs(out, rows, train_rows, size, log, per_seed)
    return rows + train_rows


def _speed_row(
    b: int, w: int, repeats: int, memory: bool, grid: dict[str, Any], log: Log
) -> dict[str, Any]:
    """One speed row at batch ``b``, width ``w``: every variant's time (and allocator peak),
    the two speed-ups (and memory ratios), the Fréchet mean's last step norm."""
    size, iters = grid["size"], grid["frechet_iters"]
    row: dict[str, Any] = {"part": "speed", "batch": b, "width": w, "size": size}
    row["frechet_iters"] = iters
    for prefix, mean, impl in VARIANTS:
        bn, u, step = bn_step(mean, b, w, **grid)
        with implementation(impl):
            row[f"{prefix}_ms"] = 1e3 * median_time(step, repeats)
            if memory:
                row[f"{prefix}_peak_mib"] = allocator_peak_mib(step, u.device)
    for name, slow, fast in SPEEDUPS:
        row[f"{name}_speedup"] = row[f"{slow}_ms"] / row[f"{fast}_ms"]
        if memory:
            row[f"{name}_memory_ratio"] = row[f"{slow}_peak_mib"] / row[f"{fast}_peak_mib"]
    row["memory_method"] = "allocator_peak" if memory else "none"
    row["frechet_step_norm"] = _frechet_step_norm(bn, u, iters)
    log(
        f"bn-speed: ({b}, {w}, {size}, {size})  Fréchet {row['frechet_ref_ms']:.2f} ms, midpoint "
        f"{row['midpoint_ref_ms']:.2f} ms (same implementation: "
        f"{row['algorithmic_speedup']:.1f}x); fused midpoint {row['midpoint_fused_ms']:.2f} ms "
        f"({row['implementation_speedup']:.1f}x)"
    )
    return row


@torch.no_grad()
def _frechet_step_norm(bn: PoincareBatchNorm2d, u: torch.Tensor, iters: int) -> float:
    """Norm of the next Karcher step at the ``iters``-step Fréchet mean of ``expmap0(u)``."""
    c = bn.curvature()
    points = ball.expmap0(u, c=c, dim=1).permute(0, 2, 3, 1).reshape(-1, u.shape[1])
    mu = frechet_mean(points, c=c, iters=iters, tol=0.0)
    return float(karcher_step(mu, points, c).norm())


def _write_outputs(
    out: Path,
    rows: list[dict[str, Any]],
    train_rows: list[dict[str, Any]],
    size: int,
    log: Log,
    per_seed: list[dict[str, Any]],
) -> None:
    """The tables, the figure and the summary (at the largest configuration; the training
    runs' mean test accuracy per mean and every per-seed row)."""
    write_table(rows, out / SLUG)
    if train_rows:
        write_table(train_rows, out / f"{SLUG}_train")
    _figure(rows, out / f"{SLUG}.png")
    key = max(rows, key=lambda r: (r["batch"], r["width"]))
    summary = {
        "largest_config": [key["batch"], key["width"], size, size],
        "frechet_iters": key["frechet_iters"],
        **{f"{p}_ms": key[f"{p}_ms"] for p, _, _ in VARIANTS},
        **{f"{n}_speedup": key[f"{n}_speedup"] for n, _, _ in SPEEDUPS},
        "train": {r["bn_mean"]: r["test_top1"] for r in train_rows},
        "train_per_seed": per_seed,
    }
    write_json(out / f"{SLUG}_summary.json", summary)
    log(
        f"bn-speed: at {tuple(summary['largest_config'])} the midpoint batch norm is "
        f"{key['algorithmic_speedup']:.1f}x faster than the Fréchet one in the same "
        f"implementation (forward + backward); the fused kernel is "
        f"{key['implementation_speedup']:.1f}x faster than the same midpoint in PyTorch ops"
    )


def _figure(rows: list[dict[str, Any]], path: Path) -> None:
    """Times of every variant per configuration; the two speed-ups."""
    fig, (ax, ax_speed) = new_figure(2, (max(4.5, 1.4 * len(rows) + 2), 4.0))
    labels = [f"B{r['batch']}\nC{r['width']}" for r in rows]
    xs = list(range(len(rows)))
    width = 0.8 / len(VARIANTS)
    for i, (prefix, _, _) in enumerate(VARIANTS):
        ms = [r[f"{prefix}_ms"] for r in rows]
        offset = (i - (len(VARIANTS) - 1) / 2) * width
        bars = ax.bar([x + offset for x in xs], ms, width, label=prefix)
        ax.bar_label(bars, labels=[f"{m:.3g}" for m in ms], fontsize=6)
    low = min(r[f"{p}_ms"] for r in rows for p, _, _ in VARIANTS)
    ax.set_xticks(xs, labels)
    ax.set(
        yscale="log",
        ylim=(low / 4, None),
        ylabel="forward + backward (ms, median)",
        title=f"Poincaré batch norm, {rows[0]['size']}×{rows[0]['size']} maps",
    )
    ax.legend(fontsize=7)
    for i, (name, slow, fast) in enumerate(SPEEDUPS):
        ys = [r[f"{name}_speedup"] for r in rows]
        ax_speed.bar([x + (i - 0.5) * 0.38 for x in xs], ys, 0.38, label=f"{name} ({slow}/{fast})")
    ax_speed.axhline(1.0, color="grey", lw=0.6, ls=":")
    ax_speed.set_xticks(xs, labels)
    ax_speed.set(ylabel="time ratio", title="speed-ups of the midpoint")
    ax_speed.legend(fontsize=7)
    save_figure(fig, path)
