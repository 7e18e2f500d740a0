"""``bn-speed``: Poincaré midpoint batch norm vs the Fréchet-mean batch norm.

Speed: forward + backward of one :class:`PoincareBatchNorm2d` (train mode, loss ``mean(out²)``)
on a random tangent map ``0.5·N(0, 1)`` of shape ``(batch, width, size, size)``; the median of
``repeats`` timed calls (``time.perf_counter``, after one warm-up call).

Memory: each (configuration, mean) runs in its own Python process
(:mod:`poincare_resnet.experiments._probe`), which reports the growth of its peak resident set
size (Linux ``VmHWM``, else ``ru_maxrss``) over one forward + backward pass after a small warm-up
pass (on CUDA: ``torch.cuda.max_memory_allocated`` above the memory in use before the pass).
Growth inside memory the allocator already holds is not seen, so tiny sizes read ~0 MiB.

Accuracy: a short training run (:func:`poincare_resnet.training.train`) of the same model with
``bn_mean="midpoint"`` and ``bn_mean="frechet"``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..evaluation.tables import write_table_atomic as write_table
from ..nn import PoincareBatchNorm2d
from .common import (
    Log,
    TrainRecipe,
    as_tuple,
    median_time,
    new_figure,
    pick,
    probe,
    save_figure,
    torch_threads,
    train_or_none,
    write_json,
)

SLUG = "bn_speed"
MEANS = ("midpoint", "frechet")


def time_bn(
    mean: str,
    batch: int,
    width: int,
    size: int,
    repeats: int,
    c: float = 0.1,
    seed: int = 0,
    device: str = "cpu",
) -> float:
    """Median forward + backward time (s) of one Poincaré batch norm in train mode.

    Parameters
    ----------
    mean : str
        ``"midpoint"`` or ``"frechet"``.
    batch, width, size : int
        The map's shape ``(batch, width, size, size)``.
    repeats : int
        Timed calls.
    c : float
        The curvature.
    seed : int
        Seed of the input.
    device : str
        Where it runs.

    Returns
    -------
    float
        Seconds.
    """
    dev = torch.device(device)
    bn = PoincareBatchNorm2d(width, c=c, mean=mean).to(dev)
    gen = torch.Generator().manual_seed(seed)
    u = (0.5 * torch.randn(batch, width, size, size, generator=gen)).to(dev).requires_grad_(True)

    def step() -> None:
        u.grad = None
        bn(u).pow(2).mean().backward()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    return median_time(step, repeats)


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
    s = train_or_none(cfg, log, f"bn-speed: training with {mean}")
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
    seed: int = 0,
    threads: int | None = None,
    device: str = "cpu",
    timeout: float | None = None,
    log: Log = print,
) -> list[dict[str, Any]]:
    """Timing / memory table over batch sizes and widths, plus the accuracy of short runs.

    Parameters
    ----------
    out_dir, tiny, log
        The output directory of the bn-speed tables, figure and summary; tiny sizes
        (the ``None`` defaults depend on it); the progress log.
    batch_sizes, widths, size, repeats, memory, c
        The speed and memory grid (``memory``: measure peak memory in fresh processes).
    model, dataset, data_dir, epochs, batch_size, lr, limit_train, train_runs
        The short training runs (``train_runs=False`` skips them).
    seed, threads, device, timeout
        Seed, torch CPU threads, device and the memory probes' timeout (s).

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
    with torch_threads(threads):
        rows = [
            _speed_row(b, w, size, repeats, c, seed, device, threads, memory, timeout, log)
            for b in batch_sizes
            for w in widths
        ]
        train_rows = []
        if train_runs:
            recipe = TrainRecipe(
                dataset, data_dir, epochs, batch_size, lr, limit_train, seed, threads, device
            )
            for mean in MEANS:
                run_dir = out / "runs" / mean
                train_rows.append(train_with_bn(mean, run_dir, model=model, recipe=recipe, log=log))
    _write_outputs(out, rows, train_rows, size, log)
    return rows + train_rows


