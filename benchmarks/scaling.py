"""How the Poincaré overhead grows with width, depth and resolution: Poincaré / Euclidean ratios
of the train-step time and of the activation memory, each model in its own process.

Axes (eager, native kernels on: the CPU default; Adam, cross-entropy, random data):

* width: ResNet-20 at 8-16-32 → 16-32-64 → ResNet-18's 64-128-256-512 (32×32),
* depth: ResNet-20 → ResNet-110 (8-16-32) and ResNet-18 → ResNet-50 (32×32),
* resolution: ResNet-18 at 32×32 → 64×64 (CIFAR stem) → 224×224 (ImageNet stem), and
  ResNet-50 at 224×224.

Per model: the median train step of ``--steps`` timed steps after ``--warmup``; the allocator
peak of one profiled step (live parameters, optimizer state and batch + the step's peak extra
tensor memory: ``benchmarks/_memory.py``, as ``benchmarks/train_step.py`` measures it); and the
*activation memory* as the growth of that peak and of the process's peak RSS from batch B/2 to
B (a second process at B/2; what does not depend on the batch cancels), i.e. the activations of
B/2 samples. Writes ``scaling.json``, ``scaling.md`` and ``scaling.png`` under ``--out``.

    python benchmarks/scaling.py --out docs/results/scaling          # the full run
    python benchmarks/scaling.py --quick --out /tmp/scaling          # batch ÷4, 1 timed step
    python benchmarks/scaling.py --tiny --inline --out /tmp/scaling  # smoke test (seconds)
    python benchmarks/scaling.py --axes resolution --labels "64×64" --out /tmp/r18  # one row

``POINCARE_RESNET_FC_RECOMPUTE=0`` in the environment keeps the FC outputs for batch norm's
backward (the behaviour before ``poincare_resnet.nn.conv_norm``), for before/after rows.

Load-independent check of one train step (instruction counts; ``valgrind`` needed)::

    python benchmarks/scaling.py --callgrind poincare_resnet18 --res 64 --batch 4

Run it alone: another busy process on the same cores distorts every time (not the memory).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _memory import profiled_peak_mib  # noqa: E402


@dataclass(frozen=True)
class Config:
    """One row: ``{family}_{model}`` built with ``kwargs``, a ``res×res`` batch of ``batch``."""

    axis: str
    model: str  # registered name without the family, e.g. "resnet18", "resnet20_w16"
    res: int
    batch: int
    kwargs: dict = field(default_factory=dict)
    label: str = ""

    def name(self, family: str) -> str:
        return f"{family}_{self.model}"


def _row(axis, model, res, batch, label, **kwargs) -> Config:
    return Config(axis, model, res, batch, kwargs, label)


#: the full run; the batch sizes keep each step to a few seconds on 2 cores
FULL = (
    _row("width", "resnet20", 32, 64, "ResNet-20 8-16-32"),
    _row("width", "resnet20_w16", 32, 64, "ResNet-20 16-32-64"),
    _row("width", "resnet18", 32, 64, "ResNet-18 64-…-512"),
    _row("depth", "resnet20", 32, 64, "ResNet-20"),
    _row("depth", "resnet110", 32, 64, "ResNet-110"),
    _row("depth", "resnet18", 32, 32, "ResNet-18"),
    _row("depth", "resnet50", 32, 32, "ResNet-50"),
    _row("resolution", "resnet18", 32, 64, "ResNet-18 32×32"),
    _row("resolution", "resnet18", 64, 64, "ResNet-18 64×64"),
    _row("resolution", "resnet18", 224, 16, "ResNet-18 224×224", stem="imagenet"),
    _row("resolution", "resnet50", 224, 8, "ResNet-50 224×224", stem="imagenet"),
)
#: the smoke test: one row per axis at toy sizes
TINY = (
    _row("width", "resnet20", 8, 4, "ResNet-8 4-4-8", depth=8, widths=[4, 4, 8]),
    _row("depth", "resnet20", 8, 4, "ResNet-14 4-4-8", depth=14, widths=[4, 4, 8]),
    _row(
        "resolution",
        "resnet18",
        32,
        4,
        "ResNet-18 4-4-4-4 32×32",
        widths=[4, 4, 4, 4],
        stem="imagenet",
    ),
)
FAMILIES = ("euclidean", "poincare")


# ------------------------------------------------------------------------------ one model


def _setup(name: str, kwargs: dict, res: int, batch: int, threads: int):
    """Model, optimizer, a random batch and the train step closure."""
    import torch

    from poincare_resnet import create_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_chans=3, **kwargs).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, res, res, generator=gen) * 2 - 1
    y = torch.randint(0, 10, (batch,), generator=gen)

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def live_bytes() -> int:
        state = [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)]
        live = [*model.parameters(), *model.buffers(), *state, x, y]
        return sum(t.numel() * t.element_size() for t in live)

    return model, opt, step, live_bytes


def measure(
    name: str, kwargs: dict, res: int, batch: int, steps: int, warmup: int, threads: int
) -> dict:
    """Median train-step time, allocator peak and peak-RSS growth of one model."""
    model, opt, step, live_bytes = _setup(name, kwargs, res, batch, threads)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    rss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    opt.zero_grad(set_to_none=True)  # the profiled step starts without gradients
    peak = live_bytes() / 2**20 + profiled_peak_mib(step)
    return {
        "train_ms": statistics.median(times) * 1000,
        "peak_mib": peak,
        "rss_growth_mib": rss,
        "params": sum(p.numel() for p in model.parameters()),
    }


def _child_main(args: argparse.Namespace) -> None:
    res = measure(
        args.name,
        json.loads(args.kwargs),
        args.res,
        args.batch,
        args.steps,
        args.warmup,
        args.threads,
    )
    print(json.dumps(res))


def _run_child(name: str, cfg: Config, batch: int, args: argparse.Namespace) -> dict:
    if args.inline:  # smoke tests only: no process isolation of memory
        return measure(name, cfg.kwargs, cfg.res, batch, args.steps, args.warmup, args.threads)
    cmd = [
        sys.executable,
        __file__,
        "--child",
        "--name",
        name,
        "--kwargs",
        json.dumps(cfg.kwargs),
        "--res",
        str(cfg.res),
        "--batch",
        str(batch),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"{name} ({cfg.label}) failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ the table


def _ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("nan")


def run_config(cfg: Config, args: argparse.Namespace) -> dict:
    """Both families at batch B and B/2 → one row of ratios."""
    row: dict = {**asdict(cfg)}
    half = max(cfg.batch // 2, 2)
    for fam in FAMILIES:
        full = _run_child(cfg.name(fam), cfg, cfg.batch, args)
        small = _run_child(cfg.name(fam), cfg, half, args)
        row[fam] = {
            **full,
            "act_peak_mib": full["peak_mib"] - small["peak_mib"],
            "act_rss_mib": full["rss_growth_mib"] - small["rss_growth_mib"],
        }
    e, p = row["euclidean"], row["poincare"]
    for key in ("train_ms", "peak_mib", "act_peak_mib", "act_rss_mib"):
        row[f"{key}_ratio"] = _ratio(p[key], e[key])
    return row


_COLUMNS = (
    ("train step (ms)", "train_ms", "{:.0f}"),
    ("allocator peak (MiB)", "peak_mib", "{:.0f}"),
    ("activations, allocator (MiB)", "act_peak_mib", "{:.0f}"),
    ("activations, peak RSS (MiB)", "act_rss_mib", "{:.0f}"),
)


def markdown(rows: list[dict], args: argparse.Namespace) -> str:
    """The table: per row Euclidean / Poincaré and the ratio of each measure."""
    head = (
        "| axis | model | input | batch B | "
        + " | ".join(f"{t} Eucl. / Poinc. | ratio" for t, _, _ in _COLUMNS)
        + " |"
    )
    lines = [
        f"Eager, native kernels, {args.threads} thread(s), medians of {args.steps} timed steps "
        f"after {args.warmup} warm-up; activations = growth from batch B/2 to B (the "
        "activations of B/2 samples).",
        "",
        head,
        "|" + "---|" * (4 + 2 * len(_COLUMNS)),
    ]
    for r in rows:
        stem = r["kwargs"].get("stem", "cifar")
        cells = [r["axis"], r["label"], f"{r['res']}×{r['res']} ({stem} stem)", str(r["batch"])]
        for _, key, fmt in _COLUMNS:
            e, p = r["euclidean"][key], r["poincare"][key]
            cells += [f"{fmt.format(e)} / {fmt.format(p)}", f"{r[key + '_ratio']:.2f}×"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """One panel per axis: the Poincaré / Euclidean ratios along it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    axes_names = list(dict.fromkeys(r["axis"] for r in rows))
    fig, axes = plt.subplots(1, len(axes_names), figsize=(5 * len(axes_names), 4), squeeze=False)
    for ax, axis in zip(axes[0], axes_names, strict=True):
        sub = [r for r in rows if r["axis"] == axis]
        xs = range(len(sub))
        for title, key, _ in _COLUMNS:
            ax.plot(xs, [r[key + "_ratio"] for r in sub], marker="o", label=title.split(" (")[0])
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xticks(list(xs), [r["label"] for r in sub], rotation=20, ha="right", fontsize=8)
        ax.set_title(f"Poincaré / Euclidean vs {axis}")
        ax.set_yscale("log")
        ax.set_ylabel("ratio")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------ callgrind


