"""Benchmark the hand-written backward passes of the Poincaré-ball ops against plain autograd.

For each custom op — ``expmap0``, ``logmap0``, ``mobius_add`` and the tangent-form FC map with
16 → 16 features (the contraction ⟨p, ẑ_k⟩ as a matmul, then :func:`ball.fc_tangent`, as in
``PoincareLinear``) — on a float32 batch of shape (128·32·32, 16) (a CIFAR-sized feature map of
16 channels, flattened), this script measures, with the manual backward passes
(``ball.manual_backward(True)``) and with plain autograd (``ball.manual_backward(False)``):

* **time**: forward + backward (``torch.autograd.grad`` w.r.t. every input), median over
  ``--repeats`` runs after ``--warmup`` runs, timed with ``time.perf_counter``;
* **peak memory**: each (op, mode) runs in a fresh subprocess (this script re-invoked with the
  hidden ``--child OP MODE`` arguments). The child runs the op once on a 64-row batch (so code
  pages and thread pools are resident), allocates its inputs, takes a baseline of
  ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (the process's peak resident set size so far),
  runs the warm-up iterations and reports the increase of ``ru_maxrss`` over the baseline: the
  peak extra host memory of forward + backward (tensors saved for backward, temporaries,
  gradients). During this phase glibc's mmap threshold is fixed at 128 KiB (``mallopt``), so
  every tensor buffer is its own mapping, unmapped when freed, and RSS follows the live tensors
  (by default glibc raises the threshold after the first free and serves later buffers from a
  heap that keeps freed pages). The timed runs follow with a high threshold, i.e. heap buffers
  reused as in glibc's default steady state. A fresh process per measurement keeps the runs from
  inheriting each other's peaks. Resolution is a page (4 KiB); ``ru_maxrss`` is in KiB on Linux
  (bytes on macOS, handled; there, without ``mallopt``, the figures are less exact).

Prints a Markdown table: op | manual ms | autograd ms | speed ratio (autograd ms / manual ms, >1
means the manual backward is faster) | manual MiB | autograd MiB | memory ratio (autograd MiB /
manual MiB, >1 means the manual backward needs less memory).

Timings are wall-clock on a possibly shared machine: other processes running at the same time
inflate them. Run e.g. ``python benchmarks/ops.py --repeats 10 --threads 2``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

from _memory import M_MMAP_THRESHOLD, M_TRIM_THRESHOLD
from _memory import mallopt as _mallopt

OPS = ("expmap0", "logmap0", "mobius_add", "fc_tangent")
MODES = ("manual", "autograd")
N_ROWS = 128 * 32 * 32
FEATURES = 16


def _maxrss_mib() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


def _make_case(op: str, c: float, rows: int = N_ROWS):
    """Inputs (leaf tensors requiring grad) and the function of them to benchmark."""
    import torch

    from poincare_resnet import ball

    g = torch.Generator().manual_seed(0)

    def tangent(scale: float) -> torch.Tensor:
        return torch.randn(rows, FEATURES, generator=g) * scale

    with torch.no_grad(), ball.manual_backward(True):
        if op == "expmap0":
            inputs = [tangent(0.5)]

            def fn(v):
                return ball.expmap0(v, c=c)
        elif op == "logmap0":
            inputs = [ball.expmap0(tangent(0.5), c=c)]

            def fn(x):
                return ball.logmap0(x, c=c)
        elif op == "mobius_add":
            inputs = [ball.expmap0(tangent(0.5), c=c), ball.expmap0(tangent(0.5), c=c)]

            def fn(x, y):
                return ball.mobius_add(x, y, c=c)
        elif op == "fc_tangent":
            weight = torch.randn(FEATURES, FEATURES, generator=g) / FEATURES**0.5
            bias = torch.randn(FEATURES, generator=g) * 0.1
            inputs = [tangent(0.5), weight, bias]

            def fn(p, w, b):
                znorm = w.norm(dim=1).clamp_min(ball.MIN_NORM)
                dots = p @ (w / znorm[:, None]).t()
                sq = p.pow(2).sum(-1, keepdim=True)
                return ball.fc_tangent(dots, sq, znorm, b, c=c)
        else:
            raise ValueError(f"unknown op {op!r}; choose from {OPS}")
    inputs = [t.contiguous().requires_grad_(True) for t in inputs]
    return inputs, fn


def _child(op: str, mode: str, repeats: int, warmup: int, threads: int, c: float) -> dict:
    import gc

    import torch

    from poincare_resnet import ball

    # memory phase: every buffer ≥ 128 KiB is its own mapping, unmapped when freed
    exact_rss = _mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    torch.set_num_threads(threads)
    with ball.manual_backward(mode == "manual"):
        # run the op once on a small batch first: the kernels' code pages of libtorch and the
        # thread pool then count towards the baseline, not towards the op's peak
        small, small_fn = _make_case(op, c, rows=64)
        torch.autograd.grad(small_fn(*small), small, torch.ones(64, FEATURES))
    inputs, fn = _make_case(op, c)
    upstream = torch.randn(N_ROWS, FEATURES, generator=torch.Generator().manual_seed(1))
    gc.collect()
    baseline = _maxrss_mib()

    def step() -> None:
        out = fn(*inputs)
        grads = torch.autograd.grad(out, inputs, upstream)
        del out, grads

    times = []
    with ball.manual_backward(mode == "manual"):
        for _ in range(max(warmup, 1)):
            step()
        peak = max(_maxrss_mib() - baseline, 0.0)
        # timing phase: buffers from the heap and reused, as in glibc's default steady state
        # (its dynamic threshold grows past the tensor size after the first free)
        _mallopt(M_MMAP_THRESHOLD, 32 * 2**20)
        _mallopt(M_TRIM_THRESHOLD, 2**30)
        for i in range(warmup + repeats):
            t0 = time.perf_counter()
            step()
            t1 = time.perf_counter()
            if i >= warmup:
                times.append((t1 - t0) * 1e3)
    return {
        "op": op,
        "mode": mode,
        "ms": statistics.median(times),
        "mib": peak,
        "exact_rss": exact_rss,
        "input_mib": sum(t.numel() * t.element_size() for t in inputs) / 2**20,
    }


def _run_child(op: str, mode: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        op,
        mode,
        "--repeats",
        str(args.repeats),
        "--warmup",
        str(args.warmup),
        "--threads",
        str(args.threads),
        "--c",
        str(args.c),
    ]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {op}/{mode} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _table(results: dict[tuple[str, str], dict]) -> str:
    lines = [
        "| op | manual ms | autograd ms | speed ratio | manual MiB | autograd MiB | memory ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for op in dict.fromkeys(op for op, _ in results):
        m, a = results[op, "manual"], results[op, "autograd"]
        mem_ratio = a["mib"] / m["mib"] if m["mib"] > 0 else float("inf")
        name = f"fc_tangent {FEATURES}→{FEATURES}" if op == "fc_tangent" else op
        lines.append(
            f"| {name} | {m['ms']:.1f} | {a['ms']:.1f} | {a['ms'] / m['ms']:.2f}× | "
            f"{m['mib']:.1f} | {a['mib']:.1f} | {mem_ratio:.2f}× |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed runs (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--c", type=float, default=1.0, help="curvature")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--child", nargs=2, metavar=("OP", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or args.threads < 1:
        parser.error("--repeats and --threads must be ≥ 1, --warmup ≥ 0")

    if args.child:
        op, mode = args.child
        if mode not in MODES:
            parser.error(f"mode must be one of {MODES}")
        result = _child(op, mode, args.repeats, args.warmup, args.threads, args.c)
        print(json.dumps(result))
        return

    import torch

    results = {}
    for op in args.ops:
        for mode in MODES:
            results[op, mode] = _run_child(op, mode, args)
    in_mib = results[args.ops[0], "manual"]["input_mib"]
    print(
        f"float32 batch ({N_ROWS}, {FEATURES}) = {in_mib:.0f} MiB per input, c = {args.c}, "
        f"torch {torch.__version__}, {args.threads} thread(s), median of {args.repeats} runs "
        f"after {args.warmup} warm-up; memory = peak RSS increase over the inputs (fresh process "
        "per row and mode). Other processes may have been running.\n"
    )
    print(_table(results))


if __name__ == "__main__":
    main()
