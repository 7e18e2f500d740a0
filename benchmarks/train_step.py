"""Poincaré vs Euclidean ResNet: eval forward, full train step and peak memory, in one run.

Each (model, mode) is measured in its own fresh process (so peak memory and caches don't leak
between them): Adam, cross-entropy, random CIFAR-shaped data, warm-up steps excluded, the median
of ``--repeats`` timed steps. Peak memory is the peak of the tensors a train step holds: on CUDA
``torch.cuda.max_memory_allocated``; on CPU its analogue from PyTorch's allocator — the live
parameters, optimizer state and batch plus the peak extra tensor memory of one profiled train step
after warm-up (activations saved for backward, gradients, temporaries; ``benchmarks/_memory.py``).
The *activation memory* of B samples is the growth of each measure from batch B to 2B (two
more child processes), which cancels what does not depend on the batch; by the allocator, and
by the resident set: the peak resident memory one train step adds, in one more child process
that maps every buffer of 128 KiB or more on its own from its start (so that freed tensors
leave the resident set; ``_memory.step_rss_mib``; without ``--no-act-memory`` only). That one
also counts buffers allocated outside PyTorch's allocator. The JSON keeps the old measure too
(``maxrss_growth_mib``: the growth of ``ru_maxrss`` over the whole run from before the first
step): it mixes in the compiler's peak during the first compiled step and glibc's heap
fragmentation, which differ between eager and each compiled graph (docs/performance.md).

``--path native`` (default) runs the native CPU kernels where they apply; ``--path torch``
switches them off, so every Poincaré layer runs the PyTorch path a GPU runs (hand-written
autograd Functions of ``nn/_torch_batchnorm.py``, ``nn/_torch_residual.py``, the FC map's).
On CUDA the steps are timed with CUDA events.

    python benchmarks/train_step.py            # ResNet-20/32, widths 8-16-32 and 16-32-64
    python benchmarks/train_step.py --depths 20 --widths 8-16-32 --no-compile --repeats 5
    python benchmarks/train_step.py --path torch --depths 20 --widths 8-16-32
    python benchmarks/train_step.py --path torch --modes compile --compile-options default

Compiled rows use ``poincare_resnet.nn.compile.compile_model`` for the Poincaré model (inductor's
layout optimisation off, the partitioner's recompute bans lifted; ``--compile-options``). In
both modes ``conv_norm`` recomputes each Poincaré convolution's FC output in batch norm's
backward (compiled, on the native path: by selective checkpointing);
``POINCARE_RESNET_FC_RECOMPUTE=0`` keeps it, for before/after rows.

Run it alone: another busy process on the same cores distorts every number.
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

from _memory import mmap_large_buffers, profiled_peak_mib, step_rss_mib


def _child(args: argparse.Namespace) -> None:
    if args.rss_child:  # before the first tensor (``_memory``'s docstring)
        mmap_large_buffers()
    import torch

    from poincare_resnet import _cpp, create_model

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.native is not None:
        _cpp.set_native(args.native == "on")
    widths = tuple(int(w) for w in args.w.split("-"))
    model = create_model(  # resnet20's class at any depth 6n + 2 (e.g. 8: one block a stage)
        f"{args.family}_resnet20", num_classes=10, in_chans=3, widths=widths, depth=args.depth
    ).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(0)
    x = (torch.rand(args.batch, 3, 32, 32, generator=gen) * 2 - 1).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=gen).to(device)
    run_model = _compiled(model, args) if args.mode == "compile" else model

    def train_step() -> None:
        loss = torch.nn.functional.cross_entropy(run_model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def eval_step() -> None:
        with torch.no_grad():
            run_model(x)

    def tensor_bytes() -> int:
        state = [t for st in opt.state.values() for t in st.values() if torch.is_tensor(t)]
        live = [*model.parameters(), *model.buffers(), *state, x, y]
        return sum(t.numel() * t.element_size() for t in live)

    def timed(fn, n: int) -> list[float]:
        out = []
        for _ in range(n):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(True)
                start.record()
                fn()
                end.record()
                torch.cuda.synchronize()
                out.append(start.elapsed_time(end) / 1000)
            else:
                t = time.perf_counter()
                fn()
                out.append(time.perf_counter() - t)
        return out

    if args.rss_child:  # warm-up (compiling, if compiled), then the one measured step
        model.train()
        timed(train_step, max(args.warmup, 2))
        opt.zero_grad(set_to_none=True)
        print(json.dumps({"step_rss_mib": step_rss_mib(train_step)}))
        return
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()
    t0 = time.perf_counter()
    timed(train_step, args.warmup)
    warm_s = time.perf_counter() - t0
    _run_hook("BENCH_BEFORE_TIMING")  # e.g. pause other jobs once compilation is done
    train = timed(train_step, args.repeats)
    maxrss = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        opt.zero_grad(set_to_none=True)  # the profiled step starts without gradients
        peak = tensor_bytes() / 2**20 + profiled_peak_mib(train_step)
    model.eval()
    timed(eval_step, args.warmup)
    forward = timed(eval_step, args.repeats)
    _run_hook("BENCH_AFTER_TIMING")
    print(
        json.dumps(
            {
                "train_ms": statistics.median(train) * 1000,
                "forward_ms": statistics.median(forward) * 1000,
                "peak_mib": peak,
                "step_rss_mib": None,
                "maxrss_growth_mib": maxrss,
                "warmup_s": warm_s,
            }
        )
    )


def _run_child(cmd: list[str], args: argparse.Namespace) -> dict:
    """Run one child process; its JSON line."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd[2:])} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _run_hook(name: str) -> None:
    """Run the shell command in the environment variable ``name``, if set: on a shared machine
    ``BENCH_BEFORE_TIMING`` / ``BENCH_AFTER_TIMING`` can pause other jobs for the timed steps
    only (a compiled model's first steps compile for minutes), e.g.
    ``BENCH_BEFORE_TIMING='pkill -STOP -f my-job' BENCH_AFTER_TIMING='pkill -CONT -f my-job'``."""
    cmd = os.environ.get(name)
    if cmd:
        subprocess.run(cmd, shell=True, check=False)