_MARKER_C = """#include <valgrind/callgrind.h>
void cg_start(void) { CALLGRIND_START_INSTRUMENTATION; }
void cg_stop(void) { CALLGRIND_STOP_INSTRUMENTATION; }
"""


def callgrind_marker(directory: str) -> ctypes.CDLL:
    """A two-function C library: ``cg_start()`` / ``cg_stop()`` are callgrind's
    ``CALLGRIND_START/STOP_INSTRUMENTATION`` client requests (no-ops outside valgrind), built
    with ``cc`` in ``directory``."""
    src, lib = os.path.join(directory, "cg_marker.c"), os.path.join(directory, "cg_marker.so")
    Path(src).write_text(_MARKER_C)
    subprocess.run(["cc", "-shared", "-fPIC", "-O1", "-o", lib, src], check=True)
    return ctypes.CDLL(lib)


def collected_step(step, marker: ctypes.CDLL) -> None:
    """``step()`` with instrumentation on: with ``--instr-atstart=no`` callgrind counts exactly
    the step (and runs the start-up and warm-up uninstrumented, several times faster)."""
    marker.cg_start()
    try:
        step()
    finally:
        marker.cg_stop()


def _callgrind_child(args: argparse.Namespace) -> None:
    _, _, step, _ = _setup(args.name, json.loads(args.kwargs), args.res, args.batch, 1)
    for _ in range(max(args.warmup, 1)):
        step()
    with tempfile.TemporaryDirectory() as tmp:
        collected_step(step, callgrind_marker(tmp))


