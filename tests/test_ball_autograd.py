"""Gradients of the Poincaré-ball maths: the hand-written backward passes in
:mod:`poincare_resnet.ball._autograd`.

* ``torch.autograd.gradcheck`` (float64) of each custom Function, called directly, including
  the gradient for ``c`` (a float64 scalar tensor) and with ``c`` a Python float, in every regime:
  random points, near the boundary, beyond the projection / clip radius (away from the kink),
  tiny and zero vectors (against the analytic limit), huge vectors, broadcasting, ``dim=1``.
* Manual backward vs plain autograd (``ball.manual_backward(False)``): same values and gradients.
* float32: manual vs reference to ~1e-5 relative; no NaN/Inf for extreme inputs.
* ``torch.compile(fullgraph=True)``: no graph breaks (hence no host syncs), same as eager.
"""

from __future__ import annotations

import math

import mpmath
import pytest
import torch
from torch.autograd import gradcheck

from poincare_resnet import ball
from poincare_resnet.ball import _autograd as F

f64 = torch.float64
EPS64 = ball.get_eps(f64)
LIMIT64 = ball.max_tangent_radius(f64)  # artanh(1 − 1e-5) ≈ 6.10


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _with_norms(shape, norms, seed=0, dim=-1, dtype=f64) -> torch.Tensor:
    """Random directions along ``dim`` with the given norms (a scalar, or one per batch entry)."""
    z = torch.randn(shape, generator=_gen(seed), dtype=f64)
    z = z / z.norm(dim=dim, keepdim=True)
    n = torch.as_tensor(norms, dtype=f64)
    if n.dim():
        n = n.reshape([1 if i == dim % len(shape) else s for i, s in enumerate(shape)])
    return (z * n).to(dtype)


def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def _c_tensor(c: float) -> torch.Tensor:
    return torch.tensor(c, dtype=f64, requires_grad=True)


def _check(fn, *inputs):
    assert gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


C_VALUES = [0.3, 1.0, 2.5]


# ------------------------------------------------------------------------------ RadialMap

# √c‖v‖ for each regime (exp: tangent vectors; log: points)
RADIAL_REGIMES = {
    "exp": {
        "random": [0.05, 0.3, 1.0, 2.5],
        "near_clip": [5.5, 5.9, 6.0, 6.05],  # below artanh(1 − ε) ≈ 6.1030
        "clipped": [6.2, 8.0, 20.0, 1e3],  # projection active
    },
    "log": {
        "random": [0.005, 0.2, 0.6, 0.9],
        "near_boundary": [0.99, 0.995, 0.998, 0.999],  # inside (1 − 1e-5)
        "clipped": [0.99999 + 1e-5, 1.0, 1.5, 10.0],  # beyond the projection radius
    },
}


@pytest.mark.parametrize("c", C_VALUES)
@pytest.mark.parametrize(
    "kind,regime", [(k, r) for k, regs in RADIAL_REGIMES.items() for r in regs]
)
def test_gradcheck_radial(kind, regime, c):
    t = RADIAL_REGIMES[kind][regime]
    v = _leaf(_with_norms((4, 3), [x / math.sqrt(c) for x in t], seed=1))
    ct = _c_tensor(c)
    _check(lambda v, c_: F.RadialMap.apply(v, c_, -1, kind), v, ct)
    _check(lambda v: F.RadialMap.apply(v, c, -1, kind), v)


