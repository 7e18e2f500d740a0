"""Benchmark the Poincaré layers against their Euclidean counterparts (float32, CPU).

Configurations, each on a batch of shape ``[128, C, 32, 32]`` for C = 16 and 32 (C → C, 3×3,
padding 1), forward + backward (gradients w.r.t. the input and every parameter, train mode):

* ``block``: ``PoincareConv2d → PoincareBatchNorm2d → TangentReLU`` vs
  ``nn.Conv2d → nn.BatchNorm2d → nn.ReLU``, eager and under ``torch.compile`` (inductor);
* ``conv``: ``PoincareConv2d`` (fused: one conv2d, a box sum, element-wise FC map) vs the
  straightforward unfold construction (``F.unfold`` → β-scale → ``ball.expmap0`` →
  ``ball.fully_connected`` → ``ball.logmap0`` → reshape, written below, not in the package), with
  ``nn.Conv2d`` for scale; eager.

Method:

* **time**: median over ``--repeats`` runs of forward + ``backward`` after ``--warmup`` runs (the
  first warm-up run of a compiled module compiles it), timed with ``time.perf_counter``, with
  ``torch.set_num_threads(--threads)``. A configuration stops after 3 timed runs once
  ``--budget`` seconds of timed runs are spent (the unfold reference takes seconds a run); the
  table's ``n`` column gives the runs behind each median.
* **peak memory**: every configuration runs in a fresh subprocess (this script re-invoked with
  ``--child``). The first warm-up run after compilation runs under
  ``torch.profiler.profile(profile_memory=True)``. While it profiles, PyTorch's CPU allocator
  reports every allocation and free with the running total of the bytes allocated *since the
  profiler started*; the peak of that total is the peak tensor memory of one step above the live
  inputs and parameters (activations saved for backward, temporaries, gradients), independent of
  the compiler's own memory and of what glibc keeps mapped. Buffers allocated outside PyTorch's
  allocator (e.g. oneDNN scratch space) are not counted.

Prints a Markdown table with absolute numbers and the Poincaré / Euclidean ratios (for the
``conv`` rows: unfold reference / fused, and fused / ``nn.Conv2d``). Timings are wall clock on a
possibly shared machine. Run e.g. ``python benchmarks/layers.py --repeats 10 --threads 2``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _memory import trace_peak_mib

BATCH, SIZE, KERNEL = 128, 32, 3
CURVATURE = 0.1


# ------------------------------------------------------------------------------ modules


def _unfold_conv_class():
    import torch.nn.functional as F
    from torch import nn

    from poincare_resnet import ball

    class UnfoldPoincareConv2d(nn.Module):
        """Reference β-concatenation convolution with the parameters of a ``PoincareConv2d``."""

        def __init__(self, conv) -> None:
            super().__init__()
            self.conv = conv

        def forward(self, u):
            conv = self.conv
            c = conv.curvature()
            (kh, kw), stride, padding = conv.kernel_size, conv.stride, conv.padding
            b, _, h, w = u.shape
            h_out = (h + 2 * padding[0] - kh) // stride[0] + 1
            w_out = (w + 2 * padding[1] - kw) // stride[1] + 1
            patches = F.unfold(u, (kh, kw), padding=padding, stride=stride) * conv.scale
            x = ball.expmap0(patches, c=c, dim=1)
            y = ball.fully_connected(x, conv.weight.flatten(1), conv.bias, c=c, dim=1)
            return ball.logmap0(y, c=c, dim=1).reshape(b, conv.out_channels, h_out, w_out)

    return UnfoldPoincareConv2d


def _build(kind: str, channels: int):
    from torch import nn

    from poincare_resnet.nn import PoincareBatchNorm2d, PoincareConv2d, TangentReLU

    def pconv():
        return PoincareConv2d(channels, channels, KERNEL, padding=1, c=CURVATURE, init="hnn")

    if kind == "poincare_block":
        return nn.Sequential(pconv(), PoincareBatchNorm2d(channels, c=CURVATURE), TangentReLU())
    if kind == "euclid_block":
        return nn.Sequential(
            nn.Conv2d(channels, channels, KERNEL, padding=1),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
        )
    if kind == "poincare_conv":
        return pconv()
    if kind == "unfold_conv":
        return _unfold_conv_class()(pconv())
    if kind == "euclid_conv":
        return nn.Conv2d(channels, channels, KERNEL, padding=1)
    raise ValueError(f"unknown configuration {kind!r}")


# ------------------------------------------------------------------------------ child


def _child(spec: dict) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    module = _build(spec["kind"], spec["channels"]).train()
    step_module = torch.compile(module) if spec["compile"] else module
    gen = torch.Generator().manual_seed(1)
    u = (torch.randn(BATCH, spec["channels"], SIZE, SIZE, generator=gen) * 0.5).requires_grad_()
    params = list(module.parameters())

    def step():
        for p in [u, *params]:
            p.grad = None
        out = step_module(u)
        out.backward(torch.ones_like(out))

    t0 = time.perf_counter()
    if spec["compile"]:
        step()  # compiles
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    first = time.perf_counter() - t0
    for _ in range(spec["warmup"] - 1 - int(spec["compile"])):
        step()
    times: list[float] = []
    t_loop = time.perf_counter()
    while len(times) < spec["repeats"]:
        if len(times) >= min(3, spec["repeats"]) and time.perf_counter() - t_loop > spec["budget"]:
            break  # slow configuration: stop after 3 runs once the time budget is spent
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {
        "ms": statistics.median(times) * 1e3,
        "n": len(times),
        "first_s": first,
        "peak_mib": trace_peak_mib(prof),
    }


# ------------------------------------------------------------------------------ parent


def _run(spec: dict) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {spec} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}×" if b > 0 else "n/a"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10, help="timed runs (median reported)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs first (>= 1)")
    parser.add_argument(
        "--budget", type=float, default=10.0, help="seconds of timed runs per configuration"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile rows")
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return

    base = {
        "repeats": max(1, args.repeats),
        "warmup": max(1, args.warmup),
        "threads": args.threads,
        "budget": args.budget,
    }
    t_start = time.perf_counter()
    rows = []

    def measure(kind: str, channels: int, compiled: bool) -> dict:
        spec = {**base, "kind": kind, "channels": channels, "compile": compiled}
        res = _run(spec)
        tag = " (compiled)" if compiled else ""
        print(
            f"  {kind}{tag} C={channels}: {res['ms']:.1f} ms (n={res['n']}), "
            f"{res['peak_mib']:.1f} MiB (first run{' incl. compile' if compiled else ''} "
            f"{res['first_s']:.1f} s)",
            file=sys.stderr,
        )
        return res

    for channels in args.channels:
        for compiled in [False] if args.no_compile else [False, True]:
            p = measure("poincare_block", channels, compiled)
            e = measure("euclid_block", channels, compiled)
            mode = "compiled" if compiled else "eager"
            rows.append(
                (
                    f"block {channels}→{channels}",
                    mode,
                    "Poincaré conv+BN+ReLU",
                    p,
                    "nn conv+BN+ReLU",
                    e,
                )
            )
        fused = measure("poincare_conv", channels, False)
        unfold = measure("unfold_conv", channels, False)
        euclid = measure("euclid_conv", channels, False)
        rows.append(
            (
                f"conv {channels}→{channels}",
                "eager",
                "unfold reference",
                unfold,
                "PoincareConv2d (fused)",
                fused,
            )
        )
        rows.append(
            (
                f"conv {channels}→{channels}",
                "eager",
                "PoincareConv2d (fused)",
                fused,
                "nn.Conv2d",
                euclid,
            )
        )

    print(
        f"\nforward+backward, float32, batch {BATCH}, {SIZE}×{SIZE}, 3×3 pad 1, "
        f"threads={args.threads}, median of {args.repeats} (after {base['warmup']} warm-up); "
        "peak = tensor memory of one step above inputs/params (torch.profiler)\n"
    )
    print("| layer | mode | A | A ms (n) | A MiB | B | B ms (n) | B MiB | time A/B | memory A/B |")
    print("|---|---|---|---:|---:|---|---:|---:|---:|---:|")
    for name, mode, a_name, a, b_name, b in rows:
        print(
            f"| {name} | {mode} | {a_name} | {a['ms']:.1f} ({a['n']}) | {a['peak_mib']:.1f} | "
            f"{b_name} | {b['ms']:.1f} ({b['n']}) | {b['peak_mib']:.1f} | "
            f"{_ratio(a['ms'], b['ms'])} | {_ratio(a['peak_mib'], b['peak_mib'])} |"
        )
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
