"""``graph-memory``: autograd graph size and peak memory of one train step, manual backward
passes vs plain autograd, for Poincaré ResNets of growing depth.

Each (depth, backward mode) runs in its own Python process
(:mod:`poincare_resnet.experiments._probe`): one cross-entropy train step of a freshly
initialised :class:`PoincareResNet` on random images ``(batch_size, in_chans, size, size)``.

* ``graph_nodes``: autograd nodes reachable from ``loss.grad_fn`` through ``next_functions``
  (``AccumulateGrad`` leaves included);
* ``saved_mib``: bytes of the tensors the autograd graph keeps for the backward pass (each
  storage counted once, through ``torch.autograd.graph.saved_tensors_hooks``): the graph memory
  the paper's manual backward passes are about, exact and independent of the allocator;
* ``peak_mib``: growth of the process's peak resident set size (Linux ``VmHWM``, else
  ``ru_maxrss``) over that step, after a warm-up step on 2 images (on CUDA:
  ``torch.cuda.max_memory_allocated`` above the memory in use before the step);
* ``step_time_s``: median of ``repeats`` further steps.

Plain autograd is :func:`poincare_resnet.ball.manual_backward` ``(False)``: the ball operations
(the Poincaré FC / convolution map, exp/log maps, Möbius addition) differentiate through their
formulas, and batch norm and the residual run as op-by-op chains of ball operations, as research
code does. With manual backward passes (the default) they use the hand-written backward passes
and the closed-form kernels of :mod:`poincare_resnet.nn._closed_forms`, whose autograd graph holds
per-pixel scalars instead of full activations.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..evaluation.tables import write_table_atomic as write_table
from .common import Log, as_tuple, new_figure, pick, probe, save_figure, write_json

SLUG = "graph_memory"
MODES = (("manual", True), ("autograd", False))


def run(
    out_dir: str | Path,
    tiny: bool = False,
    *,
    depths: Any = None,
    batch_size: int | None = None,
    size: int | None = None,
    in_chans: int = 3,
    widths: Any = (8, 16, 32),
    repeats: int | None = None,
    seed: int = 0,
    threads: int | None = None,
    device: str = "cpu",
    timeout: float | None = None,
    log: Log = print,
) -> list[dict[str, Any]]:
    """Graph nodes, peak memory and step time per (depth, backward mode); table + figure.

    Parameters
    ----------
    out_dir, tiny, log
        The output directory of the graph-memory table, figure and summary; tiny sizes
        (the ``None`` defaults depend on it); the progress log.
    depths, batch_size, size, in_chans, widths, repeats
        The networks and their input.
    seed, threads, device, timeout
        Seed, torch CPU threads, device and the probes' timeout (s).

    Returns
    -------
    list of dict
        The table rows, one per (depth, backward mode).
    """
    out = Path(out_dir)
    depths = as_tuple(pick(depths, (8, 20, 32), (8,), tiny))
    batch_size = int(pick(batch_size, 128, 4, tiny))
    size = int(pick(size, 32, 8, tiny))
    repeats = int(pick(repeats, 3, 1, tiny))
    widths = as_tuple(widths)
    rows = [
        r
        for depth in depths
        for r in _depth_rows(
            depth, batch_size, size, in_chans, widths, repeats, seed, threads, device, timeout, log
        )
    ]
    _write_outputs(out, rows, depths, batch_size, size, log)
    return rows


def _depth_rows(
    depth: int,
    batch_size: int,
    size: int,
    in_chans: int,
    widths: tuple,
    repeats: int,
    seed: int,
    threads: int | None,
    device: str,
    timeout: float | None,
    log: Log,
) -> list[dict[str, Any]]:
    """The rows of one depth, one per backward mode, with the ratios to plain autograd."""
    by_mode: dict[str, dict[str, Any]] = {}
    for mode, manual in MODES:
        res = probe(
            "resnet_step",
            seed,
            device,
            threads,
            timeout,
            depth=depth,
            batch=batch_size,
            size=size,
            in_chans=in_chans,
            widths=list(widths),
            manual=manual,
            repeats=repeats,
        )
        by_mode[mode] = {
            "depth": depth,
            "backward": mode,
            "batch": batch_size,
            "size": size,
            **res,
        }
    ref = by_mode["autograd"]
    for mode, _ in MODES:
        r = by_mode[mode]
        r["memory_vs_autograd"] = r["peak_mib"] / ref["peak_mib"] if ref["peak_mib"] else None
        r["nodes_vs_autograd"] = r["graph_nodes"] / ref["graph_nodes"]
        r["saved_vs_autograd"] = r["saved_mib"] / ref["saved_mib"]
    m = by_mode["manual"]
    log(
        f"graph-memory: ResNet-{depth} batch {batch_size}: graph {m['graph_nodes']} vs "
        f"{ref['graph_nodes']} nodes, saved tensors {m['saved_mib']:.1f} vs "
        f"{ref['saved_mib']:.1f} MiB, peak {m['peak_mib']:.1f} vs {ref['peak_mib']:.1f} MiB "
        f"(manual vs autograd)"
    )
    return [by_mode[mode] for mode, _ in MODES]


def _write_outputs(
    out: Path,
    rows: list[dict[str, Any]],
    depths: tuple,
    batch_size: int,
    size: int,
    log: Log,
) -> None:
    """The table, the figure and the summary (at the deepest network)."""
    write_table(rows, out / SLUG)
    _figure(rows, out / f"{SLUG}.png")
    deepest = max(depths)
    man = next(r for r in rows if r["depth"] == deepest and r["backward"] == "manual")
    summary = {
        "depth": deepest,
        "batch": batch_size,
        "size": size,
        "manual_peak_mib": man["peak_mib"],
        "autograd_peak_mib": next(
            r["peak_mib"] for r in rows if r["depth"] == deepest and r["backward"] == "autograd"
        ),
        "memory_ratio": man["memory_vs_autograd"],
        "saved_ratio": man["saved_vs_autograd"],
        "nodes_ratio": man["nodes_vs_autograd"],
        "method": man["method"],
    }
    write_json(out / f"{SLUG}_summary.json", summary)
    ratio = summary["memory_ratio"]
    log(
        f"graph-memory: ResNet-{deepest}, batch {batch_size}, {size}×{size}: manual backward "
        f"peak memory = {'n/a' if ratio is None else f'{ratio * 100:.1f} %'} of plain autograd's "
        f"({summary['method']}); saved-tensor memory = {summary['saved_ratio'] * 100:.1f} %"
    )


def _figure(rows: list[dict[str, Any]], path: Path) -> None:
    fig, (ax_mem, ax_nodes) = new_figure(2)
    for mode, _ in MODES:
        rs = sorted((r for r in rows if r["backward"] == mode), key=lambda r: r["depth"])
        ds = [r["depth"] for r in rs]
        ax_mem.plot(ds, [r["peak_mib"] for r in rs], marker="o", label=mode)
        ax_nodes.plot(ds, [r["graph_nodes"] for r in rs], marker="o", label=mode)
    ax_mem.set(xlabel="depth", ylabel="peak memory growth (MiB)", title="one train step")
    ax_nodes.set(xlabel="depth", ylabel="autograd graph nodes", title="graph size")
    for ax in (ax_mem, ax_nodes):
        ax.legend()
    save_figure(fig, path)
