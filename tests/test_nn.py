"""Tests for the Poincaré layers of :mod:`poincare_resnet.nn` (tangent-at-the-origin contract)."""

from __future__ import annotations

import contextlib
import copy
import math

import geoopt
import pytest
import torch
import torch.nn.functional as F
from _helpers import PoincareBlock
from torch import nn

from poincare_resnet import ball
from poincare_resnet.ball.frechet import frechet_mean
from poincare_resnet.nn import (
    Curvature,
    PoincareBatchNorm2d,
    PoincareConv2d,
    PoincareGlobalAvgPool2d,
    PoincareLinear,
    PoincareResidual,
    TangentReLU,
    init_poincare_weight,
)
from poincare_resnet.nn.conv import box_sum

F64 = torch.float64


def _tol(dtype: torch.dtype, f32: float, f64: float) -> float:
    return f64 if dtype == F64 else f32


def _close(actual, expected, tol: float, msg: str = "") -> None:
    """Relative-ish comparison: ``|a − e| ≤ tol·|e| + tol·max(1, max|e|)``."""
    scale = max(1.0, float(expected.detach().abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual, expected, rtol=tol, atol=tol * scale, msg=lambda m: f"{msg}\n{m}"
    )


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tangent(shape, c: float, dtype, seed: int, scale: float = 0.7) -> torch.Tensor:
    """Random tangent map with ``√c‖u‖`` of order ``scale`` per position."""
    return torch.randn(shape, generator=_gen(seed), dtype=F64).mul(scale / math.sqrt(c)).to(dtype)


def _clip_radius(dtype, c: float) -> float:
    return ball.max_tangent_radius(dtype) / math.sqrt(c)


# ============================================================================ PoincareConv2d


def _unfold_reference(conv: PoincareConv2d, u: torch.Tensor) -> torch.Tensor:
    """The β-concatenation convolution written out: unfold → β-scale → expmap0 → HNN++ FC →
    logmap0 → fold back, on plain autograd (an independent path from the fused layer)."""
    c = conv.curvature()
    (kh, kw), (sh, sw), (ph, pw) = conv.kernel_size, conv.stride, conv.padding
    b, _, h, w = u.shape
    h_out, w_out = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    with ball.manual_backward(False):
        patches = F.unfold(u, (kh, kw), padding=(ph, pw), stride=(sh, sw))  # [B, C·k·k, L]
        x = ball.expmap0(patches * conv.scale, c=c, dim=1)
        y = ball.fully_connected(x, conv.weight.flatten(1), conv.bias, c=c, dim=1)
        out = ball.logmap0(y, c=c, dim=1)
    return out.reshape(b, conv.out_channels, h_out, w_out)


CONV_GEOMETRIES = [(k, s, p) for k in (1, 3, 5) for s in (1, 2) for p in (0, 1, 2)]
CONV_INITS = ["hnn", "hnn-x3-bias", "identity"]


def _make_conv(in_ch, out_ch, k, s, p, c, init, dtype, seed) -> PoincareConv2d:
    torch.manual_seed(seed)
    conv = PoincareConv2d(
        in_ch, out_ch, k, stride=s, padding=p, c=c, init="hnn" if init.startswith("hnn") else init
    )
    if init == "hnn-x3-bias":  # larger weights and offsets: saturating asinh/sinh regimes
        with torch.no_grad():
            conv.weight.mul_(3.0)
            conv.bias.copy_(torch.randn(out_ch, generator=_gen(seed + 1)) * 0.5)
    return conv.to(dtype)


@contextlib.contextmanager
def _float64_with_eps_of(dtype: torch.dtype):
    """Evaluate float64 maths with ``dtype``'s projection epsilon (so the clip radii agree)."""
    previous = ball.get_eps(F64)
    ball.set_eps(F64, ball.get_eps(dtype))
    try:
        yield
    finally:
        ball.set_eps(F64, previous)


@pytest.mark.parametrize("init", CONV_INITS)
@pytest.mark.parametrize("k,s,p", CONV_GEOMETRIES, ids=lambda v: str(v))
def test_conv_matches_unfold_reference(k, s, p, init, dtype):
    """Value and gradients of the fused layer equal the unfold construction.

    The reference runs in float64 (with ``dtype``'s clip radius): in float32 the unfold path is
    itself the less accurate one (λ_x = 2/(1 − c‖x‖²) near the boundary), up to ~1e-4.
    """
    idx = CONV_GEOMETRIES.index((k, s, p))
    in_ch = 1 + idx % 3
    c = (0.1, 1.0, 2.5)[(idx // 3) % 3]
    conv = _make_conv(in_ch, 4, k, s, p, c, init, dtype, seed=idx)
    u = _tangent((2, in_ch, 7, 9), c, dtype, seed=100 + idx).requires_grad_(True)
    out = conv(u)
    g = torch.randn(out.shape, generator=_gen(7), dtype=F64)
    grads = torch.autograd.grad(out, [u, conv.weight, conv.bias], g.to(dtype))
    conv64 = copy.deepcopy(conv).double()
    u64 = u.detach().double().requires_grad_(True)
    with _float64_with_eps_of(dtype):
        ref = _unfold_reference(conv64, u64)
        ref_grads = torch.autograd.grad(ref, [u64, conv64.weight, conv64.bias], g)
    assert out.shape == ref.shape
    tol = _tol(dtype, 1e-5, 1e-10)
    _close(out, ref.to(dtype), tol, "value")
    for name, a, e in zip(("input", "weight", "bias"), grads, ref_grads, strict=True):
        _close(a, e.to(dtype), tol, f"gradient w.r.t. {name}")


@pytest.mark.parametrize(
    "k,s,p",
    [
        ((3, 3), (1, 1), (1, 1)),
        ((3, 3), (2, 2), (1, 1)),
        ((1, 1), (2, 2), (0, 0)),
        ((5, 3), (2, 1), (3, 1)),
        ((2, 4), (3, 2), (0, 2)),
    ],
    ids=str,
)
def test_box_sum_equals_window_sums_of_unfold(k, s, p):
    """The conv's ‖p‖² window sums (shifted strided slices) equal unfold's per-window sums,
    value and gradient, for odd sizes, strides and padding beyond k/2."""
    q = torch.rand(3, 1, 11, 10, generator=_gen(5), dtype=F64, requires_grad=True)
    got = box_sum(q, k, s, p)
    cols = F.unfold(q, k, padding=p, stride=s).sum(1)  # [B, L]
    h = (11 + 2 * p[0] - k[0]) // s[0] + 1
    want = cols.view(3, 1, h, -1)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)
    g = torch.randn(got.shape, generator=_gen(6), dtype=F64)
    (ga,) = torch.autograd.grad(got, q, g)
    (gb,) = torch.autograd.grad(want, q, g)
    torch.testing.assert_close(ga, gb, rtol=1e-14, atol=1e-14)


def test_conv_without_bias_matches_reference():
    conv = _make_conv(3, 5, 3, 1, 1, 1.0, "hnn", F64, seed=3)
    conv_nb = PoincareConv2d(3, 5, 3, padding=1, bias=False, c=1.0).to(F64)
    with torch.no_grad():
        conv_nb.weight.copy_(conv.weight)
    u = _tangent((2, 3, 5, 6), 1.0, F64, seed=4).requires_grad_(True)
    out = conv_nb(u)
    ref = _unfold_reference(conv_nb, u)  # fully_connected with bias=None
    _close(out, ref, 1e-10)
    (gu,) = torch.autograd.grad(out.sum(), u)
    (gr,) = torch.autograd.grad(ref.sum(), u)
    _close(gu, gr, 1e-10)


@pytest.mark.parametrize(
    "in_ch,out_ch,k,s,p,h,w",
    [
        (3, 4, 3, 1, 1, 7, 9),
        (2, 5, 5, 2, 2, 7, 9),
        (1, 2, 1, 2, 0, 8, 5),
        (4, 3, (3, 5), 2, (0, 2), 9, 7),
    ],
)
def test_conv_output_shape_matches_nn_conv2d(in_ch, out_ch, k, s, p, h, w):
    u = torch.randn(2, in_ch, h, w)
    expected = nn.Conv2d(in_ch, out_ch, k, stride=s, padding=p)(u).shape
    assert PoincareConv2d(in_ch, out_ch, k, stride=s, padding=p)(u).shape == expected


@pytest.mark.parametrize("cls", ["conv", "linear"])
def test_center_and_identity_init_layouts(cls):
    if cls == "conv":
        center = PoincareConv2d(4, 4, 3, padding=1, init="center").weight.detach()
        expected = torch.zeros(4, 4, 3, 3)
        for o in range(4):
            expected[o, o, 1, 1] = 0.5
        torch.testing.assert_close(center, expected, rtol=0, atol=0)
        ident = PoincareConv2d(4, 6, 3, init="identity").weight.detach()
        torch.testing.assert_close(ident.flatten(1), 0.5 * torch.eye(6, 36), rtol=0, atol=0)
    else:
        for init in ("center", "identity"):
            w = PoincareLinear(5, 3, init=init).weight.detach()
            torch.testing.assert_close(w, 0.5 * torch.eye(3, 5), rtol=0, atol=0)
    layer = PoincareConv2d(4, 4, 3) if cls == "conv" else PoincareLinear(5, 3)
    assert layer.bias is not None and torch.count_nonzero(layer.bias) == 0


def test_center_init_conv_keeps_pixel_directions(dtype):
    """Centre-tap init: each output pixel is parallel to its input pixel (only norms change)."""
    conv = PoincareConv2d(4, 4, 3, padding=1, c=1.0, init="center").to(dtype)
    u = _tangent((2, 4, 5, 6), 1.0, dtype, seed=9)
    cos = F.cosine_similarity(conv(u), u, dim=1)
    torch.testing.assert_close(cos, torch.ones_like(cos), rtol=0, atol=_tol(dtype, 1e-6, 1e-12))


@pytest.mark.parametrize("cin", [8, 32])
def test_kaiming_init_keeps_relu_tangent_second_moment(cin):
    """He init of the effective weight ``2·s·z``: near the origin a conv layer maps the second
    moment of a ReLU'd input ``E[u²]`` to ``2·E[u²]`` per output (the He fixed point)."""
    torch.manual_seed(0)
    conv = PoincareConv2d(cin, 64, 3, padding=1, c=0.1, init="kaiming").double()
    w = conv.weight.detach()
    expected_std = math.sqrt(2 / (cin * 9)) / (2 * conv.scale)
    assert abs(float(w.std()) / expected_std - 1) < 0.05
    u = torch.relu(torch.randn(16, cin, 12, 12, generator=_gen(1), dtype=F64)) * 1e-3
    with torch.no_grad():
        out = conv(u)[:, :, 1:-1, 1:-1]  # interior: full 3×3 windows
    ratio = float(out.pow(2).mean() / u.pow(2).mean())
    assert 1.7 < ratio < 2.3, ratio
    lin = PoincareLinear(256, 256, init="kaiming").double()
    assert abs(float(lin.weight.detach().std()) / math.sqrt(2 / 256) * 2 - 1) < 0.05


def test_kaiming_init_rejects_bad_scale():
    with pytest.raises(ValueError, match="positive scale"):
        init_poincare_weight(torch.empty(3, 4), "kaiming", scale=0.0)


@pytest.mark.parametrize("cls", ["conv", "linear"])
def test_center_weight_equals_layer_with_centred_normals(cls, dtype):
    """``center_weight=True`` is the plain layer evaluated with ``z − mean(z)`` per output."""
    torch.manual_seed(3)
    if cls == "conv":
        layer = PoincareConv2d(3, 5, 3, padding=1, c=0.5, init="hnn", center_weight=True)
        plain = PoincareConv2d(3, 5, 3, padding=1, c=0.5, init="hnn")
        u = _tangent((2, 3, 6, 7), 0.5, dtype, seed=4)
    else:
        layer = PoincareLinear(6, 4, c=0.5, init="hnn")
        layer.center_weight = True
        plain = PoincareLinear(6, 4, c=0.5, init="hnn")
        u = _tangent((5, 6), 0.5, dtype, seed=4)
    layer, plain = layer.to(dtype), plain.to(dtype)
    with torch.no_grad():
        layer.weight.normal_(0.3, 1.0)  # a clear common offset to remove
        layer.bias.normal_(0.0, 0.2)
        flat = layer.weight.flatten(1)
        plain.weight.copy_((flat - flat.mean(1, keepdim=True)).view_as(layer.weight))
        plain.bias.copy_(layer.bias)
    _close(layer(u), plain(u), _tol(dtype, 1e-5, 1e-12))
    zhat, _ = layer._unit_weight()
    sums = zhat.flatten(1).sum(1)
    torch.testing.assert_close(sums, torch.zeros_like(sums), rtol=0, atol=_tol(dtype, 1e-5, 1e-12))
    layer(u).sum().backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()
    # the gradient has no component along the centred-out direction (the per-output mean)
    gmean = layer.weight.grad.flatten(1).mean(1)
    torch.testing.assert_close(
        gmean, torch.zeros_like(gmean), rtol=0, atol=_tol(dtype, 1e-5, 1e-10)
    )


# ============================================================================ PoincareLinear


def _fc_reference(layer: PoincareLinear, u: torch.Tensor) -> torch.Tensor:
    c = layer.curvature()
    with ball.manual_backward(False):
        x = ball.expmap0(u, c=c)
        return ball.logmap0(ball.fully_connected(x, layer.weight, layer.bias, c=c), c=c)


def test_linear_matches_fully_connected_reference(dtype, curvature):
    torch.manual_seed(0)
    layer = PoincareLinear(6, 5, c=curvature, init="hnn").to(dtype)
    with torch.no_grad():
        layer.weight.mul_(2.0)
        layer.bias.copy_(torch.randn(5, generator=_gen(1)) * 0.3)
    u = _tangent((3, 4, 6), curvature, dtype, seed=2).requires_grad_(True)
    out, ref = layer(u), _fc_reference(layer, u)
    tol = _tol(dtype, 1e-5, 1e-10)
    _close(out, ref, tol)
    params = [u, layer.weight, layer.bias]
    grads = torch.autograd.grad(out.sum(), params)
    for a, e in zip(grads, torch.autograd.grad(ref.sum(), params), strict=True):
        _close(a, e, tol)


def test_linear_float32_gradient_on_the_clip_radius():
    """Regression: with every output on the clip radius and ‖ψ‖ = ‖sinh(2‖z‖ asinh q)‖ ~ 1e15,
    ``FullyConnectedTangent.backward`` formed κ/‖ψ‖² (~1e-45, below float32's range) and the
    float32 gradients were off by 2× their size. Compared with float64 at the same clip radius;
    what is left (~6e-5 of the largest entry) is float32 cancellation in a tangential gradient.
    """
    results = []
    with _float64_with_eps_of(torch.float32):
        for dtype in (torch.float32, F64):
            layer = PoincareLinear(3, 4, c=2.5)
            with torch.no_grad():
                layer.weight.copy_(torch.randn(4, 3, generator=_gen(0)) * 6)
                layer.bias.copy_(torch.randn(4, generator=_gen(1)) * 0.3)
            layer = layer.to(dtype)
            u = (torch.randn(16, 3, generator=_gen(2)) * 0.8).to(dtype).requires_grad_(True)
            out = layer(u)
            radius = _clip_radius(dtype, 2.5)
            torch.testing.assert_close(out.norm(dim=-1), torch.full((16,), radius, dtype=dtype))
            g = torch.randn(out.shape, generator=_gen(3)).to(dtype)
            results.append(torch.autograd.grad(out, [u, layer.weight, layer.bias], g))
    for a, e in zip(*results, strict=True):
        assert float((a.double() - e).abs().max()) < 5e-4 * float(e.abs().max())


def _inside_clip(n: int, dim: int, c: float, dtype, seed: int) -> torch.Tensor:
    """Tangent vectors with norms spread over (0, 0.95 × the clip radius)."""
    g = _gen(seed)
    direction = F.normalize(torch.randn(n, dim, generator=g, dtype=F64), dim=-1)
    radius = torch.rand(n, 1, generator=g, dtype=F64) * 0.95 * _clip_radius(dtype, c)
    return (direction * radius).to(dtype)


def test_square_linear_identity_init_is_exact_identity(dtype, curvature):
    layer = PoincareLinear(8, 8, c=curvature, init="identity").to(dtype)
    u = _inside_clip(256, 8, curvature, dtype, seed=3)
    tol = _tol(dtype, 1e-6, 1e-12)
    torch.testing.assert_close(layer(u), u, rtol=tol, atol=tol)


def _stack(n_layers: int, features: int, c: float, init: str, legacy: bool = False):
    torch.manual_seed(0)
    return nn.Sequential(
        *[
            PoincareLinear(features, features, c=c, init=init, legacy_lambda=legacy)
            for _ in range(n_layers)
        ]
    )


def test_identity_stack_of_50_keeps_tangent_norms(dtype, curvature):
    net = _stack(50, 16, curvature, "identity").to(dtype)
    u = _inside_clip(64, 16, curvature, dtype, seed=4)
    ratio = net(u).norm(dim=-1) / u.norm(dim=-1)
    rel = _tol(dtype, 1e-5, 1e-6)  # float32: 50 roundings of ~1e-7 each
    torch.testing.assert_close(ratio, torch.ones_like(ratio), rtol=0, atol=rel)


def test_hnn_init_stack_collapses_norms():
    net = _stack(50, 16, 0.1, "hnn").double()
    u = _tangent((64, 16), 0.1, F64, seed=5, scale=1.0)
    ratio = net(u).norm(dim=-1) / u.norm(dim=-1)
    assert float(ratio.detach().max()) < 0.01


def test_legacy_lambda_identity_init_changes_norms():
    c = 1.0
    g = _gen(6)
    direction = F.normalize(torch.randn(64, 8, generator=g, dtype=F64), dim=-1)
    u = direction * (0.5 + 1.5 * torch.rand(64, 1, generator=g, dtype=F64))  # √c‖u‖ ∈ [0.5, 2]
    one = PoincareLinear(8, 8, c=c, init="identity", legacy_lambda=True).double()
    ratio = one(u).norm(dim=-1) / u.norm(dim=-1)
    assert float((ratio - 1).abs().min()) > 0.1  # every vector's norm changes by > 10 %
    deep = _stack(50, 8, c, "identity", legacy=True).double()
    ratio50 = deep(u).norm(dim=-1) / u.norm(dim=-1)
    assert float((ratio50 - 1).abs().min()) > 0.5
    # the correct conformal factor keeps them (same weights)
    fixed = _stack(50, 8, c, "identity").double()
    torch.testing.assert_close(fixed(u).norm(dim=-1), u.norm(dim=-1), rtol=1e-10, atol=0)


# ============================================================================ batch norm


def _bn_input(seed: int, shape=(4, 3, 3, 2), c: float = 1.0) -> torch.Tensor:
    g = _gen(seed)
    offset = torch.tensor([0.3, -0.2, 0.4], dtype=F64).view(1, 3, 1, 1)[:, : shape[1]]
    return (torch.randn(shape, generator=g, dtype=F64) * 0.6 + offset) / math.sqrt(c)


def _points(u: torch.Tensor, c: float) -> torch.Tensor:
    """Ball points [N, C] of a tangent map [B, C, H, W]."""
    return ball.expmap0(u, c=c, dim=1).permute(0, 2, 3, 1).reshape(-1, u.shape[1])


def _batch_stats(u: torch.Tensor, c: float, mean: str):
    x = _points(u, c)
    if mean == "midpoint":
        mu = ball.gyromidpoint(x, c=c, dim=-1, reduce_dim=0)
    else:
        mu = frechet_mean(x, c=c, iters=300, tol=0)
    return mu, ball.dist(mu, x, c=c).pow(2).mean()


def _bn(c: float, mean: str = "midpoint", weight: float = 1.0, **kw) -> PoincareBatchNorm2d:
    bn = PoincareBatchNorm2d(3, c=c, mean=mean, **kw).double()
    with torch.no_grad():
        bn.bias.copy_(torch.tensor([0.3, -0.2, 0.5]))
        bn.weight.fill_(weight)
    return bn


@pytest.mark.parametrize("mean", ["midpoint", "frechet"])
@pytest.mark.parametrize("weight", [0.5, 1.0, 2.0])
def test_bn_output_frechet_variance_is_weight_squared(mean, weight, curvature):
    bn = _bn(curvature, mean, weight)
    u = _bn_input(0, c=curvature)
    y = _points(bn(u), curvature)
    beta = ball.expmap0(bn.bias.detach(), c=curvature)
    var_out = ball.dist(beta, y, c=curvature).pow(2).mean()
    _, var_in = _batch_stats(u, curvature, mean)
    # exact identity: every distance to β is r × the distance to μ, r = |w|/√(σ² + eps)
    exact = weight**2 * var_in / (var_in + bn.eps)
    torch.testing.assert_close(var_out, exact, rtol=1e-8, atol=0)
    # and the target: weight², up to the eps/σ² term (σ² ≥ 0.1 here, eps = 1e-5)
    assert float(var_in) > 0.1
    torch.testing.assert_close(var_out, torch.tensor(weight**2, dtype=F64), rtol=1e-4, atol=0)


def test_bn_gyromidpoint_exact_when_rescale_is_one(curvature):
    u = _bn_input(1, c=curvature)
    _, var = _batch_stats(u, curvature, "midpoint")
    bn = _bn(curvature, "midpoint", weight=math.sqrt(float(var) + 1e-5))  # r = 1
    y = _points(bn(u), curvature)
    beta = ball.expmap0(bn.bias.detach(), c=curvature)
    mid = ball.gyromidpoint(y, c=curvature, dim=-1, reduce_dim=0)
    torch.testing.assert_close(mid, beta, rtol=0, atol=1e-8)


@pytest.mark.parametrize("weight", [0.5, 2.0])
def test_bn_gyromidpoint_approximate_when_rescaled(weight):
    """Möbius scalar multiplication (r ≠ 1) does not preserve the gyromidpoint exactly.

    Measured: the hyperbolic distance d(gyromidpoint(out), β) is 2.7e-2 (weight 0.5, r ≈ 0.23)
    and 8.9e-3 (weight 2, r ≈ 0.90) for this batch at c = 1; we assert < 0.05 (and > 1e-4: the
    midpoint really moves).
    """
    c = 1.0
    bn = _bn(c, "midpoint", weight)
    y = _points(bn(_bn_input(0, c=c)), c)
    beta = ball.expmap0(bn.bias.detach(), c=c)
    d = float(ball.dist(ball.gyromidpoint(y, c=c, dim=-1, reduce_dim=0), beta, c=c))
    assert 1e-4 < d < 0.05


@pytest.mark.parametrize("weight", [0.5, 1.0, 2.0])
def test_bn_frechet_option_output_frechet_mean_is_bias(weight, curvature):
    """With ``mean="frechet"`` the output's Fréchet mean is exactly β for any rescale r (the
    Fréchet mean commutes with r ⊗ · around a Fréchet-mean centre and with the isometries)."""
    bn = _bn(curvature, "frechet", weight)
    y = _points(bn(_bn_input(2, c=curvature)), curvature)
    beta = ball.expmap0(bn.bias.detach(), c=curvature)
    fm = frechet_mean(y, c=curvature, iters=300, tol=0)
    assert float(ball.dist(fm, beta, c=curvature)) < 1e-6


def test_frechet_mean_converges_for_spread_points():
    """Regression: the unit-step Karcher flow stalled far from the mean once √c·d ≳ 1."""
    c = 1.0
    x = ball.expmap0(torch.randn(64, 3, generator=_gen(0), dtype=F64) * 1.5, c=c)
    mu = frechet_mean(x, c=c, iters=100, tol=0)
    residual = ball.logmap(mu.expand_as(x), x, c=c).mean(0)
    assert float(residual.norm()) < 1e-10
    # it is the minimiser: small moves only increase Σ d²
    f0 = ball.dist(mu, x, c=c).pow(2).sum()
    for v in torch.eye(3, dtype=F64) * 1e-3:
        for sign in (1, -1):
            moved = ball.expmap(mu, sign * v, c=c)
            assert float(ball.dist(moved, x, c=c).pow(2).sum()) > float(f0)


def test_bn_eval_is_per_sample_after_training():
    c = 1.0
    bn = _bn(c, momentum=0.3)
    for seed in range(3):
        bn(_bn_input(10 + seed, shape=(4, 3, 4, 4)))
    bn.eval()
    u = _bn_input(20, shape=(5, 3, 4, 4))
    before = bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked)
    full = bn(u)
    for i in range(5):
        torch.testing.assert_close(full[i : i + 1], bn(u[i : i + 1]), rtol=0, atol=1e-13)
    other = torch.cat([u[:1], _bn_input(21, shape=(4, 3, 4, 4))])
    torch.testing.assert_close(bn(other)[:1], full[:1], rtol=0, atol=1e-13)
    assert torch.equal(bn.running_mean, before[0]) and torch.equal(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == before[2]
    # eval_batch_stats=True: the paper's code normalises with the batch even in eval mode
    bn.eval_batch_stats = True
    assert not torch.allclose(bn(other)[:1], bn(u)[:1], atol=1e-6)
    assert torch.equal(bn.running_mean, before[0])


def test_bn_without_running_stats_uses_batch_stats():
    c = 0.5
    bn = _bn(c, weight=1.3, track_running_stats=False)
    assert bn.running_mean is None and bn.running_var is None
    assert not any("running" in k for k in bn.state_dict())
    u = _bn_input(3, c=c)
    train_out = bn(u)
    bn.eval()
    torch.testing.assert_close(bn(u), train_out, rtol=0, atol=0)
    assert not torch.allclose(bn(u[:2])[:1], train_out[:1], atol=1e-6)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_bn_running_stats_match_manual_average(momentum):
    c = 1.0
    bn = _bn(c, momentum=momentum)
    rm, rv = torch.zeros(3, dtype=F64), torch.ones(1, dtype=F64)
    for t in range(4):
        u = _bn_input(30 + t, shape=(3, 3, 2, 3), c=c)
        bn(u)
        mu, var = _batch_stats(u, c, "midpoint")
        n = u.numel() // u.shape[1]
        factor = 1.0 / (t + 1) if momentum is None else momentum
        rm = (1 - factor) * rm + factor * ball.logmap0(mu, c=c)
        rv = (1 - factor) * rv + factor * var * n / (n - 1)
    assert int(bn.num_batches_tracked) == 4
    torch.testing.assert_close(bn.running_mean, rm, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(bn.running_var, rv, rtol=1e-10, atol=1e-12)
    if momentum is None:  # cumulative average of the four batches
        means = [
            ball.logmap0(_batch_stats(_bn_input(30 + t, (3, 3, 2, 3)), c, "midpoint")[0], c=c)
            for t in range(4)
        ]
        torch.testing.assert_close(
            bn.running_mean, torch.stack(means).mean(0), rtol=1e-10, atol=1e-12
        )


def test_bn_state_dict_round_trip():
    c = 0.7
    bn = _bn(c, weight=1.7, momentum=0.2)
    with torch.no_grad():
        bn.bias.copy_(torch.tensor([0.1, 0.4, -0.3]))
    for seed in range(3):
        bn(_bn_input(40 + seed, c=c))
    bn.eval()
    fresh = PoincareBatchNorm2d(3, c=c, momentum=0.2).double()
    fresh.load_state_dict(bn.state_dict())
    fresh.eval()
    assert int(fresh.num_batches_tracked) == 3
    u = _bn_input(50, c=c)
    assert torch.equal(fresh(u), bn(u))


def test_bn_frechet_equals_midpoint_for_two_points(curvature):
    """The Fréchet mean of two points is their geodesic midpoint = their gyromidpoint."""
    u = _bn_input(5, shape=(2, 3, 1, 1), c=curvature) * 2
    out_mid = _bn(curvature, "midpoint", 0.7)(u)
    out_fre = _bn(curvature, "frechet", 0.7)(u)
    torch.testing.assert_close(out_fre, out_mid, rtol=0, atol=1e-6)


def test_bn_frechet_gradients_gradcheck():
    bn = PoincareBatchNorm2d(2, c=1.0, mean="frechet", track_running_stats=False).double()
    u = (torch.randn(2, 2, 2, 1, generator=_gen(8), dtype=F64) * 0.5).requires_grad_(True)
    w = torch.tensor([0.8], dtype=F64, requires_grad=True)
    b = torch.tensor([0.2, -0.3], dtype=F64, requires_grad=True)

    def f(u, w, b):
        return torch.func.functional_call(bn, {"weight": w, "bias": b}, (u,))

    assert torch.autograd.gradcheck(f, (u, w, b), eps=1e-6, atol=1e-6, rtol=1e-4)


def test_bn_gradients_finite_and_match_midpoint_reference_shape():
    """Midpoint batch norm gradients w.r.t. input and parameters (float64 gradcheck)."""
    bn = PoincareBatchNorm2d(2, c=0.5, track_running_stats=False).double()
    u = (torch.randn(3, 2, 2, 1, generator=_gen(9), dtype=F64) * 0.8).requires_grad_(True)
    w = torch.tensor([1.3], dtype=F64, requires_grad=True)
    b = torch.tensor([0.4, -0.1], dtype=F64, requires_grad=True)

    def f(u, w, b):
        return torch.func.functional_call(bn, {"weight": w, "bias": b}, (u,))

    assert torch.autograd.gradcheck(f, (u, w, b))


# ============================================================================ residual


def _geoopt_residual(f, res, c, alpha=None, order="f+res"):
    gball = geoopt.PoincareBall(c=torch.tensor(c, dtype=F64))
    xf = gball.expmap0(f.double(), dim=1)
    if alpha is not None:
        xf = gball.mobius_scalar_mul(torch.as_tensor(alpha, dtype=F64), xf, dim=1)
    xr = gball.expmap0(res.double(), dim=1)
    a, b = (xf, xr) if order == "f+res" else (xr, xf)
    return gball.logmap0(gball.mobius_add(a, b, dim=1), dim=1)


def test_residual_matches_geoopt(dtype, curvature):
    f = _tangent((2, 4, 3, 5), curvature, dtype, seed=11)
    res = _tangent((2, 4, 3, 5), curvature, dtype, seed=12)
    out = PoincareResidual(c=curvature)(f, res)
    expected = _geoopt_residual(f, res, curvature).to(dtype)
    _close(out, expected, _tol(dtype, 1e-5, 1e-10))
    rev = PoincareResidual(c=curvature, order="res+f")(f, res)
    _close(
        rev, _geoopt_residual(f, res, curvature, order="res+f").to(dtype), _tol(dtype, 1e-5, 1e-10)
    )
    assert (rev - out).abs().max() > 1e-3  # Möbius addition is not commutative


def test_residual_alpha_is_mobius_scalar_multiplication(curvature):
    f = _tangent((2, 4, 3, 3), curvature, F64, seed=13)
    res = _tangent((2, 4, 3, 3), curvature, F64, seed=14)
    layer = PoincareResidual(c=curvature)
    for alpha in (0.3, 2.0, torch.tensor(0.6, dtype=F64)):
        expected = _geoopt_residual(f, res, curvature, alpha=alpha)
        _close(layer(f, res, alpha=alpha), expected, 1e-10)
    alpha = torch.tensor(0.5, dtype=F64, requires_grad=True)
    layer(f, res, alpha=alpha).sum().backward()
    assert alpha.grad is not None and torch.isfinite(alpha.grad) and alpha.grad != 0


def test_residual_zero_shortcut_returns_branch(dtype, curvature):
    f = _tangent((2, 4, 3, 3), curvature, dtype, seed=15)
    zero = torch.zeros_like(f)
    tol = _tol(dtype, 1e-6, 1e-12)
    for order in ("f+res", "res+f"):
        torch.testing.assert_close(
            PoincareResidual(c=curvature, order=order)(f, zero), f, rtol=tol, atol=tol
        )
        torch.testing.assert_close(
            PoincareResidual(c=curvature, order=order)(zero, f), f, rtol=tol, atol=tol
        )


# ============================================================================ pooling, ReLU


def test_pool_tangent_mode_is_mean():
    u = torch.randn(3, 4, 5, 6, generator=_gen(16))
    torch.testing.assert_close(PoincareGlobalAvgPool2d()(u), u.mean((2, 3)))


def test_pool_midpoint_mode_matches_geoopt(curvature):
    u = _tangent((3, 4, 5, 6), curvature, F64, seed=17, scale=1.0)
    out = PoincareGlobalAvgPool2d("midpoint", c=curvature)(u)
    assert out.shape == (3, 4)
    gball = geoopt.PoincareBall(c=torch.tensor(curvature, dtype=F64))
    mid = gball.weighted_midpoint(gball.expmap0(u, dim=1), reducedim=[2, 3], dim=1)
    _close(out, gball.logmap0(mid, dim=-1), 1e-10)
    # a constant map pools to itself
    const = u[:, :, :1, :1].expand_as(u)
    _close(PoincareGlobalAvgPool2d("midpoint", c=curvature)(const), u[:, :, 0, 0], 1e-12)


def test_tangent_relu():
    u = torch.randn(2, 3, 4, 4, generator=_gen(18))
    out = TangentReLU()(u)
    assert torch.equal(out, torch.relu(u))
    # = expmap0 ∘ relu ∘ logmap0 on the ball points
    c = 0.5
    x = ball.expmap0(u, c=c, dim=1)
    torch.testing.assert_close(
        ball.expmap0(out, c=c, dim=1),
        ball.expmap0(torch.relu(ball.logmap0(x, c=c, dim=1)), c=c, dim=1),
    )
    v = u.clone()
    assert TangentReLU(inplace=True)(v) is v and torch.equal(v, torch.relu(u))


# ============================================================================ curvature


@pytest.mark.parametrize("c", [1e-3, 0.1, 0.7, 1.0, 2.5, 30.0])
def test_learnable_curvature_returns_the_value_asked_for(c):
    curv = Curvature(c, learnable=True)
    value = curv()
    assert isinstance(value, torch.Tensor) and value.requires_grad
    # the parameter is float32: the value is c to float32 rounding (≤ 2 ulp)
    torch.testing.assert_close(value, torch.tensor(c), rtol=2.5e-7, atol=0)
    fixed = Curvature(c)
    assert fixed() == c and isinstance(fixed(), float) and list(fixed.parameters()) == []


def test_learnable_curvature_gets_gradient_through_linear():
    curv = Curvature(0.8, learnable=True).double()
    torch.manual_seed(0)
    lin1 = PoincareLinear(5, 5, c=curv, init="hnn").double()
    lin2 = PoincareLinear(5, 3, c=curv, init="hnn").double()  # shared curvature module
    with torch.no_grad():
        lin1.bias.fill_(0.2)
        lin2.bias.fill_(-0.1)
    u = _tangent((4, 5), 0.8, F64, seed=19)

    def loss():
        return lin2(lin1(u)).pow(2).sum()

    loss().backward()
    grad = curv.raw.grad
    assert grad is not None and torch.isfinite(grad) and grad != 0
    h = 1e-6
    with torch.no_grad():
        raw = curv.raw.clone()
        curv.raw.copy_(raw + h)
        up = loss()
        curv.raw.copy_(raw - h)
        down = loss()
        curv.raw.copy_(raw)
    torch.testing.assert_close(grad, (up - down) / (2 * h), rtol=1e-6, atol=1e-9)


# ============================================================================ validation


@pytest.mark.parametrize("c", [0.0, -0.5, float("nan"), float("inf")])
def test_invalid_curvature_raises(c):
    with pytest.raises(ValueError, match="curvature"):
        Curvature(c)
    with pytest.raises(ValueError, match="curvature"):
        PoincareLinear(3, 3, c=c)
    with pytest.raises(ValueError, match="curvature"):
        PoincareBatchNorm2d(3, c=c)


def test_invalid_options_raise():
    with pytest.raises(ValueError, match="unknown init 'xavier'"):
        PoincareLinear(3, 3, init="xavier")
    with pytest.raises(ValueError, match="unknown init"):
        PoincareConv2d(3, 3, 3, init="he")
    with pytest.raises(ValueError, match="unknown mean"):
        PoincareBatchNorm2d(3, mean="median")
    with pytest.raises(ValueError, match="unknown pooling mode"):
        PoincareGlobalAvgPool2d("max")
    with pytest.raises(ValueError, match="unknown residual order"):
        PoincareResidual(order="f-res")


def test_wrong_shapes_raise_with_shapes_named():
    with pytest.raises(ValueError, match=r"4 input features.*\(2, 5\)"):
        PoincareLinear(4, 3)(torch.zeros(2, 5))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\].*\(2, 2, 5, 5\)"):
        PoincareConv2d(3, 4, 3)(torch.zeros(2, 2, 5, 5))
    with pytest.raises(ValueError, match=r"\(3, 5, 5\)"):
        PoincareConv2d(3, 4, 3)(torch.zeros(3, 5, 5))
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\].*\(2, 4, 5, 5\)"):
        PoincareBatchNorm2d(3)(torch.zeros(2, 4, 5, 5))
    with pytest.raises(ValueError, match=r"\(2, 3, 4, 4\).*\(2, 3, 4, 5\)"):
        PoincareResidual()(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 5))


