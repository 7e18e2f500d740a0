"""The native CPU residual kernel against the PyTorch closed form (values and gradients)."""

from __future__ import annotations

import math

import pytest
import torch

from poincare_resnet import _cpp
from poincare_resnet.ball import get_eps, max_tangent_radius
from poincare_resnet.nn import PoincareResidual
from poincare_resnet.nn._closed_forms import residual_forward
from poincare_resnet.nn._native_residual import native_residual, native_residual_applicable


@pytest.fixture(scope="module")
def kernel():
    module = _cpp.load_kernel("residual")
    if module is None:
        pytest.skip("native residual kernel unavailable (no C++ toolchain or native kernels off)")
    return module


def _limits(dtype):
    return get_eps(dtype), max_tangent_radius(dtype)


def _run(fn, f, res, alpha, c, f_first, grad_out):
    f = f.detach().clone().requires_grad_()
    res = res.detach().clone().requires_grad_()
    a = alpha.detach().clone().requires_grad_() if isinstance(alpha, torch.Tensor) else alpha
    out = fn(f, res, a, c, *_limits(f.dtype), f_first)
    out.backward(grad_out)
    grad_a = a.grad if isinstance(a, torch.Tensor) else None
    return out.detach(), f.grad, res.grad, grad_a


def _inputs(shape, dtype, scale, seed=0):
    gen = torch.Generator().manual_seed(seed)
    f = torch.randn(shape, generator=gen, dtype=dtype) * scale
    res = torch.randn(shape, generator=gen, dtype=dtype) * scale
    grad_out = torch.randn(shape, generator=gen, dtype=dtype)
    return f, res, grad_out


def _close(actual, expected, rtol):
    """Max error relative to the largest entry (elementwise relative error is meaningless for
    entries that cancel to ~0)."""
    scale = expected.abs().max().clamp_min(1e-30)
    err = (actual - expected).abs().max() / scale
    assert float(err) <= rtol, f"relative error {float(err):.3e} > {rtol:.1e}"


def _close_mostly(actual, expected, rtol, fraction):
    """All but ``fraction`` of the entries agree to ``rtol`` of the largest entry."""
    scale = expected.abs().max().clamp_min(1e-30)
    bad = ((actual - expected).abs() > rtol * scale).double().mean()
    assert float(bad) <= fraction, f"{float(bad):.1%} of the entries differ"


def _close_alpha(actual, expected, f, grad_out, rtol):
    """dL/dα is a sum over pixels whose terms may cancel: compare to the size of the terms."""
    size = float((grad_out.abs() * f.abs()).sum())
    err = float((actual - expected).abs().max())
    assert err <= rtol * size, f"alpha gradient error {err:.3e} > {rtol:.1e} * {size:.3e}"


# float32: the PyTorch closed form itself is off by up to ~4e-5 (of the largest entry) from the
# float64 values in the gradients, and the kernel by as much; the outputs agree to ~1e-5
RTOL = {torch.float64: 1e-10, torch.float32: 1e-4}
ALPHAS = [None, 0.7, "tensor", "negative", "zero"]


def _alpha(kind, dtype):
    if kind == "tensor":
        return torch.tensor(1.3, dtype=dtype)
    if kind == "negative":
        return torch.tensor([-0.6], dtype=dtype)
    if kind == "zero":
        return torch.zeros((), dtype=dtype)
    return kind


@pytest.mark.parametrize("f_first", [True, False], ids=["f+res", "res+f"])
@pytest.mark.parametrize("alpha", ALPHAS, ids=str)
@pytest.mark.parametrize(
    "shape", [(2, 3, 5, 7), (3, 16, 9, 11), (2, 5, 1, 1), (1, 4, 16, 17), (2, 40, 12, 13)]
)
def test_native_matches_closed_form(kernel, dtype, f_first, alpha, shape):
    c = 0.7
    # inside the clamps: with α = 0 a clamped shortcut puts the sum exactly on the projection's
    # kink, where float32 rounding picks the one-sided derivative (the boundary test covers it)
    f, res, grad_out = _inputs(shape, dtype, 0.5)
    a = _alpha(alpha, dtype)
    expected = _run(residual_forward, f, res, a, c, f_first, grad_out)
    actual = _run(native_residual, f, res, a, c, f_first, grad_out)
    for i, (x, y) in enumerate(zip(actual, expected, strict=True)):
        if y is None:
            assert x is None
        else:
            assert x.shape == y.shape and x.dtype == y.dtype
            if i == 3:
                _close_alpha(x, y, f, grad_out, RTOL[dtype])
            else:
                _close(x, y, RTOL[dtype])


