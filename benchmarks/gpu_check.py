"""The GPU checklist in one run: writes a JSON table and prints it as markdown.

1. ``layers``: every layer and a Poincaré ResNet on the device (float32) against the same
   weights and inputs on the CPU in float64: values, input gradients and parameter gradients
   (normwise relative error ``‖a − b‖ / ‖b‖``).
2. ``train``: training steps of a Poincaré and a Euclidean ResNet through the trainer's own
   :func:`~poincare_resnet.training.trainer.train_step`: eager and compiled fp32, bf16, fp16
   (with its GradScaler). Time per step from CUDA events (median), peak memory from
   ``torch.cuda.max_memory_allocated``, whether every loss is finite, and whether the steps
   run under ``torch.cuda.set_sync_debug_mode("error")`` (no host sync).
3. ``triton``: the Triton kernels (``poincare_resnet.nn._triton``: ``fc_tangent``, ``batchnorm``,
   ``residual``) against the PyTorch path on the arguments the layers pass, values and
   gradients, and their forward+backward times; skipped when the module is absent.

    python benchmarks/gpu_check.py                      # on the first CUDA device
    python benchmarks/gpu_check.py --device cpu         # quick CPU smoke mode (CI runs it)

Exit status: 0 when every check passed, 1 when one failed, 2 when CUDA was asked for and
there is none.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from poincare_resnet import create_model
from poincare_resnet.nn import (
    PoincareBatchNorm2d,
    PoincareConv2d,
    PoincareGlobalAvgPool2d,
    PoincareLinear,
    PoincareMLR,
    PoincareResidual,
    TangentReLU,
)
from poincare_resnet.training.distributed import DistInfo
from poincare_resnet.training.trainer import (
    StepState,
    TrainConfig,
    build_optimizer,
    make_grad_scaler,
    train_step,
)

VALUE_TOL = 1e-4  # float32 on the device vs float64 on the CPU, normwise relative
GRAD_TOL = 1e-3
TRITON_TOL = 1e-5  # the Triton kernels vs the PyTorch path, both float32 on the device
TRITON_MODULES = ("poincare_resnet.nn._triton", "poincare_resnet._triton")


@dataclass
class Sizes:
    """Problem sizes: the full check on a GPU, a tiny one for the CPU smoke mode."""

    batch: int
    image: int
    channels: int
    steps: int
    depth: int


FULL = Sizes(batch=128, image=32, channels=16, steps=20, depth=20)
SMOKE = Sizes(batch=4, image=8, channels=4, steps=2, depth=8)


def rel_err(a: Tensor, b: Tensor) -> float:
    """Normwise relative error ``‖a − b‖ / max(‖b‖, tiny)`` in float64."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _perturb(module: nn.Module, seed: int) -> None:
    """Move every parameter off its (often identity) initialisation."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


# ------------------------------------------------------------------------------ 1. layers


def _layer_cases(s: Sizes) -> list[tuple[str, Callable[[], nn.Module], list[tuple[int, ...]]]]:
    c, b, hw = s.channels, s.batch, s.image
    img = (b, c, hw, hw)
    return [
        ("PoincareConv2d 3x3", lambda: PoincareConv2d(c, 2 * c, 3, padding=1), [img]),
        ("PoincareConv2d 3x3 stride 2", lambda: PoincareConv2d(c, c, 3, 2, padding=1), [img]),
        ("PoincareBatchNorm2d train", lambda: PoincareBatchNorm2d(c).train(), [img]),
        ("PoincareBatchNorm2d eval", lambda: PoincareBatchNorm2d(c).eval(), [img]),
        ("PoincareResidual", lambda: PoincareResidual(), [img, img]),
        ("PoincareLinear", lambda: PoincareLinear(c, 10), [(b, c)]),
        ("PoincareMLR", lambda: PoincareMLR(c, 10), [(b, c)]),
        ("PoincareGlobalAvgPool2d", lambda: PoincareGlobalAvgPool2d(), [img]),
        ("TangentReLU", lambda: TangentReLU(), [img]),
    ]


def _compare_module(
    name: str, build: Callable[[], nn.Module], shapes, device: torch.device, seed: int
) -> dict:
    torch.manual_seed(seed)
    ref = build().double()
    _perturb(ref, seed)
    if isinstance(ref, PoincareBatchNorm2d) and not ref.training:
        with torch.no_grad():  # running statistics that are not the identity
            ref.train()(torch.randn(*shapes[0], dtype=torch.float64) * 0.5)
            ref.eval()
    dev = build().to(device)
    dev.load_state_dict({k: v.float() for k, v in ref.state_dict().items()})
    dev.train(ref.training)
    gen = torch.Generator().manual_seed(seed + 1)
    xs = [torch.randn(*sh, generator=gen, dtype=torch.float64) * 0.5 for sh in shapes]
    xr = [x.clone().requires_grad_() for x in xs]
    xd = [x.float().to(device).requires_grad_() for x in xs]
    out_r, out_d = ref(*xr), dev(*xd)
    up = torch.randn(out_r.shape, generator=gen, dtype=torch.float64)
    (out_r * up).sum().backward()
    (out_d * up.float().to(device)).sum().backward()
    grads = [rel_err(d.grad, r.grad) for d, r in zip(xd, xr, strict=True)]
    grads += [
        rel_err(pd.grad, pr.grad)
        for pd, pr in zip(dev.parameters(), ref.parameters(), strict=True)
        if pr.grad is not None and pr.grad.norm() > 0
    ]
    value = rel_err(out_d, out_r)
    grad = max(grads, default=0.0)
    return {
        "section": "layers",
        "name": name,
        "value_rel_err": value,
        "grad_rel_err": grad,
        "ok": value <= VALUE_TOL and grad <= GRAD_TOL,
    }


def check_layers(device: torch.device, s: Sizes) -> list[dict]:
    rows = [
        _guard("layers", name, lambda n=name, b=b, sh=sh, i=i: _compare_module(n, b, sh, device, i))
        for i, (name, b, sh) in enumerate(_layer_cases(s))
    ]

    def model() -> nn.Module:
        return create_model("poincare_resnet20", num_classes=10, in_chans=3, depth=s.depth)

    img = [(s.batch, 3, s.image, s.image)]
    rows.append(
        _guard(
            "layers",
            f"poincare_resnet20 depth {s.depth}",
            lambda: _compare_module(f"poincare_resnet20 depth {s.depth}", model, img, device, 99),
        )
    )
    return rows


# ------------------------------------------------------------------------------- 2. train


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _Timer:
    """Per-step wall time: CUDA events on a GPU, ``perf_counter`` on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.marks: list = []

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def step_ms(self, skip: int) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            pairs = zip(self.marks[:-1], self.marks[1:], strict=True)
            times = [a.elapsed_time(b) for a, b in pairs]
        else:
            times = [1000 * (b - a) for a, b in zip(self.marks[:-1], self.marks[1:], strict=True)]
        return times[skip:]