def _speed_row(
    b: int,
    w: int,
    size: int,
    repeats: int,
    c: float,
    seed: int,
    device: str,
    threads: int | None,
    memory: bool,
    timeout: float | None,
    log: Log,
) -> dict[str, Any]:
    """One speed row: both means' times at batch ``b``, width ``w`` (and peak memory)."""
    row: dict[str, Any] = {"part": "speed", "batch": b, "width": w, "size": size}
    for mean in MEANS:
        row[f"{mean}_ms"] = 1e3 * time_bn(mean, b, w, size, repeats, c, seed, device)
    row["speedup"] = row["frechet_ms"] / row["midpoint_ms"]
    if memory:
        for mean in MEANS:
            res = probe(
                "bn", seed, device, threads, timeout, mean=mean, batch=b, channels=w, size=size, c=c
            )
            row[f"{mean}_peak_mib"] = res["peak_mib"]
        row["memory_ratio"] = row["frechet_peak_mib"] / max(row["midpoint_peak_mib"], 1e-9)
        row["memory_method"] = res["method"]
    log(
        f"bn-speed: ({b}, {w}, {size}, {size})  midpoint {row['midpoint_ms']:.2f} ms"
        f"  frechet {row['frechet_ms']:.2f} ms  ({row['speedup']:.1f}x)"
    )
    return row


def _write_outputs(
    out: Path, rows: list[dict[str, Any]], train_rows: list[dict[str, Any]], size: int, log: Log
) -> None:
    """The tables, the figure and the summary (at the largest configuration)."""
    write_table(rows, out / SLUG)
    if train_rows:
        write_table(train_rows, out / f"{SLUG}_train")
    _figure(rows, out / f"{SLUG}.png")
    key = max(rows, key=lambda r: (r["batch"], r["width"]))
    summary = {
        "largest_config": [key["batch"], key["width"], size, size],
        "speedup": key["speedup"],
        "midpoint_ms": key["midpoint_ms"],
        "frechet_ms": key["frechet_ms"],
        "train": {r["bn_mean"]: r["test_top1"] for r in train_rows},
    }
    write_json(out / f"{SLUG}_summary.json", summary)
    log(
        f"bn-speed: at {tuple(summary['largest_config'])} the midpoint batch norm is "
        f"{key['speedup']:.1f}x faster than the Fréchet one (forward + backward)"
    )


def _figure(rows: list[dict[str, Any]], path: Path) -> None:
    fig, (ax, ax_speed) = new_figure(2, (max(4.5, 1.1 * len(rows) + 2), 4.0))
    labels = [f"B{r['batch']}\nC{r['width']}" for r in rows]
    xs = list(range(len(rows)))
    width = 0.38
    for i, mean in enumerate(MEANS):
        ms = [r[f"{mean}_ms"] for r in rows]
        bars = ax.bar([x + (i - 0.5) * width for x in xs], ms, width, label=mean)
        ax.bar_label(bars, labels=[f"{m:.3g}" for m in ms], fontsize=7)
    low = min(min(r["midpoint_ms"], r["frechet_ms"]) for r in rows)
    ax.set_xticks(xs, labels)
    ax.set(
        yscale="log",
        ylim=(low / 4, None),
        ylabel="forward + backward (ms, median)",
        title=f"Poincaré batch norm, {rows[0]['size']}×{rows[0]['size']} maps",
    )
    ax.legend()
    ax_speed.bar(xs, [r["speedup"] for r in rows], 0.6, color="tab:green")
    ax_speed.axhline(1.0, color="grey", lw=0.6, ls=":")
    ax_speed.set_xticks(xs, labels)
    ax_speed.set(ylabel="Fréchet time / midpoint time", title="speed-up of the midpoint")
    save_figure(fig, path)