@pytest.mark.parametrize("f_first", [True, False], ids=["f+res", "res+f"])
@pytest.mark.parametrize("scale", [1e-6, 3.0, 40.0])
def test_native_near_and_beyond_the_boundary(kernel, dtype, curvature, f_first, scale):
    """Small, large (the tanh clamp and the projection activate) and mixed tangent norms."""
    f, res, grad_out = _inputs((2, 6, 13, 10), dtype, scale, seed=1)
    f[0, :, :3] *= 1e-3 / scale  # some pixels with a small branch next to a large shortcut
    res[1, :, 5:] *= 1e-3 / scale
    alpha = torch.tensor(0.9, dtype=dtype)
    expected = _run(residual_forward, f, res, alpha, curvature, f_first, grad_out)
    actual = _run(native_residual, f, res, alpha, curvature, f_first, grad_out)
    sqrt_c_norm = curvature**0.5 * actual[0].norm(dim=1)
    assert float(sqrt_c_norm.max()) <= math.atanh(1 - get_eps(dtype)) * (1 + 1e-6)
    _close(actual[0], expected[0], RTOL[dtype])
    for x in actual:
        assert torch.isfinite(x).all()
    if dtype == torch.float64:
        _close(actual[1], expected[1], RTOL[dtype])
        _close(actual[2], expected[2], RTOL[dtype])
        _close_alpha(actual[3], expected[3], f, grad_out, RTOL[dtype])
    else:
        # points on a clamp (the tanh cap, the projection) sit on a kink of the map; in float32
        # rounding decides on which side, so a few pixels take the other one-sided derivative
        _close_mostly(actual[1], expected[1], RTOL[dtype], 0.05)
        _close_mostly(actual[2], expected[2], RTOL[dtype], 0.05)


def test_native_zero_vectors(kernel, dtype):
    shape = (2, 4, 3, 5)
    f, res, grad_out = _inputs(shape, dtype, 1.0, seed=2)
    f[0] = 0
    res[1] = 0
    f[1, :, 0] = 0
    res[1, :, 0] = 0  # both zero at some pixels
    for f_first in (True, False):
        for alpha in (None, torch.tensor(0.5, dtype=dtype)):
            expected = _run(residual_forward, f, res, alpha, 1.0, f_first, grad_out)
            actual = _run(native_residual, f, res, alpha, 1.0, f_first, grad_out)
            for i, (x, y) in enumerate(zip(actual, expected, strict=True)):
                if y is not None:
                    assert torch.isfinite(x).all()
                    if i == 3:
                        _close_alpha(x, y, f, grad_out, RTOL[dtype])
                    else:
                        _close(x, y, RTOL[dtype])
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    zero = torch.zeros(shape, dtype=dtype)
    eps, t_max = _limits(dtype)
    torch.testing.assert_close(
        native_residual(f, zero, None, 1.0, eps, t_max), f, rtol=tol, atol=tol
    )
    torch.testing.assert_close(native_residual(zero, zero, None, 1.0, eps, t_max), zero)