def callgrind(name: str, kwargs: dict, res: int, batch: int, warmup: int) -> int:
    """Instructions of one train step of model ``name`` (after warm-up), by callgrind."""
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cg.out")
        cmd = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}",
            "--instr-atstart=no",
            sys.executable,
            __file__,
            "--callgrind-child",
            "--name",
            name,
            "--kwargs",
            json.dumps(kwargs),
            "--res",
            str(res),
            "--batch",
            str(batch),
            "--warmup",
            str(warmup),
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            sys.exit(f"callgrind of {name} failed:\n{proc.stderr[-3000:]}")
        for line in Path(out).read_text().splitlines():
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise RuntimeError("no instruction total in the callgrind output")


def _callgrind_main(args: argparse.Namespace) -> None:
    model = args.callgrind.split("_", 1)[1]
    kwargs = json.loads(args.kwargs)
    counts = {
        fam: callgrind(f"{fam}_{model}", kwargs, args.res, args.batch, args.warmup)
        for fam in FAMILIES
    }
    counts["ratio"] = counts["poincare"] / counts["euclidean"]
    print(json.dumps(counts))


# ------------------------------------------------------------------------------ main


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default="scaling-results", help="directory for json, md and png")
    p.add_argument("--quick", action="store_true", help="batch ÷ 4, 1 warm-up, 1 timed step")
    p.add_argument("--tiny", action="store_true", help="toy sizes: a smoke test")
    p.add_argument("--inline", action="store_true", help="no child processes (smoke tests)")
    p.add_argument("--axes", default="width,depth,resolution")
    p.add_argument(
        "--labels", default=None, help="only the rows whose label contains one of these (comma)"
    )
    p.add_argument("--steps", type=int, default=2, help="timed steps")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--callgrind",
        metavar="MODEL",
        default=None,
        help="instruction counts of one train step of the Euclidean and Poincaré "
        "MODEL (e.g. poincare_resnet18), one thread, under valgrind",
    )
    p.add_argument("--kwargs", default="{}", help="model options (JSON) for --callgrind")
    p.add_argument("--res", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--callgrind-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--name", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> list[dict] | None:
    args = _parser().parse_args(argv)
    if args.child:
        return _child_main(args)
    if args.callgrind_child:
        return _callgrind_child(args)
    if args.callgrind:
        return _callgrind_main(args)
    configs = [c for c in (TINY if args.tiny else FULL) if c.axis in args.axes.split(",")]
    if args.labels:
        configs = [c for c in configs if any(k in c.label for k in args.labels.split(","))]
    if args.quick or args.tiny:
        args.steps, args.warmup = 1, min(args.warmup, 1)
        configs = [replace(c, batch=max(c.batch // 4, 4)) for c in configs]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, done = [], {}
    for cfg in configs:  # a model measured on two axes runs once
        key = (cfg.model, cfg.res, cfg.batch, json.dumps(cfg.kwargs, sort_keys=True))
        if key not in done:
            done[key] = run_config(cfg, args)
        rows.append({**done[key], "axis": cfg.axis, "label": cfg.label})
        r = rows[-1]
        print(
            f"{cfg.axis:<10} {cfg.label:<26} time {r['train_ms_ratio']:.2f}x  peak "
            f"{r['peak_mib_ratio']:.2f}x  activations {r['act_peak_mib_ratio']:.2f}x "
            f"(RSS {r['act_rss_mib_ratio']:.2f}x)",
            flush=True,
        )
    (out / "scaling.json").write_text(json.dumps(rows, indent=2))
    (out / "scaling.md").write_text(markdown(rows, args))
    plot(rows, out / "scaling.png")
    print(markdown(rows, args))
    return rows


if __name__ == "__main__":
    main()
