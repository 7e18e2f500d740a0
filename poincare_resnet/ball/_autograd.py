"""Hand-written backward passes for the hot Poincaré-ball operations.

Each ``torch.autograd.Function`` saves only its inputs (never intermediates) and recomputes the
cheap element-wise terms in ``backward``; none synchronises with the host. The curvature ``c`` is
a Python float or a scalar tensor; its gradient is returned when it requires one.

Small-argument limits (0/0 forms) use Taylor series below a dtype-dependent threshold.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .config import MIN_NORM, get_eps, max_tangent_radius

# 2·|z|·asinh(q) is clamped here before sinh: beyond it the output sits on the clip radius anyway,
# and the clamp keeps ‖sinh(·)‖² finite in float32.
FC_ARG_LIMIT = 40.0


def fast_asinh(q: Tensor) -> Tensor:
    """``asinh(q) = sign(q)·log1p(|q|·(1 + |q|/(1 + h)))``, ``h = hypot(1, q) = √(1 + q²)``: the
    same values as ``torch.asinh`` (to rounding) at about a third of its cost on CPU, where
    ``aten::asinh`` is not vectorised; stable for small and large ``|q|``. ``hypot`` and the
    factored form never square ``q`` (``q²/(1 + √(1 + q²))`` was inf/inf = NaN from
    ``|q| ≈ 1.8e19`` on in float32); NaN gives NaN and ±inf gives ±inf (and so, one binade
    early, does ``|q| > max/2``, where ``2|q|`` overflows)."""
    a = q.abs()
    h = torch.hypot(torch.ones((), dtype=a.dtype, device=a.device), a)
    # |q|/(1 + h) → 1 as |q| → ∞; the clamp keeps it so at |q| = inf (not inf/inf)
    ratio = a.clamp_max(torch.finfo(a.dtype).max) / (1 + h)
    return torch.copysign(torch.log1p(a * (1 + ratio)), q)


def _small(dtype: torch.dtype) -> float:
    return 1e-2 if dtype == torch.float64 else 1e-1


def _sum_to_c(grad: Tensor, c: Tensor) -> Tensor:
    return grad.sum().reshape(c.shape) if c.dim() else grad.sum()


def _sqrt(c: float | Tensor) -> float | Tensor:
    return c**0.5


# ---------------------------------------------------------------------------------------------
# Radial maps: expmap0 and logmap0 (with their projection) are both  y = α(√c‖v‖)·v.
# ---------------------------------------------------------------------------------------------


def _radial_terms(v: Tensor, c: float | Tensor, dim: int, kind: str) -> tuple[Tensor, ...]:
    """Return (n², α, γ) with y = α v and ∂y/∂v = α I + γ v vᵀ (γ stable at n → 0)."""
    n2 = v.pow(2).sum(dim, keepdim=True)
    n = n2.clamp_min(MIN_NORM**2).sqrt()
    sc = _sqrt(c)
    t = sc * n
    small = t < _small(v.dtype)
    t2 = t * t
    if kind == "exp":
        limit = max_tangent_radius(v.dtype)
        clipped = t > limit
        tc = t.clamp_max(limit)
        th = torch.tanh(tc)
        alpha = torch.where(small, 1 - t2 / 3 + 2 * t2 * t2 / 15, th / t)
        sech2 = 1 - th * th
        k_exact = (sech2 - alpha) / t2
        k_series = -2.0 / 3.0 + 8.0 / 15.0 * t2 - 0.3238 * t2 * t2
    else:  # "log"
        limit = 1.0 - get_eps(v.dtype)
        clipped = t > limit
        tc = t.clamp_max(limit)
        at = torch.atanh(tc)
        alpha = torch.where(small, 1 + t2 / 3 + t2 * t2 / 5, at / t)
        beta = 1 / (1 - tc * tc)
        k_exact = (beta - alpha) / t2
        k_series = 2.0 / 3.0 + 4.0 / 5.0 * t2 + 6.0 / 7.0 * t2 * t2
    gamma = torch.where(small, k_series, k_exact) * c
    gamma = torch.where(clipped, -alpha / n2.clamp_min(MIN_NORM**2), gamma)
    return n2, alpha, gamma


class RadialMap(torch.autograd.Function):
    """``expmap0`` / ``logmap0`` with projection: y = α(√c‖v‖) v."""

    @staticmethod
    def forward(v: Tensor, c: float | Tensor, dim: int, kind: str) -> Tensor:  # type: ignore[override]
        _, alpha, _ = _radial_terms(v, c, dim, kind)
        return alpha * v

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        v, c, dim, kind = inputs
        ctx.dim, ctx.kind = dim, kind
        ctx.c_is_tensor = isinstance(c, Tensor)
        if ctx.c_is_tensor:
            ctx.save_for_backward(v, c)
        else:
            ctx.save_for_backward(v)
            ctx.c = c

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        if ctx.c_is_tensor:
            v, c = ctx.saved_tensors
        else:
            (v,) = ctx.saved_tensors
            c = ctx.c
        n2, alpha, gamma = _radial_terms(v, c, ctx.dim, ctx.kind)
        gv = (grad * v).sum(ctx.dim, keepdim=True)
        grad_v = alpha * grad + (gamma * gv) * v if ctx.needs_input_grad[0] else None
        grad_c = None
        if ctx.c_is_tensor and ctx.needs_input_grad[1]:
            grad_c = _sum_to_c(gv * gamma * n2 / (2 * c), c)
        return grad_v, grad_c, None, None


# ---------------------------------------------------------------------------------------------
# Möbius addition (with projection of the result)
# ---------------------------------------------------------------------------------------------


def _mobius_terms(x: Tensor, y: Tensor, c: float | Tensor, dim: int) -> tuple[Tensor, ...]:
    xy = (x * y).sum(dim, keepdim=True)
    x2 = x.pow(2).sum(dim, keepdim=True)
    y2 = y.pow(2).sum(dim, keepdim=True)
    a = 1 + 2 * c * xy + c * y2
    b = 1 - c * x2
    d = (1 + 2 * c * xy + c * c * x2 * y2).clamp_min(MIN_NORM)
    out = (a * x + b * y) / d
    return xy, x2, y2, a, b, d, out


def _projection_scale(out: Tensor, c: float | Tensor, dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """Return (o², clipped mask, scale) with project(out) = scale · out."""
    o2 = out.pow(2).sum(dim, keepdim=True).clamp_min(MIN_NORM**2)
    radius = (1 - get_eps(out.dtype)) / _sqrt(c)
    o = o2.sqrt()
    clipped = o > radius
    scale = torch.where(clipped, radius / o, torch.ones_like(o))
    return o2, clipped, scale


class MobiusAdd(torch.autograd.Function):
    """``project(x ⊕ y)`` with the closed-form gradient for x, y and c."""

    @staticmethod
    def forward(x: Tensor, y: Tensor, c: float | Tensor, dim: int) -> Tensor:  # type: ignore[override]
        out = _mobius_terms(x, y, c, dim)[-1]
        return out * _projection_scale(out, c, dim)[2]

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        x, y, c, dim = inputs
        ctx.dim = dim
        ctx.c_is_tensor = isinstance(c, Tensor)
        ctx.x_shape, ctx.y_shape = x.shape, y.shape
        if ctx.c_is_tensor:
            ctx.save_for_backward(x, y, c)
        else:
            ctx.save_for_backward(x, y)
            ctx.c = c

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        if ctx.c_is_tensor:
            x, y, c = ctx.saved_tensors
        else:
            x, y = ctx.saved_tensors
            c = ctx.c
        dim = ctx.dim
        # Everything below is per-point scalars except the five inner products and the final
        # combinations grad_x = α₁G + α₂x + α₃y, grad_y = β₁G + β₂x + β₃y (out = (a x + b y)/d
        # and the projection's correction are never formed as vectors).
        xy = (x * y).sum(dim, keepdim=True)
        x2 = x.pow(2).sum(dim, keepdim=True)
        y2 = y.pow(2).sum(dim, keepdim=True)
        gx0 = (grad * x).sum(dim, keepdim=True)
        gy0 = (grad * y).sum(dim, keepdim=True)
        a = 1 + 2 * c * xy + c * y2
        b = 1 - c * x2
        d = (1 + 2 * c * xy + c * c * x2 * y2).clamp_min(MIN_NORM)
        o2 = ((a * a * x2 + 2 * a * b * xy + b * b * y2) / (d * d)).clamp_min(MIN_NORM**2)
        o = o2.sqrt()
        radius = (1 - get_eps(x.dtype)) / _sqrt(c)
        clipped = o > radius
        scale = torch.where(clipped, radius / o, torch.ones_like(o))
        g_po = (a * gx0 + b * gy0) / d  # ⟨G, out⟩
        # backward through the projection p = s(o)·o:  g = s G − k out,  k = s⟨G, out⟩/‖out‖²
        k = torch.where(clipped, scale * g_po / o2, torch.zeros_like(o2))
        kd = k / d
        gx = scale * gx0 - kd * (a * x2 + b * xy)  # ⟨g, x⟩
        gy = scale * gy0 - kd * (a * xy + b * y2)  # ⟨g, y⟩
        go = (a * gx + b * gy) / d  # ⟨g, out⟩
        two_c = 2 * c
        grad_x = grad_y = grad_c = None
        if ctx.needs_input_grad[0]:
            cx = (-a * kd * a - two_c * gy - two_c * c * go * y2) / d
            cy = (-a * kd * b + two_c * gx - two_c * go) / d
            grad_x = torch.addcmul(torch.addcmul(grad * (a * scale / d), cx, x), cy, y)
            grad_x = grad_x.sum_to_size(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            cx = (-b * kd * a + two_c * gx - two_c * go) / d
            cy = (-b * kd * b + two_c * gx - two_c * c * go * x2) / d
            grad_y = torch.addcmul(torch.addcmul(grad * (b * scale / d), cx, x), cy, y)
            grad_y = grad_y.sum_to_size(ctx.y_shape)
        if ctx.c_is_tensor and ctx.needs_input_grad[2]:
            dc = (gx * (2 * xy + y2) - gy * x2 - go * (2 * xy + 2 * c * x2 * y2)) / d
            # the projection radius (1-ε)/√c also depends on c: ∂p/∂c = −p/(2c) where clipped
            dc = dc - torch.where(clipped, g_po * scale / (2 * c), torch.zeros_like(g_po))
            grad_c = _sum_to_c(dc, c)
        return grad_x, grad_y, grad_c, None


# ---------------------------------------------------------------------------------------------
# The HNN++ fully connected map in tangent form (used by PoincareLinear, PoincareConv2d, the head)
# ---------------------------------------------------------------------------------------------


def _fc_input_terms(dots, sq, znorm, bias, c, dim):
    """Per-position and per-feature terms of the tangent FC map: ``(sc, n, clipped_in, small, t2,
    sinh2t, a, e, zn, ch, sh)`` with ``a = sinh(2t)/‖p‖``, ``e = cosh(2t)``, ``ch, sh =
    cosh, sinh(2√c r)`` shaped to broadcast along ``dim``."""
    sc = _sqrt(c)
    limit = max_tangent_radius(dots.dtype)
    n = sq.clamp_min(MIN_NORM**2).sqrt()
    t = sc * n
    clipped_in = t > limit
    tc = t.clamp_max(limit)
    small = t < _small(dots.dtype)
    t2 = t * t
    sinh2t = torch.sinh(2 * tc)
    a = torch.where(small, sc * (2 + 4 * t2 / 3 + 4 * t2 * t2 / 15), sinh2t / n)
    e = torch.cosh(2 * tc)
    shape = [1] * dots.dim()
    shape[dim] = -1
    two_sr = 2 * sc * bias.reshape(shape)
    return (
        sc,
        n,
        clipped_in,
        small,
        t2,
        sinh2t,
        a,
        e,
        znorm.reshape(shape),
        torch.cosh(two_sr),
        torch.sinh(two_sr),
    )


def _fc_forward_terms(dots, sq, znorm, bias, c, dim):
    """Intermediate terms of the tangent-form FC map (see :class:`FullyConnectedTangent`)."""
    dtype = dots.dtype
    limit = max_tangent_radius(dtype)
    sc, n, clipped_in, small, t2, sinh2t, a, e, zn, ch, sh = _fc_input_terms(
        dots, sq, znorm, bias, c, dim
    )
    t = sc * n
    tc = t.clamp_max(limit)
    q = a * dots * ch - e * sh
    h = fast_asinh(q)
    g_raw = 2 * zn * h
    g = g_raw.clamp(-FC_ARG_LIMIT, FC_ARG_LIMIT)
    psi = torch.sinh(g)
    p2 = psi.pow(2).sum(dim, keepdim=True)
    p = p2.clamp_min(MIN_NORM**2).sqrt()
    rho = torch.asinh(p)
    out_limit = 2 * limit
    clipped_out = rho > out_limit
    small_p = p < _small(dtype)
    kappa_base = torch.where(small_p, 1 - p2 / 6 + 3 * p2 * p2 / 40, rho / p)
    kappa = torch.where(clipped_out, out_limit / p, kappa_base) / (2 * sc)
    return dict(
        sc=sc,
        n=n,
        t=t,
        t2=t2,
        tc=tc,
        small=small,
        clipped_in=clipped_in,
        sinh2t=sinh2t,
        a=a,
        e=e,
        zn=zn,
        ch=ch,
        sh=sh,
        q=q,
        h=h,
        g=g,
        g_raw=g_raw,
        psi=psi,
        p=p,
        p2=p2,
        small_p=small_p,
        clipped_out=clipped_out,
        kappa_base=kappa_base,
        kappa=kappa,
    )


class FullyConnectedTangent(torch.autograd.Function):
    """Tangent form of the HNN++ FC layer: ``logmap0(FC(expmap0(p)))`` from ⟨p, ẑ_k⟩ and ‖p‖².

    Inputs: ``dots`` (⟨p, ẑ_k⟩ along ``dim``), ``sq`` (‖p‖², size 1 along ``dim``), ``znorm``
    (‖z_k‖), ``bias`` (r_k), ``c``. With t = min(√c‖p‖, artanh(1−ε)) and x = expmap0(p)::

        √c λ_x ⟨x, ẑ_k⟩ = sinh(2t)/‖p‖ · ⟨p, ẑ_k⟩,    λ_x − 1 = cosh(2t)
        q_k = √c λ_x ⟨x, ẑ_k⟩ cosh(2√c r_k) − (λ_x − 1) sinh(2√c r_k)
        ψ_k = √c w_k = sinh(2‖z_k‖ asinh(q_k))
        out = asinh(‖ψ‖)/(2√c‖ψ‖) · ψ                (‖out‖ capped at artanh(1−ε)/√c)
    """

    @staticmethod
    def forward(dots, sq, znorm, bias, c, dim):  # type: ignore[override]
        terms = _fc_forward_terms(dots, sq, znorm, bias, c, dim)
        return terms["kappa"] * terms["psi"]

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        dots, sq, znorm, bias, c, dim = inputs
        ctx.dim = dim
        ctx.c_is_tensor = isinstance(c, Tensor)
        if ctx.c_is_tensor:
            ctx.save_for_backward(dots, sq, znorm, bias, c)
        else:
            ctx.save_for_backward(dots, sq, znorm, bias)
            ctx.c = c

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if ctx.c_is_tensor:
            dots, sq, znorm, bias, c = ctx.saved_tensors
        else:
            dots, sq, znorm, bias = ctx.saved_tensors
            c = ctx.c
        return _fc_backward(grad, dots, sq, znorm, bias, c, ctx.dim, ctx.needs_input_grad)


def _fc_small_backward(
    grad_a, grad_e, grad_ch, grad_sh, bias, sc, n, clipped_in, small, t2, sinh2t, a, e, needs
):
    """Gradients of ``sq`` and ``bias`` from those of the per-pixel terms a = sinh(2t)/n,
    e = cosh(2t) and of the per-feature terms cosh(2√c r), sinh(2√c r)."""
    c_val = sc * sc
    two_sc = 2 * sc
    grad_bias = None
    if needs[3]:
        ch_k, sh_k = torch.cosh(two_sc * bias), torch.sinh(two_sc * bias)
        grad_bias = (grad_ch * sh_k + grad_sh * ch_k) * two_sc
    grad_sq = None
    if needs[1]:
        da_dsq = torch.where(
            small,
            (sc * c_val) * (4.0 / 3.0 + 8.0 / 15.0 * t2),
            (2 * sc * n * e - sinh2t) / (2 * n * n * n),
        )
        de_dsq = torch.where(small, c_val * (2 + 4 * t2 / 3), sc * sinh2t / n)
        da_dsq = torch.where(clipped_in, -a / (2 * n * n), da_dsq)
        de_dsq = torch.where(clipped_in, torch.zeros_like(de_dsq), de_dsq)
        grad_sq = grad_a * da_dsq + grad_e * de_dsq
    return grad_sq, grad_bias


def _fc_backward(grad, dots, sq, znorm, bias, c, dim, needs):
    """Backward of :class:`FullyConnectedTangent`: recomputes the forward terms in order and
    drops each full-size tensor as soon as it is used, so at most a few are alive at once."""
    dtype = dots.dtype
    limit = max_tangent_radius(dtype)
    sc, n, clipped_in, small, t2, sinh2t, a, e, zn, ch, sh = _fc_input_terms(
        dots, sq, znorm, bias, c, dim
    )
    reduce_dims = [i for i in range(dots.dim()) if i != dim % dots.dim()]

    def per_feature(x: Tensor) -> Tensor:
        return x.sum(reduce_dims) if reduce_dims else x.reshape(-1)

    # forward recomputation of the full-size chain
    q = a * dots * ch - e * sh
    h = fast_asinh(q)
    g_raw = 2 * zn * h
    clamped = g_raw.abs() > FC_ARG_LIMIT  # (NaN is not clamped: its gradient stays NaN)
    g = g_raw.clamp(-FC_ARG_LIMIT, FC_ARG_LIMIT)
    del g_raw
    psi = torch.sinh(g)
    p2 = psi.pow(2).sum(dim, keepdim=True)
    p = p2.clamp_min(MIN_NORM**2).sqrt()
    rho = torch.asinh(p)
    clipped_out = rho > 2 * limit
    small_p = p < _small(dtype)
    kappa_base = torch.where(small_p, 1 - p2 / 6 + 3 * p2 * p2 / 40, rho / p)
    kappa = torch.where(clipped_out, 2 * limit / p, kappa_base) / (2 * sc)
    # u = κ(‖ψ‖) ψ  →  ∂L/∂ψ = κ G + κ'‖ψ‖ ⟨G, ψ̂⟩ ψ̂  with ψ̂ = ψ/‖ψ‖. The form (κ'/‖ψ‖)⟨G, ψ⟩ψ
    # underflows float32 where the output is clipped (κ/‖ψ‖² ~ 1e-49 at ‖ψ‖ ~ 1e17).
    psi = psi / p  # ψ̂
    g_psi_hat = (grad * psi).sum(dim, keepdim=True)
    k_series = p2 * (-1.0 / 3.0 + 0.3 * p2 - 0.267857 * p2 * p2)
    k_exact = 1 / torch.sqrt(1 + p2) - kappa_base
    kp2 = torch.where(small_p, k_series, k_exact) / (2 * sc)  # κ'‖ψ‖
    kp2 = torch.where(clipped_out, -kappa, kp2)
    grad_g = kappa * grad + (kp2 * g_psi_hat) * psi
    del psi
    # ψ = sinh(g), g = 2|z| asinh(q)   (no gradient where g was clamped)
    grad_g = torch.where(
        clamped, torch.zeros((), dtype=dtype, device=dots.device), grad_g * torch.cosh(g)
    )
    del g, clamped
    grad_znorm = per_feature(grad_g * 2 * h) if needs[2] else None
    del h
    grad_q = grad_g * (2 * zn) / torch.sqrt(1 + q * q)
    del grad_g, q
    grad_dots = grad_q * (a * ch) if needs[0] else None
    gq_dot = grad_q * dots
    grad_ch = per_feature(gq_dot * a)  # ∂L/∂cosh(2√c r)
    grad_a = (gq_dot * ch).sum(dim, keepdim=True)
    del gq_dot
    grad_sh = -per_feature(grad_q * e)  # ∂L/∂sinh(2√c r)
    grad_e = -(grad_q * sh).sum(dim, keepdim=True)
    del grad_q
    grad_sq, grad_bias = _fc_small_backward(
        grad_a, grad_e, grad_ch, grad_sh, bias, sc, n, clipped_in, small, t2, sinh2t, a, e, needs
    )
    grad_c = None
    if isinstance(c, Tensor) and needs[4]:
        # explicit c-dependence: κ ∝ 1/√c; a, e through t = √c n; cosh/sinh(2√c r).
        dc = -(kappa * p * g_psi_hat).sum() / (2 * c)  # −⟨G, out⟩/(2c)
        da_dc = torch.where(clipped_in, torch.zeros_like(a), e / sc)
        de_dc = torch.where(clipped_in, torch.zeros_like(e), sinh2t * n / sc)
        dc = dc + (grad_a * da_dc + grad_e * de_dc).sum()
        ch_k, sh_k = torch.cosh(2 * sc * bias), torch.sinh(2 * sc * bias)
        dc = dc + ((grad_ch * sh_k + grad_sh * ch_k) * bias / sc).sum()
        grad_c = dc.reshape(c.shape)
    return grad_dots, grad_sq, grad_znorm, grad_bias, grad_c, None