@pytest.mark.parametrize("kind", ["exp", "log"])
def test_gradcheck_radial_dim1_4d(kind):
    c = 0.7
    x = _with_norms((2, 3, 2, 2), 1.0, seed=2, dim=1)
    scale = torch.rand(2, 1, 2, 2, generator=_gen(3), dtype=f64) * 0.9 + 0.05
    v = _leaf(x * scale / math.sqrt(c))
    _check(lambda v, c_: F.RadialMap.apply(v, c_, 1, kind), v, _c_tensor(c))
    # and the same as moving the manifold axis last
    got = F.RadialMap.apply(v, c, 1, kind)
    want = torch.movedim(F.RadialMap.apply(torch.movedim(v, 1, -1), c, -1, kind), -1, 1)
    torch.testing.assert_close(got, want, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("kind", ["exp", "log"])
@pytest.mark.parametrize("norm", [0.0, 1e-300, 1e-12, 1e-8, 1e-4])
def test_radial_small_limit(kind, norm):
    """At and near 0, y = v + O(‖v‖³): the Jacobian is the identity and ∂y/∂c → 0."""
    c = 1.7
    v = _leaf(_with_norms((1, 3), norm, seed=4))
    ct = _c_tensor(c)
    jac_v, jac_c = torch.autograd.functional.jacobian(
        lambda v, c_: F.RadialMap.apply(v, c_, -1, kind), (v, ct)
    )
    eye = torch.eye(3, dtype=f64).reshape(1, 3, 1, 3)
    # second-order term: ±(2/3) c ‖v‖²
    tol = max(1e-12, 2 * c * norm**2)
    torch.testing.assert_close(jac_v, eye, rtol=0, atol=tol)
    # ∂y/∂c = ±(1/3)‖v‖² v
    assert float(jac_c.abs().max()) <= max(1e-15, norm**3)
    assert torch.isfinite(jac_v).all() and torch.isfinite(jac_c).all()
    if norm >= 1e-8:  # finite differences (step 1e-6) straddle 0; the map is analytic there
        _check(lambda v, c_: F.RadialMap.apply(v, c_, -1, kind), v, ct)


@pytest.mark.parametrize("kind", ["exp", "log"])
def test_radial_series_matches_exact_at_threshold(kind):
    """Taylor branch (√c‖v‖ < 1e-2 in float64) and exact branch agree across the switch."""
    c = 1.0
    t = torch.tensor([0.01 * (1 - 1e-9), 0.01 * (1 + 1e-9)], dtype=f64)
    v = _leaf(torch.stack([t, torch.zeros_like(t)], dim=-1) / math.sqrt(c))
    out = F.RadialMap.apply(v, c, -1, kind)
    (grad,) = torch.autograd.grad(out[:, 0].sum(), v)
    # the Taylor branch is truncated after t⁴: relative error ≲ t⁶ = 1e-12
    torch.testing.assert_close(out[0, 0] / t[0], out[1, 0] / t[1], rtol=1e-12, atol=0)
    torch.testing.assert_close(grad[0, 0], grad[1, 0], rtol=1e-10, atol=0)


@pytest.mark.parametrize("kind", ["exp", "log"])
@pytest.mark.parametrize("dtype", [torch.float32, f64])
def test_radial_huge_finite(kind, dtype):
    v = _leaf(_with_norms((5, 4), [1e4, 1e4, 1e6, 1e-30, 0.0], seed=5, dtype=dtype))
    ct = torch.tensor(0.8, dtype=dtype, requires_grad=True)
    out = F.RadialMap.apply(v, ct, -1, kind)
    out.pow(2).sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(v.grad).all()
    assert torch.isfinite(ct.grad).all()
    if dtype == f64:  # ‖v‖ = 1e4 (clipped): still smooth
        _check(lambda v, c_: F.RadialMap.apply(v, c_, -1, kind), _leaf(v[:2]), _c_tensor(0.8))


# ------------------------------------------------------------------------------ MobiusAdd


def _mobius_case(regime: str, c: float, shape=(4, 3)):
    sc = math.sqrt(c)
    if regime == "random":
        x = _with_norms(shape, [0.1, 0.5, 0.8, 0.9], seed=6) / sc
        y = _with_norms(shape, [0.7, 0.2, 0.9, 0.4], seed=7) / sc
    elif regime == "near_boundary":  # √c‖x‖ = 0.999, result inside the projection radius
        x = _with_norms(shape, 0.999, seed=8) / sc
        y = _with_norms(shape, [0.1, 0.3, 0.5, 0.05], seed=9) / sc
        y = torch.where((x * y).sum(-1, keepdim=True) > 0, -y, y)
    elif regime == "output_clipped":  # x ⊕ y beyond (1 − ε)/√c from inputs inside the ball
        x = _with_norms(shape, 0.9999, seed=10) / sc
        y = x / 0.9999 * 0.99
    elif regime == "input_outside":  # x outside the ball, x ⊕ y clipped
        x = _with_norms(shape, [1.5, 2.0, 3.0, 10.0], seed=11) / sc
        y = _with_norms(shape, [0.01, 0.02, 0.05, 0.001], seed=12) / sc
    elif regime == "tiny":
        x = _with_norms(shape, [1e-8, 1e-8, 0.3, 1e-10], seed=13) / sc
        y = _with_norms(shape, [1e-8, 0.4, 1e-8, 1e-9], seed=14) / sc
    else:
        raise AssertionError(regime)
    return x, y


MOBIUS_REGIMES = ["random", "near_boundary", "output_clipped", "input_outside", "tiny"]


def _mobius_clipped(x, y, c):
    out = F._mobius_terms(x, y, c, -1)[-1]
    return F._projection_scale(out, c, -1)[1]


@pytest.mark.parametrize("c", C_VALUES)
@pytest.mark.parametrize("regime", MOBIUS_REGIMES)
def test_gradcheck_mobius_add(regime, c):
    x, y = _mobius_case(regime, c)
    clipped = _mobius_clipped(x, y, c)
    if regime in ("output_clipped", "input_outside"):
        assert clipped.all()
        # away from the kink of the projection
        out = F._mobius_terms(x, y, c, -1)[-1]
        assert float(out.norm(dim=-1).min()) * math.sqrt(c) > 1 - EPS64 + 1e-6
    else:
        assert not clipped.any()
    x, y = _leaf(x), _leaf(y)
    _check(lambda x, y, c_: F.MobiusAdd.apply(x, y, c_, -1), x, y, _c_tensor(c))
    _check(lambda x, y: F.MobiusAdd.apply(x, y, c, -1), x, y)


def test_mobius_add_zero_jacobian():
    """∂(x ⊕ y)/∂x = ∂(x ⊕ y)/∂y = I at x = y = 0, and ∂/∂c = 0."""
    x = _leaf(torch.zeros(1, 3, dtype=f64))
    y = _leaf(torch.zeros(1, 3, dtype=f64))
    jx, jy, jc = torch.autograd.functional.jacobian(
        lambda x, y, c_: F.MobiusAdd.apply(x, y, c_, -1), (x, y, _c_tensor(1.3))
    )
    eye = torch.eye(3, dtype=f64).reshape(1, 3, 1, 3)
    torch.testing.assert_close(jx, eye, rtol=0, atol=0)
    torch.testing.assert_close(jy, eye, rtol=0, atol=0)
    assert float(jc.abs().max()) == 0.0


def test_gradcheck_mobius_add_broadcast():
    c = 0.9
    x = _leaf(_with_norms((5, 1, 4), torch.linspace(0, 0.95, 5), seed=15) / math.sqrt(c))
    y = _leaf(_with_norms((1, 3, 4), [0.2, 0.6, 0.99], seed=16) / math.sqrt(c))
    out = F.MobiusAdd.apply(x, y, c, -1)
    assert out.shape == (5, 3, 4)
    _check(lambda x, y, c_: F.MobiusAdd.apply(x, y, c_, -1), x, y, _c_tensor(c))
    # y has a batch of 1 along axis 0 but the manifold axis is broadcast too: [5,1,4] ⊕ [4]
    y1 = _leaf(y[0, 1])
    _check(lambda x, y, c_: F.MobiusAdd.apply(x, y, c_, -1), x, y1, _c_tensor(c))


def test_gradcheck_mobius_add_dim1_4d():
    c = 1.4
    shape = (2, 3, 2, 2)
    x = _with_norms(shape, 1.0, seed=17, dim=1)
    y = _with_norms(shape, 1.0, seed=18, dim=1)
    x = _leaf(x * torch.rand(2, 1, 2, 2, generator=_gen(19), dtype=f64) * 0.95 / math.sqrt(c))
    y = _leaf(y * torch.rand(2, 1, 2, 2, generator=_gen(20), dtype=f64) * 0.95 / math.sqrt(c))
    _check(lambda x, y, c_: F.MobiusAdd.apply(x, y, c_, 1), x, y, _c_tensor(c))
    got = F.MobiusAdd.apply(x, y, c, 1)
    want = F.MobiusAdd.apply(torch.movedim(x, 1, -1), torch.movedim(y, 1, -1), c, -1)
    torch.testing.assert_close(got, torch.movedim(want, -1, 1), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, f64])