def _compiled(model, args: argparse.Namespace):
    """The model under ``torch.compile``: with :func:`poincare_resnet.nn.compile.compile_model`'s
    settings for the Poincaré model (``--compile-options tuned``, the default) or for both
    models (``tuned-both``), torch's defaults otherwise (``default``)."""
    import torch

    from poincare_resnet.nn.compile import compile_model

    tuned = args.compile_options == "tuned-both" or (
        args.compile_options == "tuned" and args.family == "poincare"
    )
    return compile_model(model) if tuned else torch.compile(model)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--depths", default="20,32")
    p.add_argument("--widths", default="8-16-32,16-32-64")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--modes", default="eager,compile")
    p.add_argument("--no-compile", action="store_true", help="eager mode only")
    p.add_argument(
        "--compile-options",
        choices=("tuned", "default", "tuned-both"),
        default="tuned",
        help="compile mode: tuned = the Poincaré model with poincare_resnet.nn.compile's "
        "settings, the Euclidean one with torch's defaults; default = torch's defaults for "
        "both; tuned-both = the settings for both",
    )
    p.add_argument(
        "--path",
        choices=("native", "torch"),
        default=None,
        help="native: the C++ CPU kernels where they apply (default); torch: native kernels "
        "off, the PyTorch (GPU) path",
    )
    p.add_argument("--native", choices=("on", "off"), default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--no-act-memory",
        action="store_true",
        help="skip the batch-2B runs that measure activation memory",
    )
    p.add_argument("--json", default=None, help="also write the rows to this file")
    # child-process arguments
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--family", help=argparse.SUPPRESS)
    p.add_argument("--depth", type=int, help=argparse.SUPPRESS)
    p.add_argument("--w", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--rss-child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        _child(args)
        return
    if args.path is not None:
        args.native = "on" if args.path == "native" else "off"
    modes = ["eager"] if args.no_compile else args.modes.split(",")
    rows = []
    for depth in [int(d) for d in args.depths.split(",")]:
        for widths in args.widths.split(","):
            for mode in modes:
                res, res2 = {}, {}
                for family, batch in _runs(args):
                    cmd = [
                        sys.executable,
                        __file__,
                        "--child",
                        "--family",
                        family,
                        "--depth",
                        str(depth),
                        "--w",
                        widths,
                        "--mode",
                        mode,
                        "--batch",
                        str(batch),
                        "--repeats",
                        str(args.repeats),
                        "--warmup",
                        str(args.warmup),
                        "--threads",
                        str(args.threads),
                        "--device",
                        args.device,
                        "--compile-options",
                        args.compile_options,
                    ]
                    if args.native:
                        cmd += ["--native", args.native]
                    row_out = _run_child(cmd, args)
                    if args.device == "cpu" and not args.no_act_memory:  # a process of its own
                        row_out["step_rss_mib"] = _run_child(cmd + ["--rss-child"], args)[
                            "step_rss_mib"
                        ]
                    (res if batch == args.batch else res2)[family] = row_out
                e, h = res["euclidean"], res["poincare"]
                row = {
                    "model": f"ResNet-{depth} ({widths})",
                    "mode": mode,
                    "compile_options": args.compile_options if mode == "compile" else None,
                    "eucl_train_ms": e["train_ms"],
                    "poinc_train_ms": h["train_ms"],
                    "train_ratio": h["train_ms"] / e["train_ms"],
                    "eucl_fwd_ms": e["forward_ms"],
                    "poinc_fwd_ms": h["forward_ms"],
                    "fwd_ratio": h["forward_ms"] / e["forward_ms"],
                    "eucl_peak_mib": e["peak_mib"],
                    "poinc_peak_mib": h["peak_mib"],
                    "mem_ratio": h["peak_mib"] / max(e["peak_mib"], 1e-9),
                    "eucl_step_rss_mib": e["step_rss_mib"],
                    "poinc_step_rss_mib": h["step_rss_mib"],
                }
                if res2:  # activation memory: growth from batch B to 2B
                    for key, fam in (("eucl", "euclidean"), ("poinc", "poincare")):
                        big, small = res2[fam], res[fam]
                        for kind, measure in _ACT_MEASURES.items():
                            if big[measure] is not None:
                                row[f"{key}_act_{kind}_mib"] = big[measure] - small[measure]
                    for kind in [k for k in _ACT_MEASURES if f"eucl_act_{k}_mib" in row]:
                        row[f"act_{kind}_ratio"] = row[f"poinc_act_{kind}_mib"] / max(
                            row[f"eucl_act_{kind}_mib"], 1e-9
                        )
                rows.append(row)
                print(_fmt_row(row), flush=True)
    print()
    print(_table(rows, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


# activation memory (growth from batch B to 2B): row key -> measure of the child process
_ACT_MEASURES = {"rss": "step_rss_mib", "peak": "peak_mib", "maxrss": "maxrss_growth_mib"}


def _runs(args) -> list[tuple[str, int]]:
    """(family, batch) of each child process: batch B, and 2B for the activation memory."""
    batches = [args.batch] if args.no_act_memory else [args.batch, 2 * args.batch]
    return [(family, b) for b in batches for family in ("euclidean", "poincare")]


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        return False


def _fmt_row(r: dict) -> str:
    line = (
        f"{r['model']:<22} {r['mode']:<8} train {r['eucl_train_ms']:7.1f} / "
        f"{r['poinc_train_ms']:7.1f} ms ({r['train_ratio']:.2f}x)  fwd {r['eucl_fwd_ms']:6.1f} / "
        f"{r['poinc_fwd_ms']:6.1f} ms ({r['fwd_ratio']:.2f}x)  peak {r['eucl_peak_mib']:6.0f} / "
        f"{r['poinc_peak_mib']:6.0f} MiB ({r['mem_ratio']:.2f}x)"
    )
    if "act_peak_ratio" in r:
        line += "  activations (B -> 2B)" + "".join(
            f" {name} {r[f'eucl_act_{kind}_mib']:.0f} / {r[f'poinc_act_{kind}_mib']:.0f} MiB "
            f"({r[f'act_{kind}_ratio']:.2f}x)"
            for kind, name in (("rss", "RSS"), ("peak", "allocator"), ("maxrss", "ru_maxrss"))
            if f"act_{kind}_ratio" in r
        )
    return line


def _table(rows: list[dict], args) -> str:
    path = {"on": "native", "off": "torch"}.get(args.native, "native")
    head = (
        f"batch {args.batch}, path {path}, {args.threads} threads, device {args.device}, "
        f"medians of {args.repeats} steps after {args.warmup} warm-up steps, compile options "
        f"{args.compile_options}\n\n"
        "| model | mode | train step Eucl. / Poinc. (ms) | ratio | eval fwd Eucl. / Poinc. "
        "(ms) | ratio | peak mem Eucl. / Poinc. (MiB) | ratio | activations (B → 2B, step RSS) "
        "Eucl. / Poinc. (MiB) | ratio | activations (B → 2B, allocator) Eucl. / Poinc. (MiB) "
        "| ratio |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [head]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['mode']} | "
            f"{r['eucl_train_ms']:.0f} / {r['poinc_train_ms']:.0f} | "
            f"{r['train_ratio']:.2f}× | {r['eucl_fwd_ms']:.1f} / {r['poinc_fwd_ms']:.1f} | "
            f"{r['fwd_ratio']:.2f}× | {r['eucl_peak_mib']:.0f} / {r['poinc_peak_mib']:.0f} | "
            f"{r['mem_ratio']:.2f}× | " + " ".join(_act_cells(r, kind) for kind in ("rss", "peak"))
        )
    return "\n".join(lines)


def _act_cells(r: dict, kind: str) -> str:
    """The two table cells of one activation-memory measure (``–`` where not measured)."""
    if f"act_{kind}_ratio" not in r:
        return "– | – |"
    return (
        f"{r[f'eucl_act_{kind}_mib']:.0f} / {r[f'poinc_act_{kind}_mib']:.0f} | "
        f"{r[f'act_{kind}_ratio']:.2f}× |"
    )


if __name__ == "__main__":
    main()
