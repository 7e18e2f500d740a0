"""Hand-written backward passes for the hot Poincaré-ball operations.

Each ``torch.autograd.Function`` saves only its inputs (never intermediates) and recomputes the
cheap element-wise terms in ``backward``; none synchronises with the host. The curvature ``c`` is
a Python float or a scalar tensor; its gradient is returned when it requires one.

Small-argument limits (0/0 forms) use Taylor series below a dtype-dependent threshold.
"""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from typing import NamedTuple

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


def _ind(x: Tensor, compare, threshold) -> Tensor:
    """``compare(x, threshold)`` as a 0/1 tensor of ``x``'s dtype. Written into a float tensor
    directly: on CPU a comparison into ``bool`` and a ``torch.where`` on it cost some 8 and 35
    multiplications of the same size (they are not vectorised), the float mask costs two."""
    return compare(x, threshold, out=torch.empty_like(x))


def _pick(mask: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """``a`` where the 0/1 ``mask`` is 1, else ``b`` (exactly, for finite ``a`` and ``b``:
    ``lerp`` returns its end points unrounded), at a tenth of ``torch.where``'s CPU cost."""
    return torch.lerp(b, a, mask)


def _fc_pixel_terms(sq: Tensor, c, dtype: torch.dtype):
    """Per-position terms of the tangent FC map from ``sq = ‖p‖²``: ``(sc, n, clipped_in, small,
    t2, sinh2t, a, e)`` with ``a = sinh(2t)/‖p‖``, ``e = cosh(2t)``, ``t = √c‖p‖`` capped
    (``clipped_in`` and ``small`` as 0/1 masks)."""
    sc = _sqrt(c)
    limit = max_tangent_radius(dtype)
    n = sq.clamp_min(MIN_NORM**2).sqrt()
    t = sc * n
    clipped_in = _ind(t, torch.gt, limit)
    tc2 = 2 * t.clamp_max(limit)
    small = _ind(t, torch.lt, _small(dtype))
    t2 = (t * t).clamp_max(1.0)  # the series' argument (capped: the other branch is picked there)
    sinh2t = torch.sinh(tc2)
    four_t2 = 4 * t2  # once for both series terms (the same values as forming it twice)
    a = _pick(small, sc * (2 + four_t2 / 3 + four_t2 * t2 / 15), sinh2t / n)
    return sc, n, clipped_in, small, t2, sinh2t, a, torch.cosh(tc2)


def _fc_feature_terms(znorm: Tensor, bias: Tensor, sc, shape) -> tuple[Tensor, Tensor, Tensor]:
    """``(2‖z_k‖, cosh(2√c r_k), sinh(2√c r_k))`` shaped to broadcast along the feature axis."""
    two_sr = 2 * sc * bias.reshape(shape)
    return 2 * znorm.reshape(shape), torch.cosh(two_sr), torch.sinh(two_sr)


def _feature_shape(dots: Tensor, dim: int) -> list[int]:
    shape = [1] * dots.dim()
    shape[dim] = -1
    return shape


def _fc_q(dots: Tensor, a: Tensor, e: Tensor, ch: Tensor, sh: Tensor) -> Tensor:
    """``q = a·dots·ch − e·sh`` in three full-size passes."""
    return torch.mul(e, -sh).addcmul_(a, dots * ch)


def _fc_asinh(q: Tensor) -> tuple[Tensor, Tensor]:
    """``(asinh(q), √(1 + q²))`` (the factored form of :func:`fast_asinh`, sharing the root)."""
    aq = q.abs()
    root = torch.hypot(aq, torch.ones((), dtype=q.dtype, device=q.device))
    ratio = aq.clamp_max(torch.finfo(q.dtype).max).div_(root + 1)
    return torch.copysign(torch.addcmul(aq, aq, ratio).log1p_(), q), root


def _fc_kappa(p2: Tensor, sc, dtype: torch.dtype, backward: bool = False):
    """``κ(‖ψ‖)`` with ``out = κψ`` from ``p2 = ‖ψ‖²`` (and, with ``backward``, ``(κ, κ'‖ψ‖,
    ‖ψ‖)``): ``κ = asinh(‖ψ‖)/(2√c‖ψ‖)``, the output norm capped at ``2·artanh(1−ε)/(2√c)``.
    ``asinh(p) = log1p(p + p²/(1 + √(1 + p²)))`` (``torch.asinh`` is not vectorised on CPU)."""
    limit = max_tangent_radius(dtype)
    p = p2.clamp_min(MIN_NORM**2).sqrt()
    root = (p2 + 1).sqrt_()
    rho = torch.log1p(p + p2 / (root + 1))
    clipped_out = _ind(rho, torch.gt, 2 * limit)
    small_p = _ind(p, torch.lt, _small(dtype))
    s2 = p2.clamp_max(1.0)  # the series' argument (capped: the other branch is picked there)
    kappa_base = _pick(small_p, 1 - s2 / 6 + 3 * s2 * s2 / 40, rho / p)
    kappa = _pick(clipped_out, 2 * limit / p, kappa_base) / (2 * sc)
    if not backward:
        return kappa
    k_series = s2 * (-1.0 / 3.0 + 0.3 * s2 - 0.267857 * s2 * s2)
    kp2 = _pick(small_p, k_series, 1 / root - kappa_base) / (2 * sc)  # κ'‖ψ‖
    return kappa, _pick(clipped_out, -kappa, kp2), p


def _fc_forward_terms(dots, sq, znorm, bias, c, dim):
    """Intermediate terms of the tangent-form FC map (see :class:`FullyConnectedTangent`), for
    the tests' regime checks (masks as booleans)."""
    sc, n, clipped_in, small, t2, sinh2t, a, e = _fc_pixel_terms(sq, c, dots.dtype)
    zn2, ch, sh = _fc_feature_terms(znorm, bias, sc, _feature_shape(dots, dim))
    q = _fc_q(dots, a, e, ch, sh)
    h = _fc_asinh(q)[0]
    g_raw = zn2 * h
    psi = torch.sinh(g_raw.clamp(-FC_ARG_LIMIT, FC_ARG_LIMIT))
    p2 = psi.pow(2).sum(dim, keepdim=True)
    kappa, _, p = _fc_kappa(p2, sc, dots.dtype, backward=True)
    rho = torch.asinh(p)
    return dict(
        small=small.bool(),
        clipped_in=clipped_in.bool(),
        clipped_out=rho > 2 * max_tangent_radius(dots.dtype),
        q=q,
        h=h,
        g_raw=g_raw,
        psi=psi,
        p=p,
        p2=p2,
        kappa=kappa,
    )


class FCTerms(NamedTuple):
    """What the backward of :class:`FullyConnectedTangent` recomputes from its inputs: the
    per-position terms of :func:`_fc_pixel_terms`, the per-feature ones of
    :func:`_fc_feature_terms`, the full-size ``h = asinh(q)``, ``root = √(1 + q²)``,
    ``g_raw = 2‖z‖h``, ``ψ = sinh(clamp(g_raw))``, ``ψ²`` (``g_raw`` and ``ψ²`` ``None`` when
    left to the backward), and ``(κ, κ'‖ψ‖, ‖ψ‖)`` per position."""

    sc: float | Tensor
    n: Tensor
    clipped_in: Tensor
    small: Tensor
    t2: Tensor
    sinh2t: Tensor
    a: Tensor
    e: Tensor
    zn2: Tensor
    ch: Tensor
    sh: Tensor
    h: Tensor
    root: Tensor
    g_raw: Tensor | None
    psi: Tensor
    psi2: Tensor | None
    kappa: Tensor
    kp2: Tensor
    p: Tensor


def _fc_terms(dots, sq, znorm, bias, c, dim, lean: bool = False) -> FCTerms:
    """The :class:`FCTerms` of the FC map at these inputs (``q``'s three full-size passes and
    ``asinh``'s seven, then four more and a sum); ``out = ψ·κ`` is what :func:`_fc_forward`
    returns, bit for bit (the same operations; ``linalg.vecdot(ψ, ψ)`` is ``(ψ·ψ).sum``).
    ``lean``: without ``g_raw`` and ``ψ²`` (``None``; one pass each to redo, two full-size maps
    fewer to keep)."""
    pixel = _fc_pixel_terms(sq, c, dots.dtype)
    sc, a, e = pixel[0], pixel[6], pixel[7]
    zn2, ch, sh = _fc_feature_terms(znorm, bias, sc, _feature_shape(dots, dim))
    h, root = _fc_asinh(_fc_q(dots, a, e, ch, sh))
    g_raw = h * zn2
    psi = g_raw.clamp(-FC_ARG_LIMIT, FC_ARG_LIMIT).sinh_()
    g_raw = None if lean else g_raw
    psi2 = psi * psi
    kappa, kp2, p = _fc_kappa(psi2.sum(dim, keepdim=True), sc, dots.dtype, backward=True)
    psi2 = None if lean else psi2
    return FCTerms(*pixel, zn2, ch, sh, h, root, g_raw, psi, psi2, kappa, kp2, p)


def _fc_forward(dots, sq, znorm, bias, c, dim):
    """``out = κ(‖ψ‖)·ψ`` of :class:`FullyConnectedTangent`: nine full-size passes."""
    sc, _, _, _, _, _, a, e = _fc_pixel_terms(sq, c, dots.dtype)
    zn2, ch, sh = _fc_feature_terms(znorm, bias, sc, _feature_shape(dots, dim))
    g = _fc_asinh(_fc_q(dots, a, e, ch, sh))[0].mul_(zn2)
    psi = g.clamp_(-FC_ARG_LIMIT, FC_ARG_LIMIT).sinh_()
    p2 = torch.linalg.vecdot(psi, psi, dim=dim).unsqueeze(dim)
    return psi.mul_(_fc_kappa(p2, sc, dots.dtype))


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
        return _fc_forward(dots, sq, znorm, bias, c, dim)

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
        ctx.fc_share = None
        if not torch.compiler.is_compiling():
            _record_node(ctx, inputs)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if ctx.c_is_tensor:
            dots, sq, znorm, bias, c = ctx.saved_tensors
        else:
            dots, sq, znorm, bias = ctx.saved_tensors
            c = ctx.c
        share = _claim_share(ctx, (dots, sq, znorm, bias, c, ctx.dim))
        return _fc_backward(grad, dots, sq, znorm, bias, c, ctx.dim, ctx.needs_input_grad, share)


# ---------------------------------------------------------------------------------------------
# Sharing the backward's terms with a recomputation of the output (nn.recompute.conv_norm)
# ---------------------------------------------------------------------------------------------

_SHARE = threading.local()


class FCShare:
    """The :class:`FCTerms` of one FC node, computed ahead of its backward (by
    :func:`fc_output_sharing_terms`), with the inputs they were computed from.

    Only a weak reference sits on the node's ``ctx`` (``ctx.fc_share``); the one strong
    reference is the callback queued on the running backward, which drops the terms when that
    backward ends (and is itself freed when the backward fails), so they never outlive it."""

    __slots__ = ("__weakref__", "inputs", "terms")

    def __init__(self, inputs: tuple, terms: FCTerms) -> None:
        self.inputs: tuple | None = inputs
        self.terms: FCTerms | None = terms

    def drop(self) -> None:
        """Forget the terms and the inputs (idempotent)."""
        self.inputs = self.terms = None

    def take(self) -> FCTerms | None:
        """The terms, handed over once: the share keeps no reference to them afterwards."""
        terms = self.terms
        self.drop()
        return terms


@contextlib.contextmanager
def record_fc_nodes() -> Iterator[list]:
    """Collect ``(ctx, inputs)`` of every :class:`FullyConnectedTangent` applied inside the block
    (eager only), for :func:`fc_output_sharing_terms`."""
    outer = getattr(_SHARE, "records", None)
    _SHARE.records = records = []
    try:
        yield records
    finally:
        _SHARE.records = outer


def _record_node(ctx, inputs: tuple) -> None:
    records = getattr(_SHARE, "records", None)
    if records is not None:
        records.append((ctx, inputs))


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def fc_output_sharing_terms(ctx, inputs: tuple) -> Tensor | None:
    """The output of the FC node ``ctx`` recomputed from its ``inputs`` (as recorded by
    :func:`record_fc_nodes`), its backward's :class:`FCTerms` left on ``ctx`` for it: the
    full-size ``h``, ``√(1 + q²)`` and ``ψ`` (three maps; ``g_raw`` and ``ψ²``, one pass each,
    are redone by the backward) and the per-position terms.

    Only inside a backward pass and without grad mode (``create_graph=True`` needs a
    differentiable recomputation: ``None`` then, and the caller recomputes the usual way).
    At most one share per thread holds terms: a new one drops the previous (whose node then
    recomputes its own), so a backward's peak grows by at most one layer's terms.

    Returns
    -------
    Tensor or None
        ``κ(‖ψ‖)·ψ``, bit for bit the forward's output; ``None`` where nothing is shared.
    """
    if torch.is_grad_enabled() or not _in_backward():
        return None
    previous = getattr(_SHARE, "latest", lambda: None)()
    if previous is not None:
        previous.drop()
    terms = _fc_terms(*inputs, lean=True)
    out = terms.psi * terms.kappa
    share = FCShare(inputs, terms)
    del terms
    torch.autograd.Variable._execution_engine.queue_callback(share.drop)
    _SHARE.latest = ctx.fc_share = weakref.ref(share)
    return out


def _same(a, b) -> bool:
    return a is b or (not isinstance(a, Tensor) and not isinstance(b, Tensor) and a == b)


def _claim_share(ctx, inputs: tuple) -> FCShare | None:
    """The node's share if it is alive, holds terms, and was computed from these very inputs
    (the tensors the node saved, by identity); the node's reference to it is cleared."""
    ref, ctx.fc_share = getattr(ctx, "fc_share", None), None
    share = None if ref is None else ref()
    if share is None or share.terms is None or torch.is_grad_enabled():
        return None
    if len(share.inputs) != len(inputs) or not all(map(_same, share.inputs, inputs)):
        share.drop()
        return None
    return share


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
        n2 = n * n
        # (… / n²) / n: finite where n³ would underflow (there the series is picked)
        da_exact = (2 * sc * n * e - sinh2t) / (2 * n2) / n
        da_dsq = _pick(small, (sc * c_val) * (4.0 / 3.0 + 8.0 / 15.0 * t2), da_exact)
        de_dsq = _pick(small, c_val * (2 + 4 * t2 / 3), sc * sinh2t / n)
        da_dsq = _pick(clipped_in, -a / (2 * n2), da_dsq)
        grad_sq = grad_a * da_dsq + grad_e * (de_dsq * (1 - clipped_in))
    return grad_sq, grad_bias


def _fc_reductions(gq: Tensor, dots: Tensor, a: Tensor, e: Tensor, ch: Tensor, sh: Tensor, dim):
    """``(∂L/∂a, ∂L/∂e, ∂L/∂ch, ∂L/∂sh)`` from ``gq = ∂L/∂q``, ``q = a·dots·ch − e·sh``: the
    per-pixel ones summed over features, the per-feature ones over positions; for ``[B, K, …]``
    maps along dim 1 as batched matrix products (one pass each, no product temporary)."""
    x = gq * dots
    if dim % dots.dim() == 1 and dots.dim() >= 3:
        b, k = dots.shape[0], dots.shape[1]
        x3, g3 = x.reshape(b, k, -1), gq.reshape(b, k, -1)
        a3, e3 = a.reshape(b, 1, -1).transpose(1, 2), e.reshape(b, 1, -1).transpose(1, 2)
        grad_a = torch.matmul(ch.reshape(1, k), x3).view(a.shape)
        grad_e = torch.matmul(-sh.reshape(1, k), g3).view(e.shape)
        grad_ch = torch.bmm(x3, a3).sum(0).view(k)
        grad_sh = torch.bmm(g3, e3).sum(0).view(k).neg_()
        return grad_a, grad_e, grad_ch, grad_sh
    reduce_dims = [i for i in range(dots.dim()) if i != dim % dots.dim()]

    def per_feature(t: Tensor) -> Tensor:
        return t.sum(reduce_dims) if reduce_dims else t.reshape(-1)

    grad_a = (x * ch).sum(dim, keepdim=True)
    grad_e = -(gq * sh).sum(dim, keepdim=True)
    return grad_a, grad_e, per_feature(x * a), -per_feature(gq * e)


def _fc_backward(grad, dots, sq, znorm, bias, c, dim, needs, share: FCShare | None = None):
    """Backward of :class:`FullyConnectedTangent`: takes the forward terms from ``share`` or
    recomputes them (:func:`_fc_terms`), and drops each full-size tensor as soon as it is used,
    so at most a few are alive at once."""
    terms = share.take() if share is not None else None
    if terms is None:
        terms = _fc_terms(dots, sq, znorm, bias, c, dim)
    sc, n, clipped_in, small, t2, sinh2t, a, e, zn2, ch, sh = terms[:11]
    h, root, g_raw, psi, psi2, kappa, kp2, p = terms[11:]
    del terms
    g_raw = h * zn2 if g_raw is None else g_raw
    psi2 = psi * psi if psi2 is None else psi2
    # u = κ(‖ψ‖) ψ  →  ∂L/∂ψ = κ G + (κ'‖ψ‖/‖ψ‖)(⟨G, ψ⟩/‖ψ‖) ψ, ordered so that nothing
    # underflows float32 where the output is clipped (κ/‖ψ‖² ~ 1e-49 at ‖ψ‖ ~ 1e17)
    g_psi = torch.linalg.vecdot(grad, psi, dim=dim).unsqueeze(dim)  # ⟨G, ψ⟩
    grad_g = torch.addcmul(kappa * grad, (kp2 / p) * (g_psi / p), psi)
    del psi
    # ψ = sinh(g), g = 2|z| asinh(q):  ∂ψ/∂g = cosh(g) = √(1 + ψ²); no gradient where g was
    # clamped, in one pass (the clamp's own backward; NaN is not clamped: its gradient stays NaN)
    grad_g = torch.ops.aten.hardtanh_backward(
        grad_g.mul_(psi2.add_(1).sqrt_()), g_raw, -FC_ARG_LIMIT, FC_ARG_LIMIT
    )
    del psi2, g_raw
    grad_znorm = 2 * (grad_g * h).sum_to_size(zn2.shape).view(-1) if needs[2] else None
    del h
    grad_q = grad_g.mul_(zn2).div_(root)  # ∂asinh(q)/∂q = 1/√(1 + q²)
    del grad_g, root
    grad_dots = (grad_q * ch).mul_(a) if needs[0] else None
    grad_a, grad_e, grad_ch, grad_sh = _fc_reductions(grad_q, dots, a, e, ch, sh, dim)
    del grad_q
    grad_sq, grad_bias = _fc_small_backward(
        grad_a, grad_e, grad_ch, grad_sh, bias, sc, n, clipped_in, small, t2, sinh2t, a, e, needs
    )
    grad_c = None
    if isinstance(c, Tensor) and needs[4]:
        # explicit c-dependence: κ ∝ 1/√c; a, e through t = √c n; cosh/sinh(2√c r).
        dc = -(kappa * g_psi).sum() / (2 * c)  # −⟨G, out⟩/(2c)
        inside = 1 - clipped_in
        dc = dc + (grad_a * (e / sc) * inside + grad_e * (sinh2t * n / sc) * inside).sum()
        ch_k, sh_k = torch.cosh(2 * sc * bias), torch.sinh(2 * sc * bias)
        dc = dc + ((grad_ch * sh_k + grad_sh * ch_k) * bias / sc).sum()
        grad_c = dc.reshape(c.shape)
    return grad_dots, grad_sq, grad_znorm, grad_bias, grad_c, None