def test_mobius_add_huge_finite(dtype):
    vals = [0.0, 1e-30, 1e4, 1e6]
    x = torch.stack([_with_norms((4,), a, seed=21, dtype=dtype) for a in vals for _ in vals])
    y = torch.stack([_with_norms((4,), b, seed=22, dtype=dtype) for _ in vals for b in vals])
    x, y = _leaf(x), _leaf(y)
    ct = torch.tensor(0.5, dtype=dtype, requires_grad=True)
    out = F.MobiusAdd.apply(x, y, ct, -1)
    out.pow(2).sum().backward()
    for t in (out, x.grad, y.grad, ct.grad):
        assert torch.isfinite(t).all()


# ------------------------------------------------------------------------------ FC tangent


def _fc_case(regime: str, c: float, batch: int = 3, n_in: int = 4, n_out: int = 3, dim=-1):
    """(dots, sq, znorm, bias) from a tangent vector p and weight rows z_k."""
    g = _gen(23)
    sc = math.sqrt(c)
    p_norms = {
        "random": [0.3, 1.0, 2.0],
        # Taylor branch (√c‖p‖ < 1e-2), with ‖p‖² above the finite-difference step of gradcheck
        "small": [3e-3, 5e-3, 8e-3],
        "inputs_clipped": [7.0, 9.0, 30.0],  # √c‖p‖ > artanh(1 − ε) ≈ 6.1
        "outputs_clipped": [0.8, 1.5, 2.0],
        "huge": [1e4, 1e4, 1e4],
    }[regime]
    p = _with_norms((batch, n_in), [t / sc for t in p_norms], seed=24)
    z = torch.randn(n_out, n_in, generator=g, dtype=f64)
    znorm = z.norm(dim=1)
    if regime == "outputs_clipped":
        znorm = znorm * 4 + 3  # ψ = sinh(2‖z‖ asinh q) large: asinh‖ψ‖ > 2 artanh(1 − ε)
    bias = torch.randn(n_out, generator=g, dtype=f64) * 0.3 / sc
    dots = p @ (z / z.norm(dim=1, keepdim=True)).t()
    sq = p.pow(2).sum(-1, keepdim=True)
    if dim != -1:
        dots = dots.reshape(batch, 1, n_out, 1).movedim(2, dim).expand(batch, n_out, 2, 2).clone()
        dots = dots + 0.01 * torch.randn(dots.shape, generator=g, dtype=f64)
        sq = sq.reshape(batch, 1, 1, 1).expand(batch, 1, 2, 2).clone()
    return dots, sq, znorm, bias


