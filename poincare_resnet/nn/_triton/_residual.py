"""Triton kernels of the Poincaré residual ``logmap0(expmap0(α f) ⊕ expmap0(res))``.

Per pixel, with the channel sums ``Sff = ‖f‖²``, ``Srr = ‖r‖²``, ``Sfr = ⟨f, r⟩``::

    x_f = af·(α f),  af = tanh(min(√c‖αf‖, t_max)) / (√c‖αf‖)       (x_r = ar·r likewise)
    o = x ⊕ y = K f + cr r      (x, y = x_f, x_r; swapped when f_first is false)
    out = lg o,  lg = artanh(min(√c‖o‖, 1 − ε)) / (√c‖o‖)

with the clamps of :func:`poincare_resnet.nn._closed_forms.residual_forward`; ``o`` is formed
explicitly and its norm taken from it. The backward is the line-by-line adjoint of that
straight-line code (as in ``_cpp/residual.cpp``). One program per (batch element, block of
pixels); channel loops in blocks of ``BLOCK_C``; ``dL/dα`` goes through per-program partial sums.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...ball.config import MIN_NORM
from ._layout import check_map, check_same, layout_or_none, pixel_blocks
from ._math import atanh_pos, tanh_pos
from ._tiles import dense_like, grad_map, program_block, store_tile, tile, tile0, tile_offsets

BLOCK_P = 64
BLOCK_C = 32


@triton.jit
def _radial_fwd(n2, SC: tl.constexpr, T_MAX: tl.constexpr, MN: tl.constexpr):
    z = SC * tl.sqrt(tl.maximum(n2, MN * MN))
    th = tanh_pos(tl.minimum(z, T_MAX))
    return z, th, th / z


@triton.jit
def _radial_bwd(n2, z, th, al, d_al, d_th, C_: tl.constexpr, T_MAX: tl.constexpr, MN: tl.constexpr):
    inv_z = 1.0 / z
    d_th_t = d_th + d_al * inv_z
    d_z = -d_al * al * inv_z
    d_z += tl.where(z <= T_MAX, d_th_t * (1.0 - th * th), 0.0)
    return tl.where(n2 >= MN * MN, 0.5 * C_ * d_z * inv_z, 0.0)


@triton.jit
def _logmap_scale(o2, SC: tl.constexpr, S_MAX: tl.constexpr, MN: tl.constexpr):
    z = SC * tl.sqrt(tl.maximum(o2, MN * MN))
    s = tl.minimum(z, S_MAX)
    return z, s, atanh_pos(s) / z


@triton.jit
def _pixel_fwd(
    sff, srr, sfr, a, C_: tl.constexpr, SC: tl.constexpr, T_MAX: tl.constexpr, MN: tl.constexpr,
    F_FIRST: tl.constexpr,
):  # fmt: skip
    nf2 = sff * (a * a)
    zf, thf, alf = _radial_fwd(nf2, SC, T_MAX, MN)
    zr, thr, alr = _radial_fwd(srr, SC, T_MAX, MN)
    fr = sfr * a
    xf2 = thf * thf / C_
    xr2 = thr * thr / C_
    xfr = alf * alr * fr
    if F_FIRST:
        x2 = xf2
        y2 = xr2
    else:
        x2 = xr2
        y2 = xf2
    big_a = 1.0 + 2.0 * C_ * xfr + C_ * y2
    big_b = 1.0 - C_ * x2
    den_raw = 1.0 + 2.0 * C_ * xfr + C_ * C_ * x2 * y2
    inv_den = 1.0 / tl.maximum(den_raw, MN)
    cx = big_a * inv_den
    cy = big_b * inv_den
    if F_FIRST:
        cf = cx * alf
        cr = cy * alr
    else:
        cf = cy * alf
        cr = cx * alr
    return nf2, zf, thf, alf, zr, thr, alr, fr, x2, y2, den_raw, inv_den, cx, cy, cf, cr


@triton.jit
def _sums(
    f_ptr, r_ptr, b, pix, fsb, fsc, fsp, rsb, rsc, rsp, C, P, BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr, DT: tl.constexpr,
):  # fmt: skip
    sff = tl.zeros([BLOCK_P], DT)
    srr = tl.zeros([BLOCK_P], DT)
    sfr = tl.zeros([BLOCK_P], DT)
    for c0 in range(0, C, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        fv = tile0(f_ptr, b, ch, pix, fsb, fsc, fsp, C, P)
        rv = tile0(r_ptr, b, ch, pix, rsb, rsc, rsp, C, P)
        sff += tl.sum(fv * fv, axis=0)
        srr += tl.sum(rv * rv, axis=0)
        sfr += tl.sum(fv * rv, axis=0)
    return sff, srr, sfr


@triton.jit
def residual_fwd_kernel(
    f_ptr, r_ptr, a_ptr, o_ptr, fsb, fsc, fsp, rsb, rsc, rsp, osb, osc, osp, C, P,
    C_: tl.constexpr, SC: tl.constexpr, T_MAX: tl.constexpr, S_MAX: tl.constexpr, MN: tl.constexpr,
    F_FIRST: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    b, pid, pix = program_block(BLOCK_P)
    a = tl.load(a_ptr) + tl.zeros([BLOCK_P], tl.load(a_ptr).dtype)  # block: see _globals
    DT = a.dtype
    sff, srr, sfr = _sums(
        f_ptr, r_ptr, b, pix, fsb, fsc, fsp, rsb, rsc, rsp, C, P, BLOCK_C, BLOCK_P, DT
    )
    q = _pixel_fwd(sff, srr, sfr, a, C_, SC, T_MAX, MN, F_FIRST)
    k = q[14] * a
    cr = q[15]
    o2 = tl.zeros([BLOCK_P], DT)
    for c0 in range(0, C, BLOCK_C):  # ‖o‖² with o = K f + cr r formed explicitly
        ch = c0 + tl.arange(0, BLOCK_C)
        fv = tile0(f_ptr, b, ch, pix, fsb, fsc, fsp, C, P)
        rv = tile0(r_ptr, b, ch, pix, rsb, rsc, rsp, C, P)
        ov = cr[None, :] * rv + k[None, :] * fv
        o2 += tl.sum(ov * ov, axis=0)
    lg = _logmap_scale(o2, SC, S_MAX, MN)[2]
    for c0 in range(0, C, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        fv, mask = tile(f_ptr, b, ch, pix, fsb, fsc, fsp, C, P)
        rv = tile0(r_ptr, b, ch, pix, rsb, rsc, rsp, C, P)
        ov = cr[None, :] * rv + k[None, :] * fv
        store_tile(o_ptr, b, ch, pix, osb, osc, osp, ov * lg[None, :], mask)


@triton.jit
def residual_bwd_kernel(
    g_ptr, f_ptr, r_ptr, a_ptr, gf_ptr, gr_ptr, ga_ptr, gsb, gsc, gsp, fsb, fsc, fsp, rsb, rsc,
    rsp, osb, osc, osp, C, P, C_: tl.constexpr, SC: tl.constexpr, T_MAX: tl.constexpr,
    S_MAX: tl.constexpr, MN: tl.constexpr, F_FIRST: tl.constexpr, BLOCK_C: tl.constexpr,
    BLOCK_P: tl.constexpr,
):  # fmt: skip
    b, pid, pix = program_block(BLOCK_P)
    a = tl.load(a_ptr) + tl.zeros([BLOCK_P], tl.load(a_ptr).dtype)  # block: see _globals
    DT = a.dtype
    sff, srr, sfr = _sums(
        f_ptr, r_ptr, b, pix, fsb, fsc, fsp, rsb, rsc, rsp, C, P, BLOCK_C, BLOCK_P, DT
    )
    (nf2, zf, thf, alf, zr, thr, alr, fr, x2, y2, den_raw, inv_den, cx, cy, cf, cr) = _pixel_fwd(
        sff, srr, sfr, a, C_, SC, T_MAX, MN, F_FIRST
    )
    k = cf * a
    o2 = tl.zeros([BLOCK_P], DT)
    go = tl.zeros([BLOCK_P], DT)
    of = tl.zeros([BLOCK_P], DT)
    orr = tl.zeros([BLOCK_P], DT)
    gf = tl.zeros([BLOCK_P], DT)
    gr = tl.zeros([BLOCK_P], DT)
    for c0 in range(0, C, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        fv = tile0(f_ptr, b, ch, pix, fsb, fsc, fsp, C, P)
        rv = tile0(r_ptr, b, ch, pix, rsb, rsc, rsp, C, P)
        gv = tile0(g_ptr, b, ch, pix, gsb, gsc, gsp, C, P)
        ov = cr[None, :] * rv + k[None, :] * fv
        o2 += tl.sum(ov * ov, axis=0)
        go += tl.sum(gv * ov, axis=0)
        of += tl.sum(ov * fv, axis=0)
        orr += tl.sum(ov * rv, axis=0)
        gf += tl.sum(gv * fv, axis=0)
        gr += tl.sum(gv * rv, axis=0)
    # adjoint of the per-pixel chain, in reverse
    z, s, lg = _logmap_scale(o2, SC, S_MAX, MN)
    inv_z = 1.0 / z
    d_z = -go * lg * inv_z
    d_z += tl.where(z <= S_MAX, go * inv_z / (1.0 - s * s), 0.0)
    d_o2 = tl.where(o2 >= MN * MN, 0.5 * C_ * d_z * inv_z, 0.0)
    two_p = 2.0 * d_o2
    d_k = lg * gf + two_p * of  # dL/do = lg g + 2 d_o2 o,  o = K f + cr r
    d_cr = lg * gr + two_p * orr
    d_cf = d_k * a
    d_a = d_k * cf
    if F_FIRST:
        d_cx = d_cf * alf
        d_af = d_cf * cx
        d_cy = d_cr * alr
        d_ar = d_cr * cy
    else:
        d_cy = d_cf * alf
        d_af = d_cf * cy
        d_cx = d_cr * alr
        d_ar = d_cr * cx
    d_big_a = d_cx * inv_den
    d_big_b = d_cy * inv_den
    d_den = -(d_cx * cx + d_cy * cy) * inv_den
    d_den_raw = tl.where(den_raw >= MN, d_den, 0.0)
    d_xfr = 2.0 * C_ * (d_den_raw + d_big_a)
    d_x2 = C_ * C_ * y2 * d_den_raw - C_ * d_big_b
    d_y2 = C_ * C_ * x2 * d_den_raw + C_ * d_big_a
    if F_FIRST:
        d_xf2 = d_x2
        d_xr2 = d_y2
    else:
        d_xf2 = d_y2
        d_xr2 = d_x2
    d_thf = 2.0 * thf * d_xf2 / C_
    d_thr = 2.0 * thr * d_xr2 / C_
    d_af += d_xfr * alr * fr
    d_ar += d_xfr * alf * fr
    d_fr = d_xfr * alf * alr
    d_nf2 = _radial_bwd(nf2, zf, thf, alf, d_af, d_thf, C_, T_MAX, MN)
    d_nr2 = _radial_bwd(srr, zr, thr, alr, d_ar, d_thr, C_, T_MAX, MN)
    d_a += d_nf2 * sff * 2.0 * a + d_fr * sfr
    tl.store(ga_ptr + pid, tl.sum(tl.where(pix < P, d_a, 0.0), axis=0))
    d_sff2 = 2.0 * d_nf2 * (a * a)
    d_srr2 = 2.0 * d_nr2
    d_sfr = d_fr * a
    for c0 in range(0, C, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        fv, mask = tile(f_ptr, b, ch, pix, fsb, fsc, fsp, C, P)
        rv = tile0(r_ptr, b, ch, pix, rsb, rsc, rsp, C, P)
        gv = tile0(g_ptr, b, ch, pix, gsb, gsc, gsp, C, P)
        ov = cr[None, :] * rv + k[None, :] * fv
        d_o = lg[None, :] * gv + two_p[None, :] * ov
        offs = tile_offsets(b, ch, pix, osb, osc, osp)
        tl.store(
            gf_ptr + offs, k[None, :] * d_o + d_sff2[None, :] * fv + d_sfr[None, :] * rv, mask=mask
        )
        tl.store(
            gr_ptr + offs, cr[None, :] * d_o + d_srr2[None, :] * rv + d_sfr[None, :] * fv, mask=mask
        )


def _consts(c: float, proj_eps: float, t_max: float, f_first: bool) -> dict:
    return dict(
        C_=c,
        SC=c**0.5,
        T_MAX=float(t_max),
        S_MAX=1.0 - float(proj_eps),
        MN=MIN_NORM,
        F_FIRST=bool(f_first),
    )


class TritonResidual(torch.autograd.Function):
    """``(f, res, α) → logmap0(expmap0(α f) ⊕ expmap0(res))`` (or ``res ⊕ f``) along dim 1."""

    @staticmethod
    def forward(ctx, f, res, alpha_t, c, proj_eps, t_max, f_first, block_c):  # type: ignore[override]
        lf, lr = layout_or_none(f), layout_or_none(res)
        out, lo = dense_like(f)
        grid = (lf.b, pixel_blocks(lf, BLOCK_P))
        residual_fwd_kernel[grid](
            f, res, alpha_t, out, *lf.strides, *lr.strides, *lo.strides, lf.c, lf.p,
            **_consts(c, proj_eps, t_max, f_first), BLOCK_C=block_c, BLOCK_P=BLOCK_P,
        )  # fmt: skip
        ctx.save_for_backward(f, res, alpha_t)
        ctx.args = (c, proj_eps, t_max, f_first, block_c)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        f, res, alpha_t = ctx.saved_tensors
        c, proj_eps, t_max, f_first, block_c = ctx.args
        grad, lg = grad_map(grad, f)
        lf, lr = layout_or_none(f), layout_or_none(res)
        grad_f, lo = dense_like(f)
        grad_r, _ = dense_like(f)
        nblk = pixel_blocks(lf, BLOCK_P)
        part = torch.empty(lf.b * nblk, dtype=f.dtype, device=f.device)
        residual_bwd_kernel[(lf.b, nblk)](
            grad, f, res, alpha_t, grad_f, grad_r, part, *lg.strides, *lf.strides, *lr.strides,
            *lo.strides, lf.c, lf.p, **_consts(c, proj_eps, t_max, f_first), BLOCK_C=block_c,
            BLOCK_P=BLOCK_P,
        )  # fmt: skip
        needs = ctx.needs_input_grad
        grad_a = part.sum().reshape(alpha_t.shape) if needs[2] else None
        return (
            grad_f if needs[0] else None,
            grad_r if needs[1] else None,
            grad_a,
            None,
            None,
            None,
            None,
            None,
        )


def residual(
    f: Tensor,
    res: Tensor,
    alpha: Tensor | float | None,
    c: float,
    proj_eps: float,
    t_max: float,
    f_first: bool = True,
    block_c: int = BLOCK_C,
) -> Tensor:
    """The residual map by the Triton kernels; same signature and values as
    :func:`poincare_resnet.nn._closed_forms.residual_forward` (``c`` a Python float; ``alpha`` a
    float, ``None`` (= 1) or a one-element tensor, which then receives a gradient)."""
    from ._layout import check_curvature

    c = check_curvature(c)
    check_map(f, "f")
    check_map(res, "res")
    check_same(res, f, "res", "f")
    if isinstance(alpha, Tensor):
        if alpha.numel() != 1:
            raise ValueError(f"alpha must have one element, got shape {tuple(alpha.shape)}")
        if alpha.device != f.device:
            raise ValueError(f"alpha must be on {f.device}, got {alpha.device}")
        alpha_t = alpha.reshape(1).to(f.dtype)
    else:
        value = 1.0 if alpha is None else float(alpha)
        alpha_t = torch.full((1,), value, dtype=f.dtype, device=f.device)
    return TritonResidual.apply(f, res, alpha_t, c, proj_eps, t_max, f_first, block_c)
