"""One-GPU smoke check in a few minutes: train steps (fp32, bf16, fp16 autocast), torch.compile,
NaN-freedom and throughput of a Poincaré ResNet vs a Euclidean one; prints its figures.

    python benchmarks/gpu_check.py                  # on the first CUDA device
    python benchmarks/gpu_check.py --device cpu --batch 16 --steps 3    # dry run without a GPU
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from poincare_resnet import create_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_case(
    name: str, device: torch.device, batch: int, steps: int, precision: str, compile_model: bool
) -> dict:
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_chans=3).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    run = torch.compile(model) if compile_model else model
    x = torch.rand(batch, 3, 32, 32, device=device) * 2 - 1
    y = torch.randint(0, 10, (batch,), device=device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    losses, times = [], []
    t_compile = time.perf_counter()
    for i in range(steps + 2):
        _sync(device)
        t = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = F.cross_entropy(run(x).float(), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        _sync(device)
        if i == 1:
            t_compile = time.perf_counter() - t_compile
        if i >= 2:
            times.append(time.perf_counter() - t)
        losses.append(float(loss))
    times.sort()
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "model": name,
        "precision": precision,
        "compile": compile_model,
        "step_ms": 1000 * times[len(times) // 2],
        "first_two_steps_s": t_compile,
        "images_per_s": batch / times[len(times) // 2],
        "finite": all(map(_finite, losses)),
        "loss_first": losses[0],
        "loss_last": losses[-1],
        "peak_mib": peak,
    }


def _finite(v: float) -> bool:
    return v == v and abs(v) != float("inf")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        print(torch.cuda.get_device_name(device), "| torch", torch.__version__)
    rows = []
    cases = [
        (m, prec, False)
        for m in ("euclidean_resnet20", "poincare_resnet20")
        for prec in ("fp32", "bf16", "fp16")
    ]
    if not args.no_compile:
        cases += [("euclidean_resnet20", "fp32", True), ("poincare_resnet20", "fp32", True)]
    for name, precision, comp in cases:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            row = run_case(name, device, args.batch, args.steps, precision, comp)
        except Exception as exc:  # report and go on: this is a smoke check
            row = {"model": name, "precision": precision, "compile": comp, "error": repr(exc)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    print("\n| model | precision | compile | step ms | img/s | finite | peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            err = r["error"][:60]
            print(f"| {r['model']} | {r['precision']} | {r['compile']} | error: {err} |")
            continue
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.0f}"
        print(
            f"| {r['model']} | {r['precision']} | {r['compile']} | {r['step_ms']:.1f} | "
            f"{r['images_per_s']:.0f} | {r['finite']} | {peak} |"
        )


if __name__ == "__main__":
    main()