FC_REGIMES = ["random", "small", "inputs_clipped", "outputs_clipped"]


def _fc_apply(dim=-1):
    return lambda d, s, z, b, c_: F.FullyConnectedTangent.apply(d, s, z, b, c_, dim)


@pytest.mark.parametrize("c", C_VALUES)
@pytest.mark.parametrize("regime", FC_REGIMES)
def test_gradcheck_fc_tangent(regime, c):
    dots, sq, znorm, bias = _fc_case(regime, c)
    terms = F._fc_forward_terms(dots, sq, znorm, bias, c, -1)
    assert bool(terms["clipped_in"].all()) == (regime == "inputs_clipped")
    if regime != "inputs_clipped":
        assert bool(terms["clipped_out"].all()) == (regime == "outputs_clipped")
    assert bool(terms["small"].all()) == (regime == "small")
    if regime == "outputs_clipped":  # away from the kinks of both output clamps
        assert float((terms["g_raw"].abs() - F.FC_ARG_LIMIT).abs().min()) > 1e-3
        assert float(terms["p"].asinh().min()) > 2 * LIMIT64 + 1e-3
    ins = [_leaf(t) for t in (dots, sq, znorm, bias)]
    _check(_fc_apply(), *ins, _c_tensor(c))
    _check(lambda d, s, z, b: F.FullyConnectedTangent.apply(d, s, z, b, c, -1), *ins)


