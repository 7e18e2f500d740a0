"""NaN and ±inf propagate through every layer, on both paths, both dtypes, train and eval.

Each case puts one non-finite value into a 4-D input (so that the native kernels are reached)
and checks what the maths says: the outputs the value reaches are non-finite and the others
finite (batch norm with batch statistics: the NaN poisons μ and σ², so the whole output is
non-finite), and so are the gradients. On the native path a spy on the custom ops asserts that
the native kernels actually ran (the test fails if dispatch silently falls back).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import poincare_resnet._cpp as cpp
from poincare_resnet import nn as pnn
from poincare_resnet.models.resnet import PoincareResNet

B, C, H, W = 3, 4, 5, 5
BAD = (1, 2, 2, 3)  # (image, channel, row, column) of the non-finite input value
VALUES = {"nan": float("nan"), "+inf": float("inf"), "-inf": float("-inf")}
OPS = {  # custom ops of poincare_resnet._cpp spied on: module name -> op names
    "fc_ops": ("fc_forward", "fc_backward"),
    "batchnorm_ops": ("bn_train_forward", "bn_train_backward", "bn_out", "bn_backward"),
    "residual_ops": ("residual_forward", "residual_backward"),
}


@contextlib.contextmanager
def spy_native(monkeypatch):
    """Count the calls of each native custom op (wrapping the module attributes the layers
    call)."""
    import importlib

    calls: dict[str, int] = {}
    for mod_name, names in OPS.items():
        mod = importlib.import_module(f"poincare_resnet._cpp.{mod_name}")
        for name in names:
            op = getattr(mod, name)

            def counted(*args, _op=op, _name=name, **kwargs):
                calls[_name] = calls.get(_name, 0) + 1
                return _op(*args, **kwargs)

            monkeypatch.setattr(mod, name, counted)
    yield calls


@pytest.fixture(params=["native", "pytorch"])
def path(request):
    if request.param == "native":
        if cpp.load_kernel("fc") is None or cpp.load_kernel("batchnorm") is None:
            pytest.skip("native kernels cannot be built here")
        cpp.load_kernel("residual")
    previous = cpp.native_enabled()
    cpp.set_native(request.param == "native")
    yield request.param
    cpp.set_native(previous)


class _Residual(torch.nn.Module):
    """The residual layer with a fixed second input (the input is its ``f``)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = pnn.PoincareResidual(c=0.1)
        gen = torch.Generator().manual_seed(1)
        self.register_buffer("res", torch.randn(B, C, H, W, generator=gen) * 0.3)

    def forward(self, u):
        return self.layer(u, self.res.to(u.dtype))


class _Flat(torch.nn.Module):
    """A [B, C] head applied to the [B, C, H, W] input's pixel (b, :, i, j) rows: the input
    reshaped to rows of features, ``[B·H·W, C]``."""

    def __init__(self, head: torch.nn.Module) -> None:
        super().__init__()
        self.head = head

    def forward(self, u):
        rows = u.permute(0, 2, 3, 1).reshape(-1, C)
        out = self.head(rows)
        return out.reshape(B, H, W, -1).permute(0, 3, 1, 2)


def _model() -> torch.nn.Module:
    return PoincareResNet(depth=8, widths=(4, 4, 4), num_classes=3, in_chans=C)


# layer name -> (factory, output reach in train mode, in eval mode, native forward ops that must
# run besides the batch norm's, whether the gradient at the bad input is non-finite)
LAYERS = {
    "conv": (lambda: pnn.PoincareConv2d(C, 6, 3, padding=1), "window", "window", {"fc_forward"}),
    "batchnorm": (lambda: pnn.PoincareBatchNorm2d(C), "all", "pixel", set()),
    "residual": (_Residual, "pixel", "pixel", {"residual_forward"}),
    "relu": (pnn.TangentReLU, "element", "element", set()),
    "pool": (pnn.PoincareGlobalAvgPool2d, "pool_channel", "pool_channel", set()),
    "pool_midpoint": (
        lambda: pnn.PoincareGlobalAvgPool2d("midpoint"),
        "pool_row",
        "pool_row",
        set(),
    ),
    "linear_head": (lambda: _Flat(pnn.PoincareLinear(C, 3)), "pixel", "pixel", set()),
    "mlr_head": (lambda: _Flat(pnn.PoincareMLR(C, 3)), "pixel", "pixel", set()),
    "model": (_model, "rows_all", "row", {"fc_forward", "residual_forward"}),
}
HAS_BN = {"batchnorm", "model"}


