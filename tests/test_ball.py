"""Values of the Poincaré-ball maths (:mod:`poincare_resnet.ball`).

* Hypothesis property tests (gyrogroup identities, metric identities) in float32 and float64 at
  several curvatures. Points are drawn with ``√c‖x‖ ≤ 0.9`` so that float32 keeps enough digits;
  tolerances are stated per test (``_tol``).
* Oracles: geoopt 0.5.1 (evaluated in float64, ``c`` passed as a float64 tensor) for the maps it
  has, and mpmath (50 digits) for the HNN++ hyperplane distances and fully connected map.
* Bad input, projection of points outside the ball, ``set_eps``/``get_eps``.
"""

from __future__ import annotations

import math
import warnings

import mpmath
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from poincare_resnet import ball

with warnings.catch_warnings():  # geoopt 0.5.1 uses the deprecated torch.jit.script
    warnings.simplefilter("ignore", DeprecationWarning)
    import geoopt
    from geoopt.manifolds.stereographic import math as gmath

# fixtures ``dtype``/``curvature`` are parametrised and never mutated: safe to share across
# hypothesis examples.
prop_settings = settings(suppress_health_check=[HealthCheck.function_scoped_fixture])

D = 4  # manifold dimension used by the property tests
ROWS = 3


def _tol(dtype: torch.dtype, f32: float = 2e-4, f64: float = 1e-9) -> dict:
    t = f32 if dtype == torch.float32 else f64
    return {"rtol": t, "atol": t}


def _radius(dtype: torch.dtype, c: float) -> float:
    return (1 - ball.get_eps(dtype)) / math.sqrt(c)


# ------------------------------------------------------------------------------ strategies

_coords = st.floats(-1.0, 1.0, allow_nan=False, allow_infinity=False, width=64)


@st.composite
def unit_ball(draw, rows: int = ROWS, d: int = D, max_frac: float = 0.9) -> np.ndarray:
    """``rows`` points of the unit ball with ``‖u‖ ≤ max_frac`` (divide by √c for the c-ball)."""
    direction = draw(arrays(np.float64, (rows, d), elements=_coords))
    frac = draw(arrays(np.float64, (rows, 1), elements=st.floats(0.0, max_frac)))
    norm = np.linalg.norm(direction, axis=1, keepdims=True)
    direction = np.where(norm > 1e-6, direction / np.maximum(norm, 1e-6), 0.0)
    return direction * frac