def test_gradcheck_fc_tangent_arg_limit():
    """Some ψ_k beyond the sinh clamp (|g| > 40): zero gradient there, smooth elsewhere."""
    c = 1.0
    dots, sq, znorm, bias = _fc_case("outputs_clipped", c)
    znorm = znorm * torch.tensor([1.0, 20.0, 1.0], dtype=f64)
    terms = F._fc_forward_terms(dots, sq, znorm, bias, c, -1)
    assert (terms["g_raw"].abs() > F.FC_ARG_LIMIT + 1).any()
    ins = [_leaf(t) for t in (dots, sq, znorm, bias)]
    _check(_fc_apply(), *ins, _c_tensor(c))


def test_gradcheck_fc_tangent_dim1_4d():
    c = 0.6
    dots, sq, znorm, bias = _fc_case("random", c, dim=1)
    assert dots.shape == (3, 3, 2, 2) and sq.shape == (3, 1, 2, 2)
    ins = [_leaf(t) for t in (dots, sq, znorm, bias)]
    _check(_fc_apply(1), *ins, _c_tensor(c))
    got = F.FullyConnectedTangent.apply(dots, sq, znorm, bias, c, 1)
    want = F.FullyConnectedTangent.apply(
        torch.movedim(dots, 1, -1), torch.movedim(sq, 1, -1), znorm, bias, c, -1
    )
    torch.testing.assert_close(got, torch.movedim(want, -1, 1), rtol=1e-14, atol=1e-14)


def test_fc_tangent_zero_limit():
    """At p = 0, bias = 0: out_k = 2‖z_k‖⟨p, ẑ_k⟩ + O(‖p‖³) → ∂out/∂dots = diag(2‖z‖)."""
    c = 1.9
    znorm = torch.tensor([0.5, 1.0, 2.0], dtype=f64)
    zero = torch.zeros(3, dtype=f64)
    for scale in (0.0, 1e-12):
        dots = _leaf(torch.full((1, 3), scale, dtype=f64))
        sq = _leaf(torch.full((1, 1), 3 * scale**2, dtype=f64))
        jd, js = torch.autograd.functional.jacobian(
            lambda d, s: F.FullyConnectedTangent.apply(d, s, znorm, zero, c, -1), (dots, sq)
        )
        torch.testing.assert_close(jd.reshape(3, 3), torch.diag(2 * znorm), rtol=1e-12, atol=1e-12)
        assert torch.isfinite(js).all()


def _mp_fc_tangent(dots, sq, znorm, bias, c):
    """The tangent-form FC map of one row in mpmath (the closed form with both clips)."""
    mp = mpmath.mp
    limit = mp.atanh(1 - mp.mpf(EPS64))
    sc = mp.sqrt(c)
    n = mp.sqrt(sq)
    tc = min(sc * n, limit)
    a, e = mp.sinh(2 * tc) / n, mp.cosh(2 * tc)
    psi = []
    for d, z, r in zip(dots, znorm, bias, strict=True):
        q = a * d * mp.cosh(2 * sc * r) - e * mp.sinh(2 * sc * r)
        g = max(min(2 * z * mp.asinh(q), F.FC_ARG_LIMIT), -F.FC_ARG_LIMIT)
        psi.append(mp.sinh(g))
    p = mp.sqrt(sum(t * t for t in psi))
    rho = min(mp.asinh(p), 2 * limit)
    return [rho / (2 * sc * p) * t for t in psi]


