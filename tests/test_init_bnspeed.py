"""The norm-keeping conv init (``identity-compensated``) and the fair ``bn-speed`` comparison."""

from __future__ import annotations

import math

import pytest
import torch

from poincare_resnet.experiments.init_norms import _layer_stack, _random_tangents, norm_profile
from poincare_resnet.nn import PoincareConv2d, PoincareLinear, compensated_gain
from poincare_resnet.nn.init import COMPENSATED_NORM, beta_concat_scale, init_poincare_weight


def _final_ratio(init: str, channels: int, dtype: torch.dtype, depth: int = 50) -> float:
    """Mean tangent norm after ``depth`` 3×3 convs over the input's (norm 0.5 per pixel)."""
    gen = torch.Generator().manual_seed(0)
    u = _random_tangents((4, channels, 16, 16), 1, COMPENSATED_NORM, gen).to(dtype)
    torch.manual_seed(0)
    layers = [m.to(dtype) for m in _layer_stack("conv", init, False, depth, channels, 0.1)]
    return norm_profile(layers, u, 1)[-1]


@pytest.mark.parametrize(
    ("channels", "dtype"), [(16, torch.float64), (64, torch.float32), (16, torch.float32)]
)
def test_compensated_init_keeps_norms_through_50_convs(channels, dtype):
    # the must-show: within 10 % after 50 3×3 convolutions; the paper's flat ½·I drains to ~0
    # and the plain centre tap shrinks by s ≈ 1/3 per layer
    assert 0.9 <= _final_ratio("identity-compensated", channels, dtype) <= 1.1
    assert _final_ratio("identity", channels, dtype) < 1e-3
    assert _final_ratio("center", channels, dtype, depth=10) < 1e-3


def _one_patch_ratio(channels: int, c: float, norm: float, gain: float) -> float:
    """Output over input tangent norm of a centre tap ``gain/2`` on 3×3 patches of norm ``norm``
    at every pixel (no padding: one interior pixel), isotropic directions, float64."""
    gen = torch.Generator().manual_seed(1)
    u = torch.randn(4000, channels, 3, 3, generator=gen, dtype=torch.float64)
    u = norm * u / u.norm(dim=1, keepdim=True)
    conv = PoincareConv2d(channels, channels, 3, c=c, init="center").double()
    with torch.no_grad():
        conv.weight.mul_(gain)
        return conv(u).norm(dim=1).mean().item() / norm


@pytest.mark.parametrize(
    ("channels", "c", "norm"), [(16, 0.1, 0.5), (64, 0.1, 1.0), (16, 1.0, 0.3)]
)
def test_compensated_gain_keeps_one_layer_norm(channels, c, norm):
    # the layer itself (independent of the derivation) keeps the norm at the operating norm,
    # while the naive compensation 1/s (β-ratio only, no non-linearity term) does not
    gain = compensated_gain(channels, 9, c, norm)
    assert _one_patch_ratio(channels, c, norm, gain) == pytest.approx(1.0, abs=2e-4)
    naive = _one_patch_ratio(channels, c, norm, 1 / beta_concat_scale(channels, 9))
    assert abs(naive - 1) > 1e-3


def test_compensated_gain_limits_and_errors():
    # a → 0: 1/s; a linear layer (K = 1, s = 1): exactly 1, so the init is the paper's ½·I
    s = beta_concat_scale(16, 9)
    assert compensated_gain(16, 9, 0.1, 1e-6) == pytest.approx(1 / s, rel=1e-9)
    assert compensated_gain(32, 1, 0.1, COMPENSATED_NORM) == pytest.approx(1.0, abs=1e-12)
    lin = PoincareLinear(6, 6, init="identity-compensated").double()
    u = torch.randn(5, 6, dtype=torch.float64)
    torch.testing.assert_close(lin(u), u, rtol=1e-9, atol=1e-9)
    conv = PoincareConv2d(3, 5, 3, padding=1, init="identity-compensated")
    w = conv.weight.detach()
    assert w[:3, :3, 1, 1].diag().tolist() == pytest.approx(
        [compensated_gain(3, 9, 0.1, 0.5) / 2] * 3
    )
    assert int((w != 0).sum()) == 3  # centre taps of the first min(out, in) channels only
    for bad in ({"c": 0.0}, {"norm": -1.0}, {"norm": math.nan}):
        kw = {"c": 0.1, "norm": 0.5, **bad}
        with pytest.raises(ValueError, match="c > 0 and norm > 0"):
            init_poincare_weight(torch.empty(4, 4, 3, 3), "identity-compensated", **kw)