def _expected_forward_ops(name: str, train: bool) -> set[str]:
    ops = set(LAYERS[name][3])
    if name in HAS_BN:
        ops.add("bn_train_forward" if train else "bn_out")
    return ops


def _expected_bad(out_shape, reach: str) -> torch.Tensor:
    """Booleans of ``out_shape``: the outputs that the non-finite input value makes
    non-finite."""
    b, ch, i, j = BAD
    bad = torch.zeros(out_shape, dtype=torch.bool)
    if reach == "window":  # a 3×3 convolution with padding 1: every output channel
        bad[b, :, max(i - 1, 0) : i + 2, max(j - 1, 0) : j + 2] = True
    elif reach == "pixel":  # a per-pixel map mixing the channels (norms)
        bad[b, :, i, j] = True
    elif reach == "element":
        bad[b, ch, i, j] = True
    elif reach == "all":
        bad[:] = True
    elif reach == "pool_channel":  # [B, C] mean over the pixels
        bad[b, ch] = True
    elif reach in ("pool_row", "row"):  # [B, C] / logits [B, K]: the image's row
        bad[b] = True
    elif reach == "rows_all":
        bad[:] = True
    return bad


def _clean_input(name: str, dtype) -> torch.Tensor:
    if name == "model":  # images in [−1, 1]
        return torch.rand(B, C, 8, 8, dtype=dtype) * 2 - 1
    return torch.randn(B, C, H, W, dtype=dtype) * 0.3


@pytest.mark.parametrize("value", list(VALUES), ids=list(VALUES))
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_nonfinite_propagates(name, dtype, train, value, path, monkeypatch):
    torch.manual_seed(0)
    factory, reach_train, reach_eval, _ = LAYERS[name]
    module = factory().to(dtype)
    if not train and name in HAS_BN:  # running statistics from one clean batch first
        with torch.no_grad():
            module.train()(_clean_input(name, dtype))
    module.train(train)
    u = _clean_input(name, dtype)
    u[BAD] = VALUES[value]
    u.requires_grad_()
    with spy_native(monkeypatch) as calls:
        out = module(u)
        grad = torch.randn_like(out)
        out.backward(grad)
    # the native kernels ran (forward and backward) exactly where they apply
    expected = _expected_forward_ops(name, train) if path == "native" else set()
    assert {k for k in calls if not k.endswith("backward")} == expected, calls
    for op in expected:
        backward = "bn_backward" if op == "bn_out" else op.replace("forward", "backward")
        assert calls.get(backward, 0) >= 1, (op, calls)
    b, ch, i, j = BAD
    bad = ~torch.isfinite(out.detach())
    if name == "relu" and value == "-inf":  # max(0, −inf) = 0, with derivative 0
        assert not bad.any() and out[b, ch, i, j] == 0 and u.grad[b, ch, i, j] == 0
        return
    want = _expected_bad(out.shape, reach_train if train else reach_eval)
    assert torch.equal(bad, want), (
        f"non-finite outputs at {bad.nonzero().tolist()}, expected {want.nonzero().tolist()}"
    )
    g = u.grad[b, ch, i, j]
    if name == "pool":  # the mean is linear: ∂/∂u = 1/(H W) whatever u is
        assert g == grad[b, ch] / (H * W)
    elif name == "relu":  # ∂ max(0, u)/∂u = 1 at +inf (torch's relu passes it at NaN too)
        assert g == grad[b, ch, i, j]
    else:
        assert not torch.isfinite(u.grad[b, :, i, j]).all(), "gradient at the bad input is finite"