@pytest.mark.parametrize("p_norm", [1e-8, 0.5, 9.0])
def test_fc_tangent_mpmath_gradient(p_norm):
    """Values and all gradients (dots, ‖p‖², ‖z‖, r, c) against 40-digit mpmath derivatives,
    including ‖p‖ = 1e-8 (Taylor branch) and an input-clipped ‖p‖."""
    c = 1.3
    g = _gen(40)
    z = torch.randn(3, 4, generator=g, dtype=f64)
    p = _with_norms((1, 4), p_norm, seed=41)
    dots = p @ (z / z.norm(dim=1, keepdim=True)).t()
    sq = p.pow(2).sum(-1, keepdim=True)
    znorm = z.norm(dim=1) * 0.4
    bias = torch.randn(3, generator=g, dtype=f64) * 0.3
    ins = [_leaf(t) for t in (dots, sq, znorm, bias)]
    ct = _c_tensor(c)
    out = F.FullyConnectedTangent.apply(*ins, ct, -1)
    jac = torch.autograd.functional.jacobian(_fc_apply(), (*ins, ct))

    flat = [float(t) for t in (*dots[0], sq[0, 0], *znorm, *bias, c)]

    def f(k, j):  # output k as a function of flat input j
        def fn(x):
            args = [mpmath.mpf(v) for v in flat]
            args[j] = x
            return _mp_fc_tangent(args[0:3], args[3], args[4:7], args[7:10], args[10])[k]

        return fn

    with mpmath.workdps(40):
        want = [
            float(t)
            for t in _mp_fc_tangent(
                *(
                    [mpmath.mpf(v) for v in flat[0:3]],
                    mpmath.mpf(flat[3]),
                    [mpmath.mpf(v) for v in flat[4:7]],
                    [mpmath.mpf(v) for v in flat[7:10]],
                    mpmath.mpf(flat[10]),
                )
            )
        ]
        torch.testing.assert_close(out[0], torch.tensor(want, dtype=f64), rtol=1e-12, atol=1e-20)
        got = torch.cat(
            [
                jac[0].reshape(3, 3),
                jac[1].reshape(3, 1),
                jac[2].reshape(3, 3),
                jac[3].reshape(3, 3),
                jac[4].reshape(3, 1),
            ],
            dim=1,
        )
        num = torch.tensor(
            [
                [
                    float(mpmath.diff(f(k, j), mpmath.mpf(flat[j]), h=mpmath.mpf(flat[3]) * 1e-12))
                    for j in range(11)
                ]
                for k in range(3)
            ],
            dtype=f64,
        )
    scale = num.abs().max(dim=0).values + 1e-300
    torch.testing.assert_close(got / scale, num / scale, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, f64])
def test_fc_tangent_huge_finite(dtype):
    dots, sq, znorm, bias = (t.to(dtype) for t in _fc_case("huge", 1.0))
    dots = torch.cat([dots, dots * 100, torch.zeros_like(dots), dots * 1e-30])
    sq = torch.cat([sq, sq * 1e4, torch.zeros_like(sq), sq * 1e-60])
    # bias stays moderate: cosh(2√c r) overflows for |2√c r| > 89 (float32) / 710 (float64),
    # giving inf − inf in q (a range limit of the closed form, shared with the reference)
    ins = [_leaf(t) for t in (dots, sq, znorm * 1e3, bias * 10)]
    ct = torch.tensor(1.0, dtype=dtype, requires_grad=True)
    out = F.FullyConnectedTangent.apply(*ins, ct, -1)
    out.pow(2).sum().backward()
    for t in (out, ct.grad, *(i.grad for i in ins)):
        assert torch.isfinite(t).all()


# ------------------------------------------------------------------------------ manual vs autograd