def _sync_debug(device: torch.device):
    """``set_sync_debug_mode("error")`` for the duration (CUDA only)."""
    if device.type != "cuda":
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def mode():
        torch.cuda.set_sync_debug_mode("error")
        try:
            yield
        finally:
            torch.cuda.set_sync_debug_mode(0)

    return mode()


def run_train_case(
    model_name: str, precision: str, compiled: bool, device: torch.device, s: Sizes
) -> dict:
    torch.manual_seed(0)
    cfg = TrainConfig(precision=precision, compile=compiled, grad_clip=5.0)
    model = create_model(model_name, num_classes=10, in_chans=3, depth=s.depth).to(device)
    run = torch.compile(model) if compiled else model
    opt = build_optimizer(cfg, model)
    st = StepState.create(cfg, model, run, opt, make_grad_scaler(cfg, device), device, DistInfo())
    x = torch.rand(s.batch, 3, s.image, s.image, device=device) * 2 - 1
    y = torch.randint(0, 10, (s.batch,), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    warmup = 2  # the first steps compile (torch.compile) and calibrate
    losses, timer = [], _Timer(device)
    t0 = time.perf_counter()
    for _ in range(warmup):
        train_step(st, x, y)
        losses.append(st.sums[0].clone())  # Σ loss·n so far, read after the loop
    _synchronize(device)
    first_steps_s = time.perf_counter() - t0
    for _ in range(s.steps):
        timer.mark()
        train_step(st, x, y)
        losses.append(st.sums[0].clone())
    timer.mark()
    times = timer.step_ms(skip=0)
    sync_error = None
    if device.type == "cuda":  # one more step, any host sync in it raising
        try:
            with _sync_debug(device):
                train_step(st, x, y)
        except RuntimeError as exc:
            sync_error = str(exc).splitlines()[0]
    cumulative = torch.stack(losses).cpu().tolist()
    per_step = [b - a for a, b in zip([0.0, *cumulative[:-1]], cumulative, strict=True)]
    per_step = [v / s.batch for v in per_step]
    median = statistics.median(times)
    finite = all(v == v and abs(v) != float("inf") for v in per_step)
    return {
        "section": "train",
        "name": f"{model_name} {precision}{' compiled' if compiled else ''}",
        "step_ms": median,
        "images_per_s": s.batch / (median / 1000),
        "first_steps_s": first_steps_s,
        "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20
        if device.type == "cuda"
        else None,
        "loss_first": per_step[0],
        "loss_last": per_step[-1],
        "scaler_skips": int(st.scaler_skips),
        "sync_free": (sync_error is None) if device.type == "cuda" else None,
        "sync_error": sync_error,
        "ok": finite and int(st.bad) == 0 and sync_error is None,
    }


def check_train(device: torch.device, s: Sizes, compile_models: bool) -> list[dict]:
    cases = [
        (m, p, False)
        for m in ("poincare_resnet20", "euclidean_resnet20")
        for p in ("fp32", "bf16", "fp16")
    ]
    if compile_models:
        cases += [("poincare_resnet20", "fp32", True), ("euclidean_resnet20", "fp32", True)]
        cases += [("poincare_resnet20", "bf16", True)]
    return [
        _guard(
            "train",
            f"{m} {p}{' compiled' if c else ''}",
            lambda m=m, p=p, c=c: run_train_case(m, p, c, device, s),
        )
        for m, p, c in cases
    ]


# ------------------------------------------------------------------------------ 3. triton


def _triton_module():
    for name in TRITON_MODULES:
        try:
            return importlib.import_module(name)
        except ImportError:
            continue
    return None


def _capture_kernel_args(device: torch.device, s: Sizes) -> dict[str, tuple]:
    """The arguments each layer passes to its kernel entry point, from one forward pass."""
    import poincare_resnet.nn.batchnorm as bn_mod
    import poincare_resnet.nn.linear as fc_mod
    import poincare_resnet.nn.residual as res_mod

    captured: dict[str, tuple] = {}
    hooks = [(bn_mod, "batchnorm"), (fc_mod, "fc_tangent"), (res_mod, "residual")]
    originals = {(m, n): getattr(m, n) for m, n in hooks}

    def spy(key, fn):
        def wrapped(*args):
            # the batch norm entry point also takes all_reduce (synchronised BN); Triton does not
            kernel_args = args[:9] if key == "batchnorm" else args
            detached = tuple(a.detach() if isinstance(a, Tensor) else a for a in kernel_args)
            captured.setdefault(key, detached)
            return fn(*args)

        return wrapped

    try:
        for m, n in hooks:
            setattr(m, n, spy(n, originals[(m, n)]))
        torch.manual_seed(0)
        model = create_model("poincare_resnet20", num_classes=10, in_chans=3, depth=s.depth)
        _perturb(model, 0)
        model.to(device).train()
        model(torch.rand(s.batch, 3, s.image, s.image, device=device) * 2 - 1)
    finally:
        for (m, n), fn in originals.items():
            setattr(m, n, fn)
    return captured


def _torch_reference(name: str) -> Callable:
    """The PyTorch closed forms the Triton kernels must match (native kernels off)."""
    from poincare_resnet import ball
    from poincare_resnet.nn import _closed_forms

    if name == "batchnorm":
        return lambda *a: _closed_forms.batchnorm_forward(*a, None)
    if name == "residual":
        return _closed_forms.residual_forward
    return lambda dots, sq, znorm, bias, c, dim: ball.fc_tangent(
        dots, sq, znorm, bias, c=c, dim=dim
    )


def _fwd_bwd(fn: Callable, args: tuple, seed: int) -> tuple[list[Tensor], list[Tensor]]:
    leaves = [a.clone().requires_grad_() if _differentiable(a) else a for a in args]
    out = fn(*leaves)
    outs = [o for o in (out if isinstance(out, tuple) else (out,)) if isinstance(o, Tensor)]
    gen = torch.Generator(device=outs[0].device).manual_seed(seed)
    loss = sum(
        (o * torch.randn(o.shape, generator=gen, device=o.device, dtype=o.dtype)).sum()
        for o in outs
        if o.is_floating_point() and o.requires_grad
    )
    loss.backward()
    grads = [leaf.grad for leaf in leaves if isinstance(leaf, Tensor) and leaf.requires_grad]
    return [o.detach() for o in outs], grads


def _differentiable(a) -> bool:
    return isinstance(a, Tensor) and a.is_floating_point()


def _time_ms(fn: Callable, device: torch.device, reps: int) -> float:
    timer = _Timer(device)
    for _ in range(reps):
        timer.mark()
        fn()
    timer.mark()
    return statistics.median(timer.step_ms(skip=1 if reps > 1 else 0) or [float("nan")])


def check_triton(device: torch.device, s: Sizes) -> list[dict]:
    module = _triton_module()
    if module is None:
        return [
            {
                "section": "triton",
                "name": "all",
                "skipped": "poincare_resnet.nn._triton is not there",
                "ok": True,
            }
        ]
    if hasattr(module, "available") and not module.available():
        return [
            {"section": "triton", "name": "all", "skipped": "triton is not importable", "ok": True}
        ]
    args = _capture_kernel_args(device, s)
    rows = []
    for name in ("fc_tangent", "batchnorm", "residual"):
        rows.append(_guard("triton", name, lambda n=name: _compare_triton(module, n, args, device)))
    return rows


def _compare_triton(module, name: str, captured: dict[str, tuple], device: torch.device) -> dict:
    if name not in captured:
        return {"section": "triton", "name": name, "skipped": "not called by the model", "ok": True}
    args = captured[name]
    kernel = getattr(module, name, None)
    if kernel is None:
        return {"section": "triton", "name": name, "skipped": "not in the module", "ok": True}
    tensors = [a for a in args if isinstance(a, Tensor)]
    if hasattr(module, "applicable") and not module.applicable(*tensors):
        return {"section": "triton", "name": name, "skipped": "not applicable here", "ok": True}
    ref = _torch_reference(name)
    out_t, grad_t = _fwd_bwd(kernel, args, 0)
    out_r, grad_r = _fwd_bwd(ref, args, 0)
    value = max(rel_err(a, b) for a, b in zip(out_t, out_r, strict=True) if b.is_floating_point())
    grad = max((rel_err(a, b) for a, b in zip(grad_t, grad_r, strict=True)), default=0.0)
    reps = 20 if device.type == "cuda" else 2
    return {
        "section": "triton",
        "name": name,
        "value_rel_err": value,
        "grad_rel_err": grad,
        "triton_ms": _time_ms(lambda: _fwd_bwd(kernel, args, 0), device, reps),
        "pytorch_ms": _time_ms(lambda: _fwd_bwd(ref, args, 0), device, reps),
        "ok": value <= TRITON_TOL and grad <= TRITON_TOL,
    }


# ------------------------------------------------------------------------------- driver


def _guard(section: str, name: str, fn: Callable[[], dict]) -> dict:
    """Run one check; an exception becomes a failed row naming it (the checklist goes on)."""
    try:
        row = fn()
    except Exception as exc:  # noqa: BLE001 - a checklist reports every failure
        row = {
            "section": section,
            "name": name,
            "error": f"{type(exc).__name__}: {exc}",
            "trace": traceback.format_exc(limit=4),
            "ok": False,
        }
    print(json.dumps({k: v for k, v in row.items() if k != "trace"}), flush=True)
    return row


def markdown(rows: list[dict]) -> str:
    """The rows as one markdown table per section."""
    lines = []
    for section in ("layers", "train", "triton"):
        part = [r for r in rows if r["section"] == section]
        if not part:
            continue
        keys = [k for k in part[0] if k not in ("section", "trace")]
        for r in part:
            keys += [k for k in r if k not in keys and k not in ("section", "trace")]
        lines += [f"\n### {section}\n", "| " + " | ".join(keys) + " |"]
        lines.append("|" + "---|" * len(keys))
        for r in part:
            lines.append("| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "" if v is None else str(v)[:80]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda, cuda:N, or cpu (the smoke mode)")
    p.add_argument("--out", default="gpu_check.json", help="where the JSON table goes")
    p.add_argument("--no-compile", action="store_true", help="leave out the compiled steps")
    p.add_argument("--sections", default="layers,train,triton")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "gpu_check: CUDA is not available on this machine (torch "
            f"{torch.__version__}); run `python benchmarks/gpu_check.py --device cpu` for the "
            "CPU smoke mode",
            file=sys.stderr,
        )
        return 2
    sizes = FULL if device.type == "cuda" else SMOKE
    compile_models = device.type == "cuda" and not args.no_compile
    header = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "mode": "full" if device.type == "cuda" else "cpu smoke",
        "torch": torch.__version__,
        "sizes": vars(sizes),
    }
    print(json.dumps(header), flush=True)
    sections = set(args.sections.split(","))
    rows: list[dict] = []
    if "layers" in sections:
        rows += check_layers(device, sizes)
    if "train" in sections:
        rows += check_train(device, sizes, compile_models)
    if "triton" in sections:
        rows += _guard_list("triton", lambda: check_triton(device, sizes))
    failed = [f"{r['section']}/{r['name']}" for r in rows if not r["ok"]]
    Path(args.out).write_text(json.dumps({**header, "rows": rows, "failed": failed}, indent=2))
    print(markdown(rows))
    print(
        f"\n{len(rows)} checks, {len(failed)} failed{': ' + ', '.join(failed) if failed else ''}"
        f"; table in {args.out}"
    )
    return 1 if failed else 0


def _guard_list(section: str, fn: Callable[[], list[dict]]) -> list[dict]:
    """Like :func:`_guard` for a whole section (its setup may fail too)."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001
        error = f"{type(exc).__name__}: {exc}"
        row = {"section": section, "name": "setup", "error": error, "ok": False}
        print(json.dumps(row), flush=True)
        return [{**row, "trace": traceback.format_exc(limit=4)}]


if __name__ == "__main__":
    sys.exit(main())