# ------------------------------------------------------------------ huge FC arguments
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_fast_asinh_ieee(dtype):
    """``fast_asinh`` (the PyTorch path's asinh) for huge, infinite and NaN arguments: q² used to
    overflow to inf/inf = NaN from |q| ≈ 1.8e19 on in float32."""
    from poincare_resnet.ball._autograd import fast_asinh

    huge = [1e20, -1e20, 1e30, -3e37] + ([1e200, -1e300] if dtype == torch.float64 else [])
    q = torch.tensor(
        [0.0, -0.0, 1e-30, 0.3, -7.0, 1e4, *huge, float("inf"), -float("inf")], dtype=dtype
    )
    got = fast_asinh(q)
    want = torch.asinh(q.double()).to(dtype)
    assert torch.allclose(got, want, rtol=2e-7 if dtype == torch.float32 else 1e-15, atol=0)
    assert torch.equal(torch.signbit(got), torch.signbit(want))
    assert fast_asinh(torch.tensor([float("nan")], dtype=dtype)).isnan().all()


def _fc_reference(dots, sq, znorm, bias, c, dtype):
    """The tangent FC map in float64 with ``torch.asinh`` (the dtype's clamps), along dim 1."""
    from poincare_resnet.ball import MIN_NORM, max_tangent_radius

    sc, limit = c**0.5, max_tangent_radius(dtype)
    n = sq.clamp_min(MIN_NORM**2).sqrt()
    tc = (sc * n).clamp_max(limit)
    two_sr = (2 * sc * bias).view(1, -1, 1, 1)
    q = torch.sinh(2 * tc) / n * dots * torch.cosh(two_sr) - torch.cosh(2 * tc) * torch.sinh(two_sr)
    psi = torch.sinh((2 * znorm.view(1, -1, 1, 1) * torch.asinh(q)).clamp(-40, 40))
    p = psi.norm(dim=1, keepdim=True).clamp_min(MIN_NORM)
    return torch.asinh(p).clamp_max(2 * limit) / (2 * sc * p) * psi


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_fc_huge_argument_both_paths(dtype, path):
    """q = a·⟨p, ẑ⟩·cosh − e·sinh far beyond 1.8e19 (a huge ⟨p, ẑ⟩ with a small ‖p‖², a small
    ‖z‖ so that the output is not clamped): both paths give the float64 closed form (the native
    float32 asinh returned ≈ 88.7 there, the PyTorch path NaN)."""
    from poincare_resnet.nn._native_fc import native_fc_tangent_applicable
    from poincare_resnet.nn.fc_map import fc_tangent

    dots = torch.full((2, 3, 4, 4), 0.2, dtype=dtype)
    dots[1, :, 2, 3] = torch.tensor([1e25, -3e30, 1e37], dtype=dtype)
    sq = torch.full((2, 1, 4, 4), 0.05, dtype=dtype)
    znorm = torch.tensor([0.05, 0.04, 0.03], dtype=dtype)
    bias = torch.zeros(3, dtype=dtype)
    if path == "native":
        assert native_fc_tangent_applicable(dots, 0.1, 1)
    out = fc_tangent(dots, sq, znorm, bias, 0.1, 1)
    ref = _fc_reference(dots.double(), sq.double(), znorm.double(), bias.double(), 0.1, dtype)
    assert torch.isfinite(out).all()
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert torch.allclose(out.double(), ref, rtol=tol, atol=tol), (out[1, :, 2, 3], ref[1, :, 2, 3])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_fc_nan_projection_gradient(dtype, path):
    """A NaN ⟨p, ẑ_k⟩ with a finite ‖p‖² (only q_k is NaN): the outputs at that position (all
    features: they share ‖ψ‖) and the gradient of that ⟨p, ẑ_k⟩ are NaN, the rest finite."""
    from poincare_resnet.nn._native_fc import native_fc_tangent_applicable
    from poincare_resnet.nn.fc_map import fc_tangent

    g = torch.Generator().manual_seed(4)
    dots = (torch.randn(2, 3, 4, 4, generator=g, dtype=dtype) * 0.3).requires_grad_()
    sq = torch.full((2, 1, 4, 4), 0.5, dtype=dtype)
    znorm, bias = torch.ones(3, dtype=dtype), torch.zeros(3, dtype=dtype)
    with torch.no_grad():
        dots[1, 2, 0, 1] = float("nan")
    if path == "native":
        assert native_fc_tangent_applicable(dots, 0.1, 1)
    out = fc_tangent(dots, sq, znorm, bias, 0.1, 1)
    out.backward(torch.ones_like(out))
    assert out[1, :, 0, 1].isnan().all()
    assert torch.isfinite(out[0]).all() and torch.isfinite(out[1, :, 1:]).all()
    assert dots.grad[1, 2, 0, 1].isnan()