def _point(u: np.ndarray, c: float, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(u / math.sqrt(c), dtype=dtype)


vectors = arrays(np.float64, (ROWS, D), elements=st.floats(-3.0, 3.0, width=64))


# ------------------------------------------------------------------------------ properties


@prop_settings
@given(v=vectors)
def test_logmap0_inverts_expmap0(v, dtype, curvature):
    c = curvature
    v = torch.tensor(v, dtype=dtype)
    # keep √c‖v‖ below 95 % of the clip radius artanh(1 − ε)
    limit = 0.95 * ball.max_tangent_radius(dtype)
    n = v.norm(dim=-1, keepdim=True) * math.sqrt(c)
    v = torch.where(n > limit, v * limit / n, v)
    out = ball.logmap0(ball.expmap0(v, c=c), c=c)
    # float32: atanh amplifies the rounding of tanh by 1/(1 − tanh²) ≲ 100 here
    torch.testing.assert_close(out, v, **_tol(dtype, 1e-4 / math.sqrt(c), 1e-9))


@prop_settings
@given(u=unit_ball())
def test_mobius_add_zero_is_identity(u, dtype, curvature):
    x = _point(u, curvature, dtype)
    torch.testing.assert_close(
        ball.mobius_add(x, torch.zeros_like(x), c=curvature), x, **_tol(dtype, 1e-6, 1e-12)
    )
    torch.testing.assert_close(
        ball.mobius_add(torch.zeros_like(x), x, c=curvature), x, **_tol(dtype, 1e-6, 1e-12)
    )


@prop_settings
@given(u=unit_ball())
def test_mobius_add_inverse(u, dtype, curvature):
    x = _point(u, curvature, dtype)
    out = ball.mobius_add(-x, x, c=curvature)
    torch.testing.assert_close(out, torch.zeros_like(x), **_tol(dtype, 1e-5, 1e-12))


@prop_settings
@given(u=unit_ball(), w=unit_ball())
def test_left_cancellation(u, w, dtype, curvature):
    c = curvature
    x, y = _point(u, c, dtype), _point(w, c, dtype)
    out = ball.mobius_add(-x, ball.mobius_add(x, y, c=c), c=c)
    # x ⊕ y can come close to the boundary (√c‖x ⊕ y‖ ≤ 0.995 for √c‖x‖, √c‖y‖ ≤ 0.9); in float32
    # the cancellation then loses ~2.5 digits: atol 2e-4/√c in Euclidean coordinates
    torch.testing.assert_close(out, y, **_tol(dtype, 2e-4 / math.sqrt(c), 1e-8))


@prop_settings
@given(u=unit_ball(), w=unit_ball())
def test_dist_is_norm_of_logmap(u, w, dtype, curvature):
    c = curvature
    x, y = _point(u, c, dtype), _point(w, c, dtype)
    lam = ball.conformal_factor(x, c=c, keepdim=False)
    d = ball.dist(x, y, c=c)
    torch.testing.assert_close(d, lam * ball.logmap(x, y, c=c).norm(dim=-1), **_tol(dtype))
    # and symmetric, zero on the diagonal
    torch.testing.assert_close(d, ball.dist(y, x, c=c), **_tol(dtype, 1e-3, 1e-9))
    torch.testing.assert_close(ball.dist(x, x, c=c), torch.zeros_like(d), **_tol(dtype, 1e-5, 1e-9))


@prop_settings
@given(u=unit_ball(), w=unit_ball())
def test_expmap_inverts_logmap(u, w, dtype, curvature):
    c = curvature
    x, y = _point(u, c, dtype), _point(w, c, dtype)
    out = ball.expmap(x, ball.logmap(x, y, c=c), c=c)
    torch.testing.assert_close(out, y, **_tol(dtype, 2e-4 / math.sqrt(c), 1e-8))


@prop_settings
@given(u=unit_ball(), w=unit_ball())
def test_gyromidpoint_halves_distance(u, w, dtype, curvature):
    c = curvature
    x, y = _point(u, c, dtype), _point(w, c, dtype)
    m = ball.gyromidpoint(torch.stack([x, y]), c=c, reduce_dim=0)
    dxy = ball.dist(x, y, c=c)
    # float32: distances of points at √c‖x‖ ≤ 0.9 carry ~1e-5 relative error, absolute ≲ 5e-4/√c
    tol = _tol(dtype, 5e-4 / math.sqrt(c), 1e-8)
    torch.testing.assert_close(ball.dist(x, m, c=c), dxy / 2, **tol)
    torch.testing.assert_close(ball.dist(y, m, c=c), dxy / 2, **tol)


@prop_settings
@given(u=unit_ball(), w=unit_ball(), v=vectors)
def test_transport_preserves_riemannian_norm(u, w, v, dtype, curvature):
    c = curvature
    x, y = _point(u, c, dtype), _point(w, c, dtype)
    v = torch.tensor(v, dtype=dtype)
    pt = ball.transport(x, y, v, c=c)
    lam_x = ball.conformal_factor(x, c=c)
    lam_y = ball.conformal_factor(y, c=c)
    torch.testing.assert_close(
        (lam_y * pt).norm(dim=-1), (lam_x * v).norm(dim=-1), **_tol(dtype, 1e-4, 1e-9)
    )
    # transporting back recovers v
    torch.testing.assert_close(ball.transport(y, x, pt, c=c), v, **_tol(dtype, 1e-4, 1e-9))


@prop_settings
@given(u=unit_ball())
@pytest.mark.parametrize("manual", [True, False], ids=["manual", "autograd"])
def test_fully_connected_half_identity(u, dtype, curvature, manual):
    c = curvature
    x = _point(u, c, dtype)
    weight = 0.5 * torch.eye(D, dtype=dtype)
    with ball.manual_backward(manual):
        out = ball.fully_connected(x, weight, torch.zeros(D, dtype=dtype), c=c)
        out_nobias = ball.fully_connected(x, weight, c=c)
    # float precision: the tangent-form (manual) path goes through artanh at √c‖x‖ ≤ 0.9
    tol = _tol(dtype, 2e-5 / math.sqrt(c), 1e-12)
    torch.testing.assert_close(out, x, **tol)
    torch.testing.assert_close(out_nobias, x, **tol)


@prop_settings
@given(u=unit_ball(), w=unit_ball(), v=vectors)
def test_gyration_properties(u, w, v, dtype, curvature):
    """gyr[a, b] is a linear isometry and a ⊕ b = gyr[a, b](b ⊕ a)."""
    c = curvature
    a, b = _point(u, c, dtype), _point(w, c, dtype)
    v = torch.tensor(v, dtype=dtype)
    g = ball.gyration(a, b, v, c=c)
    torch.testing.assert_close(g.norm(dim=-1), v.norm(dim=-1), **_tol(dtype, 1e-4, 1e-9))
    torch.testing.assert_close(
        ball.mobius_add(a, b, c=c),
        ball.gyration(a, b, ball.mobius_add(b, a, c=c), c=c),
        **_tol(dtype, 2e-4 / math.sqrt(c), 1e-9),
    )


# ------------------------------------------------------------------------------ dim != -1


def _all_ops(dim: int, c: float):
    """Each op as a function of a tuple of manifold tensors (manifold axis ``dim``)."""
    w = torch.linspace(-1, 1, 20, dtype=torch.float64).reshape(5, 4)
    b = torch.linspace(-0.3, 0.3, 5, dtype=torch.float64)
    return {
        "expmap0": lambda x, y, v: ball.expmap0(v, c=c, dim=dim),
        "logmap0": lambda x, y, v: ball.logmap0(x, c=c, dim=dim),
        "mobius_add": lambda x, y, v: ball.mobius_add(x, y, c=c, dim=dim),
        "mobius_scalar_mul": lambda x, y, v: ball.mobius_scalar_mul(0.7, x, c=c, dim=dim),
        "dist": lambda x, y, v: ball.dist(x, y, c=c, dim=dim, keepdim=True),
        "expmap": lambda x, y, v: ball.expmap(x, v, c=c, dim=dim),
        "logmap": lambda x, y, v: ball.logmap(x, y, c=c, dim=dim),
        "gyration": lambda x, y, v: ball.gyration(x, y, v, c=c, dim=dim),
        "transport": lambda x, y, v: ball.transport(x, y, v, c=c, dim=dim),
        "conformal_factor": lambda x, y, v: ball.conformal_factor(x, c=c, dim=dim),
        "project": lambda x, y, v: ball.project(3 * x, c=c, dim=dim),
        "hyperplane_distances": lambda x, y, v: ball.hyperplane_distances(x, w, b, c=c, dim=dim),
        "fully_connected": lambda x, y, v: ball.fully_connected(x, w, b, c=c, dim=dim),
        "fc_tangent": lambda x, y, v: ball.fc_tangent(
            v, (x * x).sum(dim, keepdim=True), b.abs() + 0.5, b, c=c, dim=dim
        ),
    }


@pytest.mark.parametrize("manual", [True, False], ids=["manual", "autograd"])
@pytest.mark.parametrize("op", list(_all_ops(-1, 1.0)))
def test_manifold_axis_1_of_4d_tensor(op, manual):
    c = 1.3
    g = torch.Generator().manual_seed(0)
    shape = (2, 4, 3, 5)  # manifold axis 1 (size 4)

    def rand_point():
        z = torch.randn(shape, generator=g, dtype=torch.float64)
        return z / z.norm(dim=1, keepdim=True) * torch.rand(2, 1, 3, 5, generator=g) * 0.8

    x, y = rand_point(), rand_point()
    v = torch.randn(shape, generator=g, dtype=torch.float64)
    if op == "fc_tangent":  # 5 output features along dim; dots has the output size
        v = torch.randn(2, 5, 3, 5, generator=g, dtype=torch.float64)
    with ball.manual_backward(manual):
        got = _all_ops(1, c)[op](x, y, v)
        last = [torch.movedim(t, 1, -1) for t in (x, y, v)]
        want = torch.movedim(_all_ops(-1, c)[op](*last), -1, 1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_gyromidpoint_axes():
    """Manifold axis 1, reduction over axes (0, 2), with weights, equals the moved-axis form."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 4, 5, dtype=torch.float64, generator=g)
    x = 0.8 * x / (1 + x.norm(dim=1, keepdim=True))
    w = torch.rand(3, 5, dtype=torch.float64, generator=g) + 0.1
    got = ball.gyromidpoint(x, w, c=0.7, dim=1, reduce_dim=(0, 2))
    want = ball.gyromidpoint(torch.movedim(x, 1, -1), w, c=0.7, dim=-1, reduce_dim=(0, 1))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="manifold axis"):
        ball.gyromidpoint(x, c=0.7, dim=1, reduce_dim=1)


# ------------------------------------------------------------------------------ geoopt oracle


def _geoopt_ball(c: float) -> geoopt.PoincareBall:
    return geoopt.PoincareBall(c=torch.tensor(c, dtype=torch.float64))


def _oracle_points(c: float, n: int = 16, d: int = 5, seed: int = 0, frac: float = 0.95):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, dtype=torch.float64, generator=g)
    r = torch.rand(n, 1, dtype=torch.float64, generator=g) * frac
    r[0] = 0.0  # the origin
    r[1] = frac  # and a point close to the boundary
    return z / z.norm(dim=-1, keepdim=True) * r / math.sqrt(c)


def _oracle_cases(c: float, vmax: float = 5.0, frac: float = 0.95):
    x = _oracle_points(c, seed=1, frac=frac)
    y = _oracle_points(c, seed=2, frac=frac)
    g = torch.Generator().manual_seed(3)
    v = torch.randn(16, 5, dtype=torch.float64, generator=g)
    v[0] = 0.0
    v[1] *= 1e-9
    # √c‖v‖ at most vmax < artanh(1 − ε) (6.1 in float64, 3.1 in float32): no clipping
    v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-300) * torch.linspace(0, vmax, 16)[:, None]
    v = v / math.sqrt(c)
    v[1] = torch.full((5,), 1e-9, dtype=torch.float64)
    r = torch.linspace(-3, 3, 16, dtype=torch.float64)[:, None]
    return x, y, v, r


ORACLE_OPS = [
    "expmap0",
    "logmap0",
    "mobius_add",
    "mobius_scalar_mul",
    "dist",
    "expmap",
    "logmap",
    "gyration",
    "transport",
    "gyromidpoint",
    "weighted_gyromidpoint",
    "conformal_factor",
]


def _rounded(dtype: torch.dtype, *ts: torch.Tensor) -> list[torch.Tensor]:
    """The float64 oracles see exactly the inputs the tested dtype sees (rounded to it): the
    comparison then measures the arithmetic error, not the conditioning of the maps."""
    return [t.to(dtype).double() for t in ts]


@pytest.mark.parametrize("op", ORACLE_OPS)
def test_geoopt_oracle(op, dtype, curvature):
    c = curvature
    gb = _geoopt_ball(c)
    k = torch.tensor(-c, dtype=torch.float64)
    f32 = dtype == torch.float32
    x, y, v, r = _oracle_cases(c, vmax=2.8 if f32 else 5.0, frac=0.9 if f32 else 0.95)
    # float32 clips at √c‖x‖ = 0.996: keep r ⊗ x inside (r·artanh(0.9) < artanh(0.996))
    r = r * (2 / 3 if f32 else 1)
    w = torch.rand(16, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) + 0.1
    x, y, v, r, w = _rounded(dtype, x, y, v, r, w)
    ours = {
        "expmap0": lambda x, y, v: ball.expmap0(v, c=c),
        "logmap0": lambda x, y, v: ball.logmap0(x, c=c),
        "mobius_add": lambda x, y, v: ball.mobius_add(x, y, c=c),
        "mobius_scalar_mul": lambda x, y, v: ball.mobius_scalar_mul(r.to(x.dtype), x, c=c),
        "dist": lambda x, y, v: ball.dist(x, y, c=c),
        # v/λ_x: Riemannian norm √c‖v‖ ≤ vmax, so that expmap_x(v) stays below the clip radius
        "expmap": lambda x, y, v: ball.expmap(x, v / ball.conformal_factor(x, c=c), c=c),
        "logmap": lambda x, y, v: ball.logmap(x, y, c=c),
        "gyration": lambda x, y, v: ball.gyration(x, y, v, c=c),
        "transport": lambda x, y, v: ball.transport(x, y, v, c=c),
        "gyromidpoint": lambda x, y, v: ball.gyromidpoint(torch.stack([x, y]), c=c),
        "weighted_gyromidpoint": lambda x, y, v: ball.gyromidpoint(x, w.to(x.dtype), c=c),
        "conformal_factor": lambda x, y, v: ball.conformal_factor(x, c=c),
    }[op]
    oracle = {
        "expmap0": lambda: gb.expmap0(v),
        "logmap0": lambda: gb.logmap0(x),
        "mobius_add": lambda: gb.mobius_add(x, y),
        "mobius_scalar_mul": lambda: gb.mobius_scalar_mul(r, x),
        "dist": lambda: gb.dist(x, y),
        "expmap": lambda: gb.expmap(x, v / gb.lambda_x(x, keepdim=True)),
        "logmap": lambda: gb.logmap(x, y),
        "gyration": lambda: gmath.gyration(x, y, v, k=k),
        "transport": lambda: gb.transp(x, y, v),
        "gyromidpoint": lambda: gb.weighted_midpoint(torch.stack([x, y]), reducedim=[0]),
        "weighted_gyromidpoint": lambda: gb.weighted_midpoint(x, w, reducedim=[0]),
        "conformal_factor": lambda: gb.lambda_x(x, keepdim=True),
    }[op]
    want = oracle()
    got = ours(*(t.to(dtype) for t in (x, y, v)))
    assert got.dtype == dtype
    assert got.shape == want.shape
    # float32: points reach √c‖x‖ = 0.9 (λ ≈ 10), results reach √c‖·‖ ≈ 0.995, where the
    # arithmetic error grows to ~1e-5 relative
    tol = {"rtol": 5e-5, "atol": 5e-5} if f32 else {"rtol": 1e-9, "atol": 1e-10}
    torch.testing.assert_close(got.double(), want, **tol)


def test_gyromidpoint_negative_weights(dtype, curvature):
    """The formula is invariant under w → −w; a negative total weight must not be clamped to
    +1e-15 (regression: it returned the antipode pushed to the boundary)."""
    c = curvature
    x = _oracle_points(c, n=6, d=3, seed=12, frac=0.8).to(dtype)
    w = torch.rand(6, generator=torch.Generator().manual_seed(13), dtype=torch.float64) + 0.1
    w = w.to(dtype)
    pos = ball.gyromidpoint(x, w, c=c)
    torch.testing.assert_close(ball.gyromidpoint(x, -w, c=c), pos)
    want = _geoopt_ball(c).weighted_midpoint(x.double(), -w.double(), reducedim=[0])
    torch.testing.assert_close(pos.double(), want, **_tol(dtype, 1e-5, 1e-10))


def test_geoopt_oracle_clipped(curvature):
    """Far outside the ball and far along the tangent space: same projection as geoopt."""
    c = curvature
    gb = _geoopt_ball(c)
    g = torch.Generator().manual_seed(5)
    z = torch.randn(8, 3, dtype=torch.float64, generator=g)
    v = z / z.norm(dim=-1, keepdim=True) * 40 / math.sqrt(c)
    torch.testing.assert_close(ball.expmap0(v, c=c), gb.expmap0(v), rtol=1e-9, atol=1e-12)
    outside = z / z.norm(dim=-1, keepdim=True) * 3 / math.sqrt(c)
    torch.testing.assert_close(ball.project(outside, c=c), gb.projx(outside))


# ------------------------------------------------------------------------------ mpmath oracle


@mpmath.workdps(50)
def _mp_hyperplane(x: np.ndarray, z: np.ndarray, r: np.ndarray, c: float) -> list:
    """HNN++ v_k(x) at 50 significant digits (inputs are exact binary floats)."""
    sc = mpmath.sqrt(mpmath.mpf(c))
    xs = [mpmath.mpf(float(t)) for t in x]
    lam = 2 / (1 - c * sum(t * t for t in xs))
    out = []
    for zk, rk in zip(z, r, strict=True):
        zs = [mpmath.mpf(float(t)) for t in zk]
        zn = mpmath.sqrt(sum(t * t for t in zs))
        dot = sum(a * b / zn for a, b in zip(xs, zs, strict=True))
        two = 2 * sc * mpmath.mpf(float(rk))
        q = sc * lam * dot * mpmath.cosh(two) - (lam - 1) * mpmath.sinh(two)
        out.append(2 * zn / sc * mpmath.asinh(q))
    return out


@mpmath.workdps(50)
def _mp_fc(x: np.ndarray, z: np.ndarray, r: np.ndarray, c: float) -> list:
    """FC(x) = w/(1 + √(1 + c‖w‖²)), w_k = sinh(√c v_k)/√c, at 50 digits."""
    sc = mpmath.sqrt(mpmath.mpf(c))
    w = [mpmath.sinh(sc * vk) / sc for vk in _mp_hyperplane(x, z, r, c)]
    den = 1 + mpmath.sqrt(1 + c * sum(t * t for t in w))
    return [t / den for t in w]


def _fc_cases(c: float):
    g = torch.Generator().manual_seed(7)
    x = _oracle_points(c, n=6, d=4, seed=8, frac=0.85)
    weight = torch.randn(3, 4, dtype=torch.float64, generator=g) * 0.4
    bias = torch.randn(3, dtype=torch.float64, generator=g) * 0.3
    return x, weight, bias


def test_hyperplane_distances_mpmath(dtype, curvature):
    c = curvature
    x, weight, bias = _rounded(dtype, *_fc_cases(c))
    want = torch.tensor(
        [
            [float(t) for t in _mp_hyperplane(xi, weight.numpy(), bias.numpy(), c)]
            for xi in x.numpy()
        ],
        dtype=torch.float64,
    )
    got = ball.hyperplane_distances(x.to(dtype), weight.to(dtype), bias.to(dtype), c=c)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    torch.testing.assert_close(got.double(), want, **tol)
    # without bias: r_k = 0
    want0 = torch.tensor(
        [
            [float(t) for t in _mp_hyperplane(xi, weight.numpy(), np.zeros(3), c)]
            for xi in x.numpy()
        ],
        dtype=torch.float64,
    )
    got0 = ball.hyperplane_distances(x.to(dtype), weight.to(dtype), c=c)
    torch.testing.assert_close(got0.double(), want0, **tol)


@pytest.mark.parametrize("manual", [True, False], ids=["manual", "autograd"])
def test_fully_connected_mpmath(dtype, curvature, manual):
    c = curvature
    x, weight, bias = _rounded(dtype, *_fc_cases(c))
    want = torch.tensor(
        [[float(t) for t in _mp_fc(xi, weight.numpy(), bias.numpy(), c)] for xi in x.numpy()],
        dtype=torch.float64,
    )
    # the cases must not be clipped for the closed form to apply
    assert float(want.norm(dim=-1).max()) < _radius(dtype, c) * (1 - 1e-3)
    with ball.manual_backward(manual):
        got = ball.fully_connected(x.to(dtype), weight.to(dtype), bias.to(dtype), c=c)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-11}
    torch.testing.assert_close(got.double(), want, **tol)


def test_fully_connected_clips_output(dtype, curvature):
    """Huge weights push FC(x) to the clip radius (both paths, finite, same point)."""
    c = curvature
    x, weight, bias = _fc_cases(c)
    x, weight, bias = x.to(dtype), 50 * weight.to(dtype), bias.to(dtype)
    outs = []
    for manual in (True, False):
        with ball.manual_backward(manual):
            outs.append(ball.fully_connected(x[1:], weight, bias, c=c))
    for out in outs:
        assert torch.isfinite(out).all()
        assert float(out.norm(dim=-1).max()) <= _radius(dtype, c) * (1 + 1e-6)
    torch.testing.assert_close(outs[0], outs[1], **_tol(dtype, 1e-4, 1e-9))


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), -float("inf")])
def test_bad_curvature_raises(bad):
    x = torch.zeros(2, 3)
    for c in (bad, torch.tensor(bad), torch.tensor(bad, dtype=torch.float64)):
        for fn in (
            lambda c: ball.expmap0(x, c=c),
            lambda c: ball.logmap0(x, c=c),
            lambda c: ball.mobius_add(x, x, c=c),
            lambda c: ball.dist(x, x, c=c),
            lambda c: ball.project(x, c=c),
            lambda c: ball.fully_connected(x, torch.eye(3), c=c),
            lambda c: ball.check_curvature(c),
        ):
            with pytest.raises(ValueError, match=r"\bc\b"):
                fn(c)


def test_non_scalar_curvature_raises():
    with pytest.raises(ValueError, match=r"\bc\b.*scalar"):
        ball.expmap0(torch.zeros(2, 3), c=torch.ones(3))
    with pytest.raises(TypeError, match=r"\bc\b"):
        ball.expmap0(torch.zeros(2, 3), c="one")
    # a one-element tensor is accepted and does not broadcast the result up (regression: a
    # (1, 1) c turned a [3] input into a [1, 3] output)
    for shape in ((1,), (1, 1)):
        ct = torch.full(shape, 0.5, requires_grad=True)
        assert ball.expmap0(torch.zeros(2, 3), c=ct).shape == (2, 3)
        out = ball.mobius_add(torch.full((3,), 0.1), torch.full((3,), 0.2), c=ct)
        assert out.shape == (3,)
        assert ball.dist(torch.zeros(3), torch.full((3,), 0.2), c=ct).shape == ()
        out.sum().backward()
        assert ct.grad.shape == shape


def test_tensor_curvature_matches_float(dtype):
    x = _oracle_points(0.7, n=4, d=3).to(dtype)
    for ct in (torch.tensor(0.7), torch.tensor(0.7, dtype=torch.float64)):
        torch.testing.assert_close(
            ball.mobius_add(x, x.flip(0), c=ct), ball.mobius_add(x, x.flip(0), c=0.7)
        )
        assert ball.expmap0(x, c=ct).dtype == dtype


@pytest.mark.parametrize(
    "fn",
    [
        lambda x, y: ball.mobius_add(x, y, c=1.0),
        lambda x, y: ball.dist(x, y, c=1.0),
        lambda x, y: ball.logmap(x, y, c=1.0),
        lambda x, y: ball.expmap(x, y, c=1.0),
        lambda x, y: ball.gyration(x, y, y, c=1.0),
    ],
    ids=["mobius_add", "dist", "logmap", "expmap", "gyration"],
)
def test_mismatched_shapes_raise(fn):
    x, y = torch.zeros(3, 4), torch.zeros(3, 5)
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(3, 5\)"):
        fn(x, y)
    # same manifold size but batch shapes that do not broadcast
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(2, 4\)"):
        fn(torch.zeros(3, 4), torch.zeros(2, 4))


def test_fully_connected_bad_weight_shapes():
    x = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"\(5, 3\)"):
        ball.fully_connected(x, torch.zeros(5, 3), c=1.0)
    with pytest.raises(ValueError, match=r"\(3, 4\).*\(5, 3\)"):
        ball.hyperplane_distances(x, torch.zeros(5, 3), c=1.0)
    with pytest.raises(ValueError, match=r"\(4,\)"):
        ball.fully_connected(x, torch.zeros(5, 4), torch.zeros(4), c=1.0)
    with pytest.raises(ValueError, match=r"\(20,\)"):
        ball.fully_connected(x, torch.zeros(20), c=1.0)


def test_points_outside_ball_are_projected(dtype, curvature):
    c = curvature
    g = torch.Generator().manual_seed(11)
    z = torch.randn(6, 4, generator=g).to(dtype)
    far = z / z.norm(dim=-1, keepdim=True) * 10 / math.sqrt(c)
    inside = 0.3 * z / z.norm(dim=-1, keepdim=True) / math.sqrt(c)
    radius = _radius(dtype, c) * (1 + 1e-6)  # one float32 ulp of slack
    outs = {
        "expmap0": ball.expmap0(far, c=c),
        "mobius_add(far, 0)": ball.mobius_add(far, torch.zeros_like(far), c=c),
        "mobius_add(far, y)": ball.mobius_add(far, inside, c=c),
        "project": ball.project(far, c=c),
    }
    for name, out in outs.items():
        assert torch.isfinite(out).all(), name
        assert float(out.norm(dim=-1).max()) <= radius, name
    # a far point is moved radially onto the shell
    torch.testing.assert_close(
        ball.mobius_add(far, torch.zeros_like(far), c=c), far / 10 * (1 - ball.get_eps(dtype))
    )
    # logmap0 projects its input first: the result is the tangent vector of the shell point
    log = ball.logmap0(far, c=c)
    assert torch.isfinite(log).all()
    cap = ball.max_tangent_radius(dtype) / math.sqrt(c)
    torch.testing.assert_close(log.norm(dim=-1), torch.full((6,), cap, dtype=dtype))
    torch.testing.assert_close(log, ball.logmap0(ball.project(far, c=c), c=c))


def test_check_point():
    x = torch.tensor([[0.1, 0.2], [0.3, -0.4]])
    ball.check_point(x, c=1.0)
    with pytest.raises(ValueError, match="NaN"):
        ball.check_point(torch.tensor([[0.1, float("nan")]]), c=1.0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        ball.check_point(torch.tensor([[0.1, float("inf")]]), c=1.0)
    with pytest.raises(ValueError, match="outside"):
        ball.check_point(torch.tensor([[0.6, 0.8]]), c=1.0)  # on the boundary
    with pytest.raises(ValueError, match="outside"):
        ball.check_point(x, c=4.0)  # radius 0.5
    with pytest.raises(ValueError, match="outside"):
        ball.check_point(torch.tensor([[0.0], [0.9], [1.2]]).t(), c=1.0, dim=0)
    with pytest.raises(ValueError, match=r"\bc\b"):
        ball.check_point(x, c=-1.0)
    with pytest.raises(TypeError):
        ball.check_point(torch.zeros(2, 2, dtype=torch.int64), c=1.0)


def test_nan_propagates():
    x = torch.tensor([[0.1, float("nan")], [0.1, 0.2]])
    out = ball.expmap0(x, c=1.0)
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()


# ------------------------------------------------------------------------------ eps settings


@pytest.fixture
def restore_eps():
    yield
    for dt in (torch.float32, torch.float64):
        ball.set_eps(dt, None)


def test_eps_defaults():
    assert ball.get_eps(torch.float32) == 4e-3
    assert ball.get_eps(torch.float64) == 1e-5
    assert ball.get_eps(torch.float16) == 4e-3
    assert ball.max_tangent_radius(torch.float64) == pytest.approx(math.atanh(1 - 1e-5))


@pytest.mark.usefixtures("restore_eps")
def test_set_eps_round_trip_and_clip_radius(dtype):
    c = 2.0
    v = torch.tensor([[30.0, 40.0, 0.0]], dtype=dtype)
    for eps in (1e-3, 0.1, 0.5):
        ball.set_eps(dtype, eps)
        assert ball.get_eps(dtype) == eps
        radius = (1 - eps) / math.sqrt(c)
        cap = math.atanh(1 - eps)
        assert ball.max_tangent_radius(dtype) == pytest.approx(cap)
        tol = {"rel": 2e-5 if dtype == torch.float32 else 1e-9}
        assert float(ball.project(v, c=c).norm()) == pytest.approx(radius, **tol)
        for manual in (True, False):
            with ball.manual_backward(manual):
                assert float(ball.expmap0(v, c=c).norm()) == pytest.approx(radius, **tol)
                assert float(ball.logmap0(v, c=c).norm()) == pytest.approx(
                    cap / math.sqrt(c), **tol
                )
                out = ball.mobius_add(v, torch.zeros_like(v), c=c)
                assert float(out.norm()) == pytest.approx(radius, **tol)
    other = torch.float32 if dtype == torch.float64 else torch.float64
    assert ball.get_eps(other) == {torch.float32: 4e-3, torch.float64: 1e-5}[other]
    ball.set_eps(dtype, None)
    assert ball.get_eps(dtype) == {torch.float32: 4e-3, torch.float64: 1e-5}[dtype]


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 2.0, float("nan")])
def test_set_eps_rejects(bad):
    with pytest.raises(ValueError, match="eps"):
        ball.set_eps(torch.float32, bad)
    assert ball.get_eps(torch.float32) == 4e-3


def test_manual_backward_switch_restores():
    assert ball.manual_backward_enabled()
    with ball.manual_backward(False):
        assert not ball.manual_backward_enabled()
        with pytest.raises(RuntimeError):
            with ball.manual_backward(True):
                assert ball.manual_backward_enabled()
                raise RuntimeError
        assert not ball.manual_backward_enabled()
    assert ball.manual_backward_enabled()
