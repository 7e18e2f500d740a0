"""The Poincaré residual in PyTorch ops with a hand-written backward (any device).

The map and reverse mode of the native kernel (``poincare_resnet/_cpp/residual.cpp``) on
``[B, C, P]`` maps, per-pixel scalars ``[B, 1, P]``. With ``u = α f``::

    x_f = expmap0(u) = a_f u,   x_r = expmap0(res) = a_r res
    o = x ⊕ y  (x, y = x_f, x_r; swapped when f_first is false) = K f + c_r res
    out = logmap0(project(o)) = lg·o,   lg = atanh(min(√c‖o‖, 1 − eps)) / (√c‖o‖)

The scalars depend on ``‖f‖², ‖res‖², ⟨f, res⟩`` only; the forward forms ``o`` explicitly and
takes ``‖o‖²`` from it (no cancellation when ``o ≈ 0``); the backward does not form ``o``
(:func:`residual_backward`). :class:`TorchResidual` saves
``f``, ``res`` (and α) and recomputes the rest; α is a float, ``None`` or a one-element tensor
(its gradient is returned when it needs one); ``c`` a float or a tensor needing no gradient.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ball._autograd import _ind
from ..ball.config import MIN_NORM
from ._torch_batchnorm import Scalars, _dot, _sq, _where0

_MN2 = MIN_NORM * MIN_NORM


def _radial(n2: Tensor, sc, t_max: float) -> Scalars:
    """``expmap0`` of a vector with ``‖·‖² = n2``: ``al`` with ``x = al·v`` (and ``th``)."""
    r = Scalars()
    r.n2 = n2
    r.z = sc * n2.clamp_min(_MN2).sqrt()
    r.inv_z = 1 / r.z
    r.th = torch.tanh(r.z.clamp_max(t_max))
    r.al = r.th * r.inv_z
    return r


def _radial_back(r, d_al: Tensor, d_th: Tensor, c, t_max: float) -> Tensor:
    """Adjoint of :func:`_radial`: ``(∂al, ∂th) → ∂n2``."""
    d_th_t = d_th + d_al * r.inv_z
    d_z = -d_al * r.al * r.inv_z
    d_z = d_z + _where0(_ind(r.z, torch.le, t_max), d_th_t * (1 - r.th * r.th))
    return _where0(_ind(r.n2, torch.ge, _MN2), (c / 2) * d_z * r.inv_z)


def _pixel(sff, srr, sfr, a, c, t_max: float, f_first: bool) -> Scalars:
    """The per-pixel scalars of the Möbius sum from the channel sums."""
    q = Scalars()
    q.sff = sff
    q.sfr = sfr
    sc = c**0.5
    q.rf = _radial(sff * (a * a), sc, t_max)
    q.rr = _radial(srr, sc, t_max)
    q.fr = sfr * a
    xf2 = q.rf.th * q.rf.th / c
    xr2 = q.rr.th * q.rr.th / c
    q.xfr = q.rf.al * q.rr.al * q.fr
    q.x2, q.y2 = (xf2, xr2) if f_first else (xr2, xf2)
    big_a = 1 + 2 * c * q.xfr + c * q.y2
    big_b = 1 - c * q.x2
    q.den_raw = 1 + 2 * c * q.xfr + (c * c) * q.x2 * q.y2
    q.inv_den = 1 / q.den_raw.clamp_min(MIN_NORM)
    q.cx, q.cy = big_a * q.inv_den, big_b * q.inv_den
    q.cf = (q.cx if f_first else q.cy) * q.rf.al
    q.cr = (q.cy if f_first else q.cx) * q.rr.al
    q.k = q.cf * a
    return q


def _logmap_scale(o2: Tensor, c, s_max: float, d_lg: Tensor | None = None):
    """``lg`` of the projected point with ``‖o‖² = o2`` (and ``∂o2`` from ``∂lg``)."""
    z = c**0.5 * o2.clamp_min(_MN2).sqrt()
    inv_z = 1 / z
    s = z.clamp_max(s_max)
    lg = torch.atanh(s) * inv_z
    if d_lg is None:
        return lg, None
    d_z = -d_lg * lg * inv_z
    d_z = d_z + _where0(_ind(z, torch.le, s_max), d_lg * inv_z / (1 - s * s))
    return lg, _where0(_ind(o2, torch.ge, _MN2), (c / 2) * d_z * inv_z)


def _sums(f: Tensor, res: Tensor):
    return _sq(f), _sq(res), _dot(f, res)


def residual_map(f, res, a, c, proj_eps: float, t_max: float, f_first: bool) -> Tensor:
    """The forward map on ``[B, C, P]`` maps."""
    q = _pixel(*_sums(f, res), a, c, t_max, f_first)
    o = torch.addcmul(q.cr * res, q.k, f)
    lg, _ = _logmap_scale(_sq(o), c, 1 - proj_eps)
    return o.mul_(lg)


def residual_backward(g, f, res, a, c, proj_eps: float, t_max: float, f_first: bool):
    """``(∂f, ∂res, ∂α)`` of :func:`residual_map` (the line-by-line adjoint of the kernel).

    ``o = K f + c_r res`` is not formed: its products ``⟨g, o⟩``, ``⟨o, f⟩``, ``⟨o, res⟩``,
    ``‖o‖²`` follow from ``⟨g, f⟩, ⟨g, res⟩`` and the three sums, and ``∂L/∂o = lg g + 2∂o2 o``
    enters the gradients as per-pixel coefficients on ``g``, ``f``, ``res``. Where ``o ≈ 0``
    those products cancel, but there they only meet ``∂o2`` (bounded, ``∂lg/∂o2 → c/3``) and
    ``o`` itself, so the error stays at rounding of the kept terms."""
    sff, srr, sfr = _sums(f, res)
    q = _pixel(sff, srr, sfr, a, c, t_max, f_first)
    k, cr = q.k, q.cr
    gf, gr = _dot(g, f), _dot(g, res)
    of = torch.addcmul(k * sff, cr, sfr)  # ⟨o, f⟩
    orr = torch.addcmul(k * sfr, cr, srr)  # ⟨o, res⟩
    d_lg = torch.addcmul(k * gf, cr, gr)  # ⟨g, o⟩
    lg, d_o2 = _logmap_scale(torch.addcmul(k * of, cr, orr), c, 1 - proj_eps, d_lg)
    two_p = 2 * d_o2
    # ∂L/∂o = lg g + 2 ∂o2 o;  o = K f + c_r res
    d_k = torch.addcmul(lg * gf, two_p, of)
    d_cr = torch.addcmul(lg * gr, two_p, orr)
    d_cf = d_k * a
    d_a = d_k * q.cf
    if f_first:
        d_cx, d_af, d_cy, d_ar = d_cf * q.rf.al, d_cf * q.cx, d_cr * q.rr.al, d_cr * q.cy
    else:
        d_cy, d_af, d_cx, d_ar = d_cf * q.rf.al, d_cf * q.cy, d_cr * q.rr.al, d_cr * q.cx
    d_big_a = d_cx * q.inv_den
    d_big_b = d_cy * q.inv_den
    d_den = -(d_cx * q.cx + d_cy * q.cy) * q.inv_den
    d_den_raw = _where0(_ind(q.den_raw, torch.ge, MIN_NORM), d_den)
    d_xfr = 2 * c * (d_den_raw + d_big_a)
    d_x2 = (c * c) * q.y2 * d_den_raw - c * d_big_b
    d_y2 = (c * c) * q.x2 * d_den_raw + c * d_big_a
    d_xf2, d_xr2 = (d_x2, d_y2) if f_first else (d_y2, d_x2)
    d_thf = 2 * q.rf.th * d_xf2 / c
    d_thr = 2 * q.rr.th * d_xr2 / c
    d_af = d_af + d_xfr * q.rr.al * q.fr
    d_ar = d_ar + d_xfr * q.rf.al * q.fr
    d_fr = d_xfr * q.rf.al * q.rr.al
    d_nf2 = _radial_back(q.rf, d_af, d_thf, c, t_max)
    d_nr2 = _radial_back(q.rr, d_ar, d_thr, c, t_max)
    d_a = d_a + d_nf2 * q.sff * 2 * a + d_fr * q.sfr
    # ∂f = K ∂o + 2 ∂Sff f + ∂Sfr res,  ∂res = c_r ∂o + 2 ∂Srr res + ∂Sfr f,
    # ∂o = lg g + 2 ∂o2 (K f + c_r res)
    d_sfr = d_fr * a
    tk = two_p * k
    cross = torch.addcmul(d_sfr, tk, cr)  # on res in ∂f, on f in ∂res
    grad_f = torch.addcmul(cross * res, lg * k, g).addcmul_(tk * k + 2 * d_nf2 * (a * a), f)
    grad_r = torch.addcmul(cross * f, lg * cr, g).addcmul_(two_p * cr * cr + 2 * d_nr2, res)
    return grad_f, grad_r, d_a.sum(dtype=torch.float64)


class TorchResidual(torch.autograd.Function):
    """``logmap0(expmap0(α f) ⊕ expmap0(res))`` (or ``res ⊕ f``) along dim 1 of ``[B, C, P]``
    maps, with the hand-written backward of :func:`residual_backward`."""

    @staticmethod
    def forward(ctx, f, res, alpha, c, proj_eps, t_max, f_first):  # type: ignore[override]
        ctx.alpha_tensor = isinstance(alpha, Tensor)
        a = 1.0 if alpha is None else alpha
        if ctx.alpha_tensor:
            a = alpha.reshape(()).to(f.dtype)
            ctx.alpha_shape = alpha.shape
            ctx.save_for_backward(f, res, alpha)
        else:
            ctx.save_for_backward(f, res)
            ctx.a = float(a)
        ctx.args = (c, proj_eps, t_max, f_first)
        return residual_map(f, res, a, c, proj_eps, t_max, f_first)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if ctx.alpha_tensor:
            f, res, alpha = ctx.saved_tensors
            a = alpha.reshape(()).to(f.dtype)
        else:
            (f, res), a = ctx.saved_tensors, ctx.a
        grad_f, grad_r, grad_a = residual_backward(grad, f, res, a, *ctx.args)
        needs = ctx.needs_input_grad
        grad_alpha = None
        if ctx.alpha_tensor and needs[2]:
            grad_alpha = grad_a.to(alpha.dtype).reshape(ctx.alpha_shape)
        return (
            grad_f if needs[0] else None,
            grad_r if needs[1] else None,
            grad_alpha,
            None,
            None,
            None,
            None,
        )


def torch_residual_applicable(f: Tensor, res: Tensor, alpha, c) -> bool:
    """Whether :func:`torch_residual` handles this call: matching 4-D float maps, α a number,
    ``None`` or a one-element tensor, ``c`` fixed or a tensor that needs no gradient."""
    if (
        f.dim() != 4
        or f.shape != res.shape
        or f.dtype not in (torch.float32, torch.float64)
        or res.dtype != f.dtype
        or f.device != res.device
    ):
        return False
    if isinstance(alpha, Tensor) and alpha.numel() != 1:
        return False
    if isinstance(c, Tensor):
        return c.numel() == 1 and not c.requires_grad
    return isinstance(c, (float, int)) and not isinstance(c, bool)


def torch_residual(f, res, alpha, c, proj_eps: float, t_max: float, f_first: bool) -> Tensor:
    """The residual map by :class:`TorchResidual` (check :func:`torch_residual_applicable`)."""
    c = c.reshape(()).to(f.dtype) if isinstance(c, Tensor) else float(c)
    shape = f.shape
    f3 = f.reshape(shape[0], shape[1], -1).contiguous()
    r3 = res.reshape(shape[0], shape[1], -1).contiguous()
    out = TorchResidual.apply(f3, r3, alpha, c, proj_eps, t_max, f_first)
    return out.view(shape)