@pytest.mark.parametrize("f_first", [True, False], ids=["f+res", "res+f"])
@pytest.mark.parametrize("alpha", [None, 0.6, "tensor", "negative"], ids=str)
def test_native_gradcheck(kernel, f_first, alpha):
    f, res, _ = _inputs((2, 3, 5, 7), torch.float64, 0.7, seed=3)
    f.requires_grad_()
    res.requires_grad_()
    a = _alpha(alpha, torch.float64)
    if isinstance(a, torch.Tensor):
        a.requires_grad_()
    eps, t_max = _limits(torch.float64)

    def fn(f, res, a):
        return native_residual(f, res, a, 0.8, eps, t_max, f_first)

    assert torch.autograd.gradcheck(fn, (f, res, a), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_native_gradcheck_only_some_inputs(kernel):
    f, res, _ = _inputs((1, 2, 3, 2), torch.float64, 0.5, seed=4)
    res.requires_grad_()
    eps, t_max = _limits(torch.float64)
    assert torch.autograd.gradcheck(
        lambda r: native_residual(f, r, torch.tensor(0.3, dtype=torch.float64), 1.2, eps, t_max),
        (res,),
    )


def test_native_applicability(kernel):
    x = torch.randn(2, 3, 4, 4)
    assert native_residual_applicable(x, x, None, 0.1)
    assert native_residual_applicable(x, x, torch.tensor(0.5, requires_grad=True), 0.1)
    assert native_residual_applicable(x.double(), x.double(), 0.5, 1.0)
    assert not native_residual_applicable(x, x, None, torch.tensor(0.1))  # learnable curvature
    assert not native_residual_applicable(x.half(), x.half(), None, 0.1)
    assert not native_residual_applicable(x, x.double(), None, 0.1)
    assert not native_residual_applicable(x[0], x[0], None, 0.1)
    assert not native_residual_applicable(x, x[:, :2], None, 0.1)
    _cpp.set_native(False)
    try:
        assert not native_residual_applicable(x, x, None, 0.1)
    finally:
        _cpp.set_native(True)


def test_native_non_contiguous_inputs(kernel):
    f, res, grad_out = _inputs((2, 4, 6, 5), torch.float64, 1.0, seed=5)
    f_cl = f.to(memory_format=torch.channels_last)
    res_t = res.transpose(2, 3).contiguous().transpose(2, 3)
    expected = _run(residual_forward, f, res, None, 0.5, True, grad_out)
    actual = _run(native_residual, f_cl, res_t, None, 0.5, True, grad_out)
    for x, y in zip(actual, expected, strict=True):
        if y is not None:
            _close(x, y, 1e-10)


def test_native_threads_agree(kernel):
    """Several pixel blocks per image and several threads: same values, same dL/dα."""
    f, res, grad_out = _inputs((3, 5, 20, 21), torch.float64, 1.0, seed=7)
    alpha = torch.tensor(0.8, dtype=torch.float64)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            results.append(_run(native_residual, f, res, alpha, 0.4, True, grad_out))
    finally:
        torch.set_num_threads(threads)
    for x, y in zip(*results, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("order", ["f+res", "res+f"])
@pytest.mark.parametrize("alpha", [None, 0.5, "param"], ids=str)
def test_module_native_on_and_off(kernel, dtype, order, alpha):
    layer = PoincareResidual(c=0.3, order=order)
    f, res, grad_out = _inputs((3, 8, 6, 7), dtype, 1.5, seed=6)
    results = []
    for enabled in (False, True):
        _cpp.set_native(enabled)
        try:
            fx = f.clone().requires_grad_()
            rx = res.clone().requires_grad_()
            a = torch.nn.Parameter(torch.tensor(0.8, dtype=dtype)) if alpha == "param" else alpha
            out = layer(fx, rx, a)
            out.backward(grad_out)
            grads = [fx.grad, rx.grad] + ([a.grad] if alpha == "param" else [])
            results.append([out.detach(), *grads])
        finally:
            _cpp.set_native(True)
    off, on = results
    for i, (x, y) in enumerate(zip(on, off, strict=True)):
        if i == 3:
            _close_alpha(x, y, f, grad_out, RTOL[dtype])
        else:
            _close(x, y, RTOL[dtype])


def test_module_uses_native_path(kernel, monkeypatch):
    from poincare_resnet.nn import _native_residual

    calls = []
    original = _native_residual._NativeResidual.apply

    def spy(*args):
        calls.append(args)
        return original(*args)

    monkeypatch.setattr(_native_residual._NativeResidual, "apply", spy)
    x = torch.randn(2, 3, 4, 4)
    PoincareResidual(c=0.1)(x, x)
    assert len(calls) == 1


@pytest.mark.parametrize("alpha", [None, 0.5, "tensor"])
def test_native_residual_compiles_fullgraph(kernel, alpha):
    """Under ``torch.compile(fullgraph=True)`` the kernels enter the graph as custom ops (a
    learnable α is read inside the op, no host read in the traced program); same as eager."""
    module = PoincareResidual(c=0.1)
    f, res, _ = _inputs((2, 4, 5, 5), torch.float32, 1.0, seed=11)
    a = torch.tensor(0.3, requires_grad=True) if alpha == "tensor" else alpha

    def fn(fi, ri):
        return module(fi, ri, a)

    results = []
    for run in (fn, torch.compile(fn, fullgraph=True)):
        fi, ri = f.clone().requires_grad_(), res.clone().requires_grad_()
        if isinstance(a, torch.Tensor):
            a.grad = None
        out = run(fi, ri)
        out.pow(2).sum().backward()
        results.append([out.detach(), fi.grad, ri.grad] + ([a.grad] if alpha == "tensor" else []))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
