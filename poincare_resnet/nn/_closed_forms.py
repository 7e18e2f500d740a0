"""Closed forms (few-pass autograd) of the batch norm and the residual on tangent maps.

Every point these layers touch is a per-pixel linear combination of a few vectors (the input
tangent ``V``, the batch mean ``μ``, the centre ``β``, the two residual inputs). So each Möbius
operation reduces to arithmetic on per-pixel scalars (``[B, 1, H, W]``, C times smaller than the
activations) given a handful of inner products, and only those inner products and the final
combination touch the full ``[B, C, H, W]`` tensors. The results are identical to chaining
``expmap0``/``mobius_add``/``gyration``/``logmap0`` of :mod:`poincare_resnet.ball` (the layer tests
check this) at a fraction of the passes over memory; autograd of these few ops keeps the graph
small.

These autograd forms are the fallback for what the PyTorch path (:mod:`._torch_batchnorm`,
:mod:`._torch_residual`) does not take — a learnable curvature that needs its gradient,
synchronised batch norm — and the tests' float64 reference. Their float32 ``(−μ) ⊕ x`` loses
~1e-3 near the boundary where the other two paths form it from ``d = x − μ``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ball.config import MIN_NORM

Scalar = Tensor | float


def _radial(n2: Tensor, sc: Scalar, t_max: float) -> tuple[Tensor, Tensor]:
    """For ``x = expmap0(v)`` with ``‖v‖² = n2``: return (α, tanh t) with ``x = α v``."""
    n = n2.clamp_min(MIN_NORM**2).sqrt()
    th = torch.tanh((sc * n).clamp_max(t_max))
    return th / (sc * n), th


def _logmap_scale(o2: Tensor, sc: Scalar, s_max: float) -> Tensor:
    """Projection then ``logmap0`` of a point with ``‖o‖² = o2``: the factor on ``o``."""
    on = o2.clamp_min(MIN_NORM**2).sqrt()
    s = (sc * on).clamp_max(s_max)  # = √c‖project(o)‖
    return torch.atanh(s) / (sc * on)


def midpoint_stats(v: Tensor, alpha: Tensor, th: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sums for the gyromidpoint of ``x = α v``: ``(Σ γ² x [C], Σ γ², N)``, ``γ² = 1/(1 − th²)``."""
    gamma2 = 1 / (1 - th * th).clamp_min(MIN_NORM)
    s1 = (v * (gamma2 * alpha)).sum((0, 2, 3))
    n = torch.full((), float(v.numel() // v.shape[1]), dtype=v.dtype, device=v.device)
    return s1, gamma2.sum(), n


def midpoint_from_sums(s1: Tensor, s0: Tensor, n: Tensor, c: Scalar, eps: float) -> Tensor:
    """``m' = Σγ²x/(Σγ² − N/2)``, ``μ = m'/(1 + √(1 − c‖m'‖²))``, projected; shape [C]."""
    m = s1 / (s0 - n / 2).clamp_min(MIN_NORM)
    mu = m / (1 + torch.sqrt((1 - c * m.pow(2).sum()).clamp_min(MIN_NORM)))
    radius = (1 - eps) / c**0.5
    norm = mu.norm().clamp_min(MIN_NORM)
    return torch.where(norm > radius, mu / norm * radius, mu)


def batchnorm_forward(
    v: Tensor,
    mu: Tensor | None,
    beta_t: Tensor,
    weight: Tensor,
    var: Tensor | None,
    c: Scalar,
    bn_eps: float,
    proj_eps: float,
    t_max: float,
    all_reduce=None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Poincaré batch norm of a tangent map ``v [B, C, H, W]`` in closed form.

    ``mu`` (ball point, [C]) and ``var`` are the running statistics, or ``None`` to use the batch
    ones. ``beta_t`` is the tangent of the centre, ``weight`` the target standard deviation.
    Returns ``(output tangent, μ, σ², N)``. Computes, per pixel,
    ``logmap0(β ⊕ gyr[β, −μ](r ⊗ ((−μ) ⊕ expmap0(v))))`` with ``r = |weight| / √(σ² + eps)``.
    """
    sc = c**0.5
    s_max = 1 - proj_eps
    radius = s_max / sc
    n2 = v.pow(2).sum(1, keepdim=True)
    ax, th = _radial(n2, sc, t_max)
    x2 = th * th / c
    count = None
    if mu is None:
        s1, s0, count = midpoint_stats(v, ax, th)
        if all_reduce is not None:
            sums = all_reduce(torch.cat([s1, s0.view(1), count.view(1)]))
            s1, s0, count = sums[:-2], sums[-2], sums[-1]
        mu = midpoint_from_sums(s1, s0, count, c, proj_eps)
    # a tangent at the origin β = expmap0(beta_t)
    bt2 = beta_t.pow(2).sum()
    b_alpha, _ = _radial(bt2, sc, t_max)
    beta = beta_t * b_alpha
    basis = torch.stack([mu, beta])  # [2, C]
    m2, b2, bm = mu.pow(2).sum(), beta.pow(2).sum(), (beta * mu).sum()
    # m = (−μ) ⊕ x = a1 μ + a2 v, formed explicitly (its norm by a Gram form would cancel
    # catastrophically in float32 when x ≈ μ near the boundary), then projected
    xy = -ax * torch.einsum("bchw,c->bhw", v, mu).unsqueeze(1)
    den = (1 + 2 * c * xy + c * c * m2 * x2).clamp_min(MIN_NORM)
    a1 = -(1 + 2 * c * xy + c * x2) / den
    a2 = (1 - c * m2) * ax / den
    m = torch.addcmul(a1 * mu.view(1, -1, 1, 1), a2, v)
    mn = m.pow(2).sum(1, keepdim=True).clamp_min(MIN_NORM**2).sqrt()
    shrink = torch.where(mn > radius, radius / mn, torch.ones_like(mn))
    mn = mn * shrink
    at = torch.atanh((sc * mn).clamp_max(s_max))  # d(x, μ) = 2 at / √c
    if var is None:
        d2 = (2 / sc * at).pow(2)
        sums = torch.stack(
            [d2.sum(), torch.full((), float(d2.numel()), dtype=d2.dtype, device=d2.device)]
        )
        if all_reduce is not None:
            sums = all_reduce(sums)
        var, count = sums[0] / sums[1], sums[1]
    r = weight.abs() / torch.sqrt(var + bn_eps)
    # w = r ⊗ project(m) = s_w m  (s_w stays moderate: at ≈ √c‖m‖ for small m)
    s_w = torch.tanh(r * at) / (sc * mn) * shrink
    proj = torch.einsum("bchw,kc->bkhw", m, basis)
    mm, mb = proj[:, :1], proj[:, 1:]  # ⟨μ, m⟩, ⟨β, m⟩
    mnn = mn * mn / (shrink * shrink)  # ‖m‖² before the projection

    def quad(cm: Scalar, cw: Scalar, cb: Scalar) -> Tensor:
        """``‖cm μ + cw m + cb β‖²`` from the Gram entries."""
        return (
            cm * cm * m2
            + cw * cw * mnn
            + cb * cb * b2
            + 2 * (cm * cw * mm + cm * cb * bm + cw * cb * mb)
        )

    # gyr[β, −μ] w = w + 2(ga β − gb μ)/gd  with u = β, v = −μ
    uw = s_w * mb
    vw = -s_w * mm
    uv = -bm
    c2 = c * c
    ga = -c2 * uw * m2 + c * vw + 2 * c2 * uv * vw
    gb = -c2 * vw * b2 - c * uw
    gd = (1 + 2 * c * uv + c2 * b2 * m2).clamp_min(MIN_NORM)
    e_mu, e_w, e_b = -2 * gb / gd, s_w, 2 * ga / gd  # w' = e_mu μ + e_w m + e_b β
    # β ⊕ w'
    bw = e_mu * bm + e_w * mb + e_b * b2
    w2 = quad(e_mu, e_w, e_b)
    big_a2 = 1 + 2 * c * bw + c * w2
    big_b2 = 1 - c * b2
    den2 = (1 + 2 * c * bw + c2 * b2 * w2).clamp_min(MIN_NORM)
    o_b, o_mu, o_w = (big_a2 + big_b2 * e_b) / den2, big_b2 * e_mu / den2, big_b2 * e_w / den2
    lg = _logmap_scale(quad(o_mu, o_w, o_b), sc, s_max)
    coef = torch.cat([lg * o_mu, lg * o_b], dim=1)  # [B, 2, H, W]
    out = torch.einsum("bkhw,kc->bchw", coef, basis).addcmul_(lg * o_w, m)
    return out, mu, var, count


def residual_forward(
    f: Tensor,
    res: Tensor,
    alpha: Scalar | None,
    c: Scalar,
    proj_eps: float,
    t_max: float,
    f_first: bool = True,
) -> Tensor:
    """``logmap0(expmap0(α f) ⊕ expmap0(res))`` (or ``res ⊕ f``) along dim 1, in closed form."""
    sc = c**0.5
    a = 1.0 if alpha is None else alpha
    nf2 = f.pow(2).sum(1, keepdim=True) * (a * a)
    nr2 = res.pow(2).sum(1, keepdim=True)
    fr = (f * res).sum(1, keepdim=True) * a
    af, thf = _radial(nf2, sc, t_max)
    ar, thr = _radial(nr2, sc, t_max)
    xf2, xr2, xfr = thf * thf / c, thr * thr / c, af * ar * fr
    if f_first:  # x = xf, y = xr
        x2, y2 = xf2, xr2
    else:
        x2, y2 = xr2, xf2
    big_a = 1 + 2 * c * xfr + c * y2
    big_b = 1 - c * x2
    den = (1 + 2 * c * xfr + c * c * x2 * y2).clamp_min(MIN_NORM)
    cx, cy = big_a / den, big_b / den
    cf, cr = (cx * af, cy * ar) if f_first else (cy * af, cx * ar)
    o = torch.addcmul(cr * res, cf * a, f)  # the ball point, formed explicitly
    lg = _logmap_scale(o.pow(2).sum(1, keepdim=True), sc, 1 - proj_eps)
    return o * lg