def _public_ops():
    """name -> (fn(*tensors, c), case(regime, c, dtype) -> tensors)."""

    def radial_case(kind):
        def case(regime, c, dtype):
            sc = math.sqrt(c)
            if regime == "interior":
                t = [0.05, 0.5, 1.5, 2.5] if kind == "exp" else [0.05, 0.3, 0.6, 0.9]
            elif regime == "boundary":
                t = [3.0, 5.5, 8.0, 1e3] if kind == "exp" else [0.99, 0.999, 1.2, 10.0]
            else:  # tiny
                t = [0.0, 1e-12, 1e-8, 1e-3]
            return (_with_norms((4, 3), [x / sc for x in t], seed=30, dtype=dtype),)

        return case

    def mobius_case(regime, c, dtype):
        reg = {"interior": "random", "boundary": "input_outside", "tiny": "tiny"}[regime]
        x, y = _mobius_case(reg, c)
        if regime == "boundary":
            x = torch.cat([x, _mobius_case("near_boundary", c)[0]])
            y = torch.cat([y, _mobius_case("near_boundary", c)[1]])
        return x.to(dtype), y.to(dtype)

    def pair_case(regime, c, dtype):
        if regime == "interior":
            return tuple(t.to(dtype) for t in _mobius_case("random", c))
        if regime == "boundary":
            x, y = _mobius_case("near_boundary", c)
            return x.to(dtype), (x.flip(0) * 0.99).to(dtype)
        x, y = _mobius_case("random", c)
        return x.to(dtype), (x + 1e-7 * y).to(dtype)

    def fc_case(regime, c, dtype):
        reg = {"interior": "random", "boundary": "outputs_clipped", "tiny": "small"}[regime]
        out = _fc_case(reg, c)
        if regime == "boundary":
            out2 = _fc_case("inputs_clipped", c)
            out = (torch.cat([out[0], out2[0]]), torch.cat([out[1], out2[1]]), *out[2:])
        return tuple(t.to(dtype) for t in out)

    def fully_connected_case(regime, c, dtype):
        g = _gen(31)
        w = torch.randn(5, 4, generator=g, dtype=f64) * 0.6
        b = torch.randn(5, generator=g, dtype=f64) * 0.2
        t = {
            "interior": [0.0, 0.3, 0.6, 0.9],
            "boundary": [0.99, 0.999, 1.5, 10.0],
            "tiny": [1e-12, 1e-8, 1e-6, 1e-4],
        }[regime]
        if regime == "boundary":
            w = w * 3
        x = _with_norms((4, 4), [s / math.sqrt(c) for s in t], seed=32)
        return x.to(dtype), w.to(dtype), b.to(dtype)

    return {
        "expmap0": (lambda v, c: ball.expmap0(v, c=c), radial_case("exp")),
        "logmap0": (lambda x, c: ball.logmap0(x, c=c), radial_case("log")),
        "mobius_add": (lambda x, y, c: ball.mobius_add(x, y, c=c), mobius_case),
        "dist": (lambda x, y, c: ball.dist(x, y, c=c), pair_case),
        "logmap": (lambda x, y, c: ball.logmap(x, y, c=c), pair_case),
        "expmap": (lambda x, v, c: ball.expmap(x, v, c=c), pair_case),
        "fc_tangent": (lambda d, s, z, b, c: ball.fc_tangent(d, s, z, b, c=c), fc_case),
        "fully_connected": (
            lambda x, w, b, c: ball.fully_connected(x, w, b, c=c),
            fully_connected_case,
        ),
    }


PUBLIC_OPS = _public_ops()


def _values_and_grads(name, inputs, c, manual, dtype):
    fn = PUBLIC_OPS[name][0]
    ins = [_leaf(t) for t in inputs]
    ct = torch.tensor(c, dtype=dtype, requires_grad=True)
    with ball.manual_backward(manual):
        out = fn(*ins, ct)
    upstream = torch.randn(out.shape, generator=_gen(33), dtype=f64).to(dtype)
    grads = torch.autograd.grad(out, [*ins, ct], upstream)
    return out.detach(), grads


