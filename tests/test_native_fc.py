"""The native (C++) tangent FC kernel against the PyTorch implementation of the same formula.

The native kernel runs for CPU maps along dim 1 with a fixed curvature; the PyTorch path
(``poincare_resnet._cpp.set_native(False)``, or :func:`poincare_resnet.ball.fc_tangent`, which is
pure PyTorch) is the reference here, and it is itself checked
against geoopt/mpmath oracles in ``test_ball.py``. Gradcheck (float64) runs on the native path.
"""

from __future__ import annotations

import pytest
import torch
from _helpers import native_switch
from torch.autograd import gradcheck

import poincare_resnet._cpp as cpp
from poincare_resnet import ball
from poincare_resnet.nn import PoincareConv2d, _native_fc
from poincare_resnet.nn._native_fc import native_fc_tangent_applicable as applicable
from poincare_resnet.nn.fc_map import fc_tangent

pytestmark = pytest.mark.skipif(
    cpp.load_kernel("fc") is None, reason="native FC kernel could not be built here"
)

SHAPES = [(3, 5, 7, 9), (2, 4, 1, 1), (2, 16, 12, 12), (1, 1, 3, 50), (2, 3, 130)]


def _inputs(shape, dtype, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    dots = torch.randn(*shape, generator=g, dtype=dtype) * scale
    sq_shape = list(shape)
    sq_shape[1] = 1
    sq = dots.pow(2).sum(1, keepdim=True) + torch.rand(*sq_shape, generator=g, dtype=dtype)
    znorm = torch.rand(shape[1], generator=g, dtype=dtype) + 0.3
    bias = torch.randn(shape[1], generator=g, dtype=dtype) * 0.5
    grad = torch.randn(*shape, generator=g, dtype=dtype)
    return [dots, sq * scale, znorm, bias], grad


def _run(args, grad, c, enabled):
    leaves = [a.clone().requires_grad_() for a in args]
    with native_switch(enabled):
        out = fc_tangent(*leaves, c, 1)
        out.backward(grad)
    return [out.detach()] + [leaf.grad for leaf in leaves]


def test_native_path_is_taken():
    dots = torch.zeros(2, 3, 4, 4)
    assert applicable(dots, 0.1, 1)
    assert not applicable(dots, torch.tensor(0.1), 1)  # learnable c: PyTorch path
    assert not applicable(dots.reshape(2, -1), 0.1, 1)  # 2-D: PyTorch path
    assert not applicable(dots, 0.1, -1)  # features not along dim 1
    with native_switch(False):
        assert not applicable(dots, 0.1, 1)
    with ball.manual_backward(False):  # plain autograd: the PyTorch chain
        assert not applicable(dots, 0.1, 1)


def test_layer_reaches_native_and_ball_stays_pure(monkeypatch):
    """A conv layer runs the native Function (through ``nn.fc_map``); ``ball.fc_tangent`` is
    pure maths and never does, whatever the native switch says."""
    calls = []
    real = _native_fc._NativeFC.apply
    monkeypatch.setattr(_native_fc._NativeFC, "apply", lambda *a: calls.append(1) or real(*a))
    args, _ = _inputs((2, 3, 4, 4), torch.float32)
    with native_switch(True):
        want = ball.fc_tangent(*args, c=0.1, dim=1)
        assert not calls
        got = fc_tangent(*args, 0.1, 1)
        assert len(calls) == 1
        PoincareConv2d(3, 4, 3, padding=1)(torch.randn(2, 3, 5, 5))
        assert len(calls) == 2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("c", [0.1, 1.0, 2.5])
def test_native_matches_pytorch(shape, c, dtype):
    """float64: equal to 1e-11. float32: no further from the float64 values than PyTorch's own
    float32 result is (summation order differs), and within 1e-5 where PyTorch is."""
    args, grad = _inputs(shape, dtype)
    got = _run(args, grad, c, True)
    want = _run(args, grad, c, False)
    exact = _run([a.double() for a in args], grad.double(), c, False)
    names = ["out", "dots", "sq", "znorm", "bias"]
    for name, x, y, z in zip(names, got, want, exact, strict=True):
        scale = z.abs().max().clamp_min(1e-30)
        err = ((x.double() - z).abs().max() / scale).item()
        if dtype == torch.float64:
            assert err < 1e-11, f"{name}: relative error {err:.2e}"
        else:
            ref_err = ((y.double() - z).abs().max() / scale).item()
            assert err < max(3 * ref_err, 1e-5), f"{name}: {err:.2e} vs PyTorch {ref_err:.2e}"


@pytest.mark.parametrize("scale", [30.0, 1e3, 1e6])
def test_native_extreme_inputs_finite_and_close(scale, dtype):
    """Clipped input radius, clamped g and clipped output: finite, and equal to PyTorch's."""
    args, grad = _inputs((2, 8, 5, 5), dtype, scale=scale, seed=3)
    args[2] = args[2] * 4  # large ‖z‖ pushes g into its clamp
    got = _run(args, grad, 1.0, True)
    want = _run(args, grad, 1.0, False)
    for name, x, y in zip(["out", "dots", "sq", "znorm", "bias"], got, want, strict=True):
        assert torch.isfinite(x).all(), name
        err = ((x - y).abs().max() / y.abs().max().clamp_min(1e-30)).item()
        assert err < (1e-9 if dtype == torch.float64 else 1e-3), f"{name}: {err:.2e}"


@pytest.mark.parametrize("shape", [(2, 3, 5, 4), (1, 2, 1, 1), (2, 2, 3, 17)], ids=str)
@pytest.mark.parametrize("scale", [0.05, 1.0, 5.0])
def test_native_gradcheck(shape, scale):
    args, _ = _inputs(shape, torch.float64, scale=scale, seed=7)
    leaves = [a.requires_grad_() for a in args]
    with native_switch(True):
        assert applicable(leaves[0], 0.3, 1)
        assert gradcheck(lambda *a: fc_tangent(*a, 0.3, 1), leaves)


def test_native_gradcheck_selected_inputs():
    """Only some inputs need a gradient (the kernel skips grad_dots when not needed)."""
    args, _ = _inputs((2, 3, 4, 4), torch.float64, seed=9)
    dots, sq, znorm, bias = args
    sq.requires_grad_()
    bias.requires_grad_()
    with native_switch(True):
        assert gradcheck(lambda s, b: fc_tangent(dots, s, znorm, b, 0.5, 1), (sq, bias))


@pytest.mark.parametrize("stride,padding", [(1, 1), (2, 0), (2, 2)])
def test_conv_native_on_off(dtype, stride, padding):
    torch.manual_seed(0)
    conv = PoincareConv2d(3, 5, 3, stride=stride, padding=padding, init="hnn").to(dtype)
    with torch.no_grad():
        conv.bias.normal_(0, 0.3)
    x = torch.randn(4, 3, 11, 9, dtype=dtype)
    results = []
    for enabled in (True, False):
        conv.zero_grad()
        xi = x.clone().requires_grad_()
        with native_switch(enabled):
            out = conv(xi)
            out.pow(2).sum().backward()
        results.append([out.detach(), xi.grad, conv.weight.grad, conv.bias.grad])
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    for x_nat, x_ref in zip(*results, strict=True):
        torch.testing.assert_close(x_nat, x_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("enabled", [True, False], ids=["native", "pytorch"])
def test_conv_compiles_fullgraph(enabled):
    """``torch.compile(fullgraph=True)``: the native kernels enter the graph as custom ops (no
    graph break); with native kernels off the PyTorch formula is compiled. Same as eager."""
    torch.manual_seed(0)
    conv = PoincareConv2d(3, 4, 3, padding=1, init="hnn")
    x = torch.randn(2, 3, 8, 8)
    with native_switch(enabled):
        results = []
        for module in (conv, torch.compile(conv, fullgraph=True)):
            conv.zero_grad()
            xi = x.clone().requires_grad_()
            out = module(xi)
            out.pow(2).sum().backward()
            results.append([out.detach(), xi.grad, conv.weight.grad, conv.bias.grad])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_kernel_switch_and_missing_source():
    """``set_native(False)`` turns every native path off; a kernel that cannot be built warns
    once and gives ``None`` (the layers then use their PyTorch formulas)."""
    assert "fc" in cpp.available_kernels()
    with native_switch(False):
        assert cpp.load_kernel("fc") is None
        assert not cpp.kernel_loaded("fc")
    assert cpp.kernel_loaded("fc")
    with pytest.warns(UserWarning, match="no_such_kernel"):
        assert cpp.load_kernel("no_such_kernel") is None
    assert cpp.load_kernel("no_such_kernel") is None  # remembered, no second warning
    cpp._modules.pop("no_such_kernel")