# ============================================================================ no host syncs


def test_block_forward_backward_has_no_graph_breaks():
    """``fullgraph=True`` refuses graph breaks, so no ``.item()``/host read happens in forward;
    AOT autograd traces the backward (custom ``autograd.Function`` backwards included) ahead of
    time, which a data-dependent host read would also break."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = PoincareBlock()
    compiled_block = copy.deepcopy(block)
    compiled = torch.compile(compiled_block, fullgraph=True, backend="aot_eager")
    u = torch.randn(2, 4, 6, 6, generator=_gen(20))
    u1, u2 = u.clone().requires_grad_(True), u.clone().requires_grad_(True)
    out_eager = block(u1)
    out_eager.pow(2).sum().backward()
    out_comp = compiled(u2)
    out_comp.pow(2).sum().backward()
    torch.testing.assert_close(out_comp, out_eager, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(u2.grad, u1.grad, rtol=1e-4, atol=1e-5)
    for (name, p1), p2 in zip(block.named_parameters(), compiled_block.parameters(), strict=True):
        torch.testing.assert_close(p2.grad, p1.grad, rtol=1e-4, atol=1e-5, msg=name)
    torch.testing.assert_close(compiled_block.bn1.running_mean, block.bn1.running_mean)
    assert int(compiled_block.bn2.num_batches_tracked) == 1
    # eval mode (running statistics, no update) traces without graph breaks too
    block.eval()
    compiled_block.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(u), block(u), rtol=1e-5, atol=1e-5)
    assert int(compiled_block.bn2.num_batches_tracked) == 1