@pytest.mark.parametrize("regime", ["interior", "boundary", "tiny"])
@pytest.mark.parametrize("name", list(PUBLIC_OPS))
def test_manual_matches_autograd_f64(name, regime):
    for c in (0.3, 2.0):
        inputs = PUBLIC_OPS[name][1](regime, c, f64)
        out_m, grads_m = _values_and_grads(name, inputs, c, True, f64)
        out_a, grads_a = _values_and_grads(name, inputs, c, False, f64)
        torch.testing.assert_close(out_m, out_a, rtol=1e-10, atol=1e-12)
        for i, (gm, ga) in enumerate(zip(grads_m, grads_a, strict=True)):
            assert torch.isfinite(gm).all(), (name, i)
            # plain autograd differentiates 0/0-prone forms (tanh(t)/t, ...) at tiny arguments
            # and loses digits there (as do composite ops at y ≈ x, whose c-gradients are
            # ~1e-13 of rounding noise): compare relative to the gradient's scale, with a floor
            scale = float(ga.abs().max()) + (1e-7 if regime == "tiny" else 1e-30)
            err = float((gm - ga).abs().max()) / scale
            assert err < (1e-6 if regime == "tiny" else 1e-8), (name, i, err)


@pytest.mark.parametrize("name", list(PUBLIC_OPS))
def test_manual_matches_autograd_f32(name):
    """float32, interior points: manual and reference agree to ~1e-5 relative."""
    for c in (0.3, 2.0):
        inputs = PUBLIC_OPS[name][1]("interior", c, torch.float32)
        out_m, grads_m = _values_and_grads(name, inputs, c, True, torch.float32)
        out_a, grads_a = _values_and_grads(name, inputs, c, False, torch.float32)
        torch.testing.assert_close(out_m, out_a, rtol=1e-5, atol=1e-5)
        for i, (gm, ga) in enumerate(zip(grads_m, grads_a, strict=True)):
            scale = float(ga.abs().max()) + 1e-30
            err = float((gm - ga).abs().max()) / scale
            assert err < 2e-5, (name, i, err)


@pytest.mark.parametrize("manual", [True, False], ids=["manual", "autograd"])
@pytest.mark.parametrize("name", list(PUBLIC_OPS))
def test_extreme_inputs_float32_finite(name, manual):
    """Zeros, 1e-30 and 1e6 in float32: values and gradients finite."""
    dtype = torch.float32
    base = PUBLIC_OPS[name][1]("interior", 1.0, dtype)
    for scale in (0.0, 1e-30, 1e6):
        points = 2 if name in ("mobius_add", "dist", "logmap", "expmap") else 1
        inputs = [t * scale if i < points else t for i, t in enumerate(base)]
        if name == "fc_tangent":
            inputs[1] = base[1] * scale**2
        for c in (0.1, 2.5):
            out, grads = _values_and_grads(name, inputs, c, manual, dtype)
            assert torch.isfinite(out).all(), (name, scale, c)
            for i, g in enumerate(grads):
                assert torch.isfinite(g).all(), (name, scale, c, i)


# ------------------------------------------------------------------------------ torch.compile


@pytest.mark.parametrize("name", ["expmap0", "logmap0", "mobius_add", "fc_tangent"])
def test_compile_fullgraph_no_graph_breaks(name):
    """Forward + backward of each custom op compiles as one graph (no host sync, no break)."""
    torch._dynamo.reset()
    fn = PUBLIC_OPS[name][0]
    inputs = PUBLIC_OPS[name][1]("interior", 0.8, torch.float32)
    if name == "mobius_add":
        inputs = (inputs[0], inputs[1] * 1.5)  # some results clipped

    def step(*args):
        *ins, ct = args
        out = fn(*ins, ct)
        return out, (out * out).sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for f in (step, compiled):
        ins = [_leaf(t) for t in inputs]
        ct = torch.tensor(0.8, requires_grad=True)
        out, loss = f(*ins, ct)
        grads = torch.autograd.grad(loss, [*ins, ct])
        results.append((out, grads))
    (out_e, grads_e), (out_c, grads_c) = results
    torch.testing.assert_close(out_c, out_e)
    for ge, gc in zip(grads_e, grads_c, strict=True):
        torch.testing.assert_close(gc, ge)
    # a Python-float curvature compiles too
    ins = [_leaf(t) for t in inputs]
    out_f, _ = torch.compile(lambda *a: step(*a, 0.8), fullgraph=True, backend="aot_eager")(*ins)
    torch.testing.assert_close(out_f, out_e)
