"""Triton kernels of the tangent-form HNN++ FC map (:func:`poincare_resnet.ball.fc_tangent`).

From the projections ``dots_k = ⟨p, ẑ_k⟩`` and ``sq = ‖p‖²``, per pixel (t = √c‖p‖, capped at
``artanh(1 − ε)``, series below a small threshold as in ``ball/_autograd.py``)::

    a = sinh(2t)/‖p‖,  e = cosh(2t),  q_k = a dots_k cosh(2√c r_k) − e sinh(2√c r_k)
    ψ_k = sinh(clamp(2‖z_k‖ asinh(q_k), ±40)),  out = κ(‖ψ‖) ψ,
    κ = asinh(‖ψ‖)/(2√c‖ψ‖)   (‖out‖ capped at artanh(1 − ε)/√c)

Forward: two channel passes per block of pixels (‖ψ‖², then the output). Backward: one pass for
``‖ψ‖²`` and ``⟨G, ψ⟩``, one that writes ``∂L/∂dots`` and accumulates the per-pixel ``∂L/∂a``,
``∂L/∂e`` (then ``∂L/∂sq``) and the per-channel sums behind ``∂L/∂‖z_k‖`` and ``∂L/∂r_k``
(per-program partial sums, reduced by PyTorch). The formulas are those of
``_fc_backward``, evaluated in the same order.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .._native_fc import fc_limits
from ._layout import check_channel, check_curvature, check_map, layout_or_none, pixel_blocks
from ._math import asinh, cosh, sinh
from ._tiles import dense_like, grad_map, program_block, store_tile, tile, tile0

BLOCK_P = 64
BLOCK_C = 32


@triton.jit
def _pixel_terms(
    sq_ptr, b, pix, ssb, ssp, P, SC: tl.constexpr, LIMIT: tl.constexpr, SMALL: tl.constexpr,
    MN: tl.constexpr,
):  # fmt: skip
    pm = pix < P
    sqv = tl.load(sq_ptr + b * ssb + pix.to(tl.int64) * ssp, mask=pm, other=0.0)
    n = tl.sqrt(tl.maximum(sqv, MN * MN))
    t = SC * n
    tc = tl.minimum(t, LIMIT)
    small = t < SMALL
    t2 = t * t
    sinh2t = sinh(2.0 * tc)
    a = tl.where(small, SC * (2.0 + 4.0 * t2 / 3.0 + 4.0 * t2 * t2 / 15.0), sinh2t / n)
    e = cosh(2.0 * tc)
    return n, t, small, t2, sinh2t, a, e


@triton.jit
def _psi_tile(
    d_ptr, ch_ptr, sh_ptr, zn2_ptr, b, cs, pix, dsb, dsc, dsp, K, P, a, e, ARG: tl.constexpr
):
    """dots tile, per-channel terms, q, h = asinh(q), the clamp mask and ψ for channels cs."""
    cm = cs < K
    dots, mask = tile(d_ptr, b, cs, pix, dsb, dsc, dsp, K, P)
    chk = tl.load(ch_ptr + cs, mask=cm, other=0.0)
    shk = tl.load(sh_ptr + cs, mask=cm, other=0.0)
    zn2 = tl.load(zn2_ptr + cs, mask=cm, other=0.0)
    q = a[None, :] * dots * chk[:, None] - e[None, :] * shk[:, None]
    h = asinh(q)
    g_raw = zn2[:, None] * h
    in_range = tl.abs(g_raw) <= ARG
    g = tl.minimum(tl.maximum(g_raw, -ARG), ARG)
    return dots, chk, shk, zn2, q, h, in_range, g, sinh(g), mask


@triton.jit
def _kappa(p2, SC: tl.constexpr, OUT_LIMIT: tl.constexpr, SMALL: tl.constexpr, MN: tl.constexpr):
    p = tl.sqrt(tl.maximum(p2, MN * MN))
    rho = asinh(p)
    clipped_out = rho > OUT_LIMIT
    small_p = p < SMALL
    p2s = tl.where(small_p, p2, 0.0)  # series argument (no overflow in the unused branch)
    kappa_base = tl.where(small_p, 1.0 - p2s / 6.0 + 3.0 * p2s * p2s / 40.0, rho / p)
    kappa = tl.where(clipped_out, OUT_LIMIT / p, kappa_base) / (2.0 * SC)
    return p, clipped_out, small_p, kappa_base, kappa


@triton.jit
def fc_fwd_kernel(
    d_ptr, sq_ptr, ch_ptr, sh_ptr, zn2_ptr, o_ptr, dsb, dsc, dsp, ssb, ssp, osb, osc, osp, K, P,
    SC: tl.constexpr, LIMIT: tl.constexpr, ARG: tl.constexpr, OUT_LIMIT: tl.constexpr,
    SMALL: tl.constexpr, MN: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    b, pid, pix = program_block(BLOCK_P)
    n, t, small, t2, sinh2t, a, e = _pixel_terms(sq_ptr, b, pix, ssb, ssp, P, SC, LIMIT, SMALL, MN)
    p2 = tl.zeros([BLOCK_P], a.dtype)
    for c0 in range(0, K, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        psi = _psi_tile(d_ptr, ch_ptr, sh_ptr, zn2_ptr, b, cs, pix, dsb, dsc, dsp, K, P, a, e, ARG)[
            8
        ]
        p2 += tl.sum(psi * psi, axis=0)
    kappa = _kappa(p2, SC, OUT_LIMIT, SMALL, MN)[4]
    for c0 in range(0, K, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        tile = _psi_tile(d_ptr, ch_ptr, sh_ptr, zn2_ptr, b, cs, pix, dsb, dsc, dsp, K, P, a, e, ARG)
        psi, mask = tile[8], tile[9]
        store_tile(o_ptr, b, cs, pix, osb, osc, osp, kappa[None, :] * psi, mask)


@triton.jit
def fc_bwd_kernel(
    g_ptr, d_ptr, sq_ptr, ch_ptr, sh_ptr, zn2_ptr, gd_ptr, gsq_ptr, part_ptr, gsb, gsc, gsp, dsb,
    dsc, dsp, ssb, ssp, osb, osc, osp, qsb, qsp, K, P, SC: tl.constexpr, LIMIT: tl.constexpr,
    ARG: tl.constexpr, OUT_LIMIT: tl.constexpr, SMALL: tl.constexpr, MN: tl.constexpr,
    NEED_DOTS: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    b, pid, pix = program_block(BLOCK_P)
    pm = pix < P
    n, t, small, t2, sinh2t, a, e = _pixel_terms(sq_ptr, b, pix, ssb, ssp, P, SC, LIMIT, SMALL, MN)
    p2 = tl.zeros([BLOCK_P], a.dtype)
    gp = tl.zeros([BLOCK_P], a.dtype)
    for c0 in range(0, K, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        tile = _psi_tile(d_ptr, ch_ptr, sh_ptr, zn2_ptr, b, cs, pix, dsb, dsc, dsp, K, P, a, e, ARG)
        psi, mask = tile[8], tile[9]
        gv = tile0(g_ptr, b, cs, pix, gsb, gsc, gsp, K, P)
        p2 += tl.sum(psi * psi, axis=0)
        gp += tl.sum(gv * psi, axis=0)
    p, clipped_out, small_p, kappa_base, kappa = _kappa(p2, SC, OUT_LIMIT, SMALL, MN)
    # u = κ(‖ψ‖) ψ  →  ∂L/∂ψ = κ G + κ'‖ψ‖ ⟨G, ψ̂⟩ ψ̂
    gph = gp / p
    p2s = tl.where(small_p, p2, 0.0)
    k_series = p2s * (-1.0 / 3.0 + 0.3 * p2s - 0.267857 * p2s * p2s)
    k_exact = 1.0 / tl.sqrt(1.0 + p2) - kappa_base
    kp2 = tl.where(small_p, k_series, k_exact) / (2.0 * SC)
    kp2 = tl.where(clipped_out, -kappa, kp2)
    grad_a = tl.zeros([BLOCK_P], a.dtype)
    grad_e = tl.zeros([BLOCK_P], a.dtype)
    for c0 in range(0, K, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        (dots, chk, shk, zn2, q, h, in_range, g, psi, mask) = _psi_tile(
            d_ptr, ch_ptr, sh_ptr, zn2_ptr, b, cs, pix, dsb, dsc, dsp, K, P, a, e, ARG
        )
        gv = tile0(g_ptr, b, cs, pix, gsb, gsc, gsp, K, P)
        grad_g = kappa[None, :] * gv + (kp2 * gph)[None, :] * (psi / p[None, :])
        grad_g = tl.where(in_range & mask, grad_g * cosh(g), 0.0)
        grad_q = grad_g * zn2[:, None] / tl.sqrt(1.0 + q * q)
        if NEED_DOTS:
            store_tile(
                gd_ptr, b, cs, pix, osb, osc, osp, grad_q * (a[None, :] * chk[:, None]), mask
            )
        gq_dot = grad_q * dots
        grad_a += tl.sum(gq_dot * chk[:, None], axis=0)
        grad_e -= tl.sum(grad_q * shk[:, None], axis=0)
        cm = cs < K
        base = part_ptr + pid * 3 * K + cs
        tl.store(base, tl.sum(grad_g * 2.0 * h, axis=1), mask=cm)  # ∂L/∂‖z_k‖
        tl.store(base + K, tl.sum(gq_dot * a[None, :], axis=1), mask=cm)  # ∂L/∂cosh(2√c r)
        tl.store(base + 2 * K, -tl.sum(grad_q * e[None, :], axis=1), mask=cm)  # ∂L/∂sinh
    da_dsq = tl.where(
        small,
        (SC * SC * SC) * (4.0 / 3.0 + 8.0 / 15.0 * t2),
        (2.0 * SC * n * e - sinh2t) / (2.0 * n * n * n),
    )
    de_dsq = tl.where(small, (SC * SC) * (2.0 + 4.0 * t2 / 3.0), SC * sinh2t / n)
    clipped_in = t > LIMIT
    da_dsq = tl.where(clipped_in, -a / (2.0 * n * n), da_dsq)
    de_dsq = tl.where(clipped_in, 0.0, de_dsq)
    tl.store(gsq_ptr + b * qsb + pix.to(tl.int64) * qsp, grad_a * da_dsq + grad_e * de_dsq, mask=pm)


def _consts(c: float, dtype: torch.dtype) -> dict:
    """The kernels' constexpr constants: those of the native kernel (:func:`fc_limits`)."""
    names = ("SC", "LIMIT", "ARG", "OUT_LIMIT", "SMALL", "MN")
    return dict(zip(names, fc_limits(c, dtype), strict=True))


class TritonFC(torch.autograd.Function):
    """``(dots, sq, ‖z‖, r) → logmap0(FC(expmap0(p)))`` with flat ``[K]`` ``znorm``/``bias``."""

    @staticmethod
    def forward(ctx, dots, sq, znorm, bias, c, block_c):  # type: ignore[override]
        ld, ls = layout_or_none(dots), layout_or_none(sq)
        two_sr = 2 * c**0.5 * bias
        chk, shk, zn2 = torch.cosh(two_sr), torch.sinh(two_sr), 2 * znorm
        out, lo = dense_like(dots)
        grid = (ld.b, pixel_blocks(ld, BLOCK_P))
        fc_fwd_kernel[grid](
            dots, sq, chk, shk, zn2, out, *ld.strides, ls.sb, ls.sp, *lo.strides, ld.c, ld.p,
            **_consts(c, dots.dtype), BLOCK_C=block_c, BLOCK_P=BLOCK_P,
        )  # fmt: skip
        ctx.save_for_backward(dots, sq, znorm, bias)
        ctx.args = (c, block_c)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        dots, sq, znorm, bias = ctx.saved_tensors
        c, block_c = ctx.args
        needs = ctx.needs_input_grad
        grad, lg = grad_map(grad, dots)
        ld, ls = layout_or_none(dots), layout_or_none(sq)
        sc = c**0.5
        two_sr = 2 * sc * bias
        chk, shk, zn2 = torch.cosh(two_sr), torch.sinh(two_sr), 2 * znorm
        grad_dots, lo = dense_like(dots)
        grad_sq = torch.empty(sq.shape, dtype=sq.dtype, device=sq.device)
        lq = layout_or_none(grad_sq)
        nblk = pixel_blocks(ld, BLOCK_P)
        part = torch.empty(ld.b * nblk, 3, ld.c, dtype=dots.dtype, device=dots.device)
        fc_bwd_kernel[(ld.b, nblk)](
            grad, dots, sq, chk, shk, zn2, grad_dots, grad_sq, part, *lg.strides, *ld.strides,
            ls.sb, ls.sp, *lo.strides, lq.sb, lq.sp, ld.c, ld.p, **_consts(c, dots.dtype),
            NEED_DOTS=bool(needs[0]), BLOCK_C=block_c, BLOCK_P=BLOCK_P,
        )  # fmt: skip
        chan = part.sum(0)
        grad_bias = (chan[1] * shk + chan[2] * chk) * (2 * sc) if needs[3] else None
        return (
            grad_dots if needs[0] else None,
            grad_sq if needs[1] else None,
            chan[0] if needs[2] else None,
            grad_bias,
            None,
            None,
        )


def fc_tangent(
    dots: Tensor,
    sq: Tensor,
    znorm: Tensor,
    bias: Tensor,
    c: float,
    dim: int,
    block_c: int = BLOCK_C,
) -> Tensor:
    """:func:`poincare_resnet.ball.fc_tangent` by the Triton kernels: ``dots`` a 4-D
    ``[B, K, H, W]`` map (``dim`` = 1) or a 2-D ``[N, K]`` matrix (``dim`` = 1 or −1), ``sq`` of
    size 1 along ``dim``, ``znorm`` and ``bias`` with K elements, ``c`` a Python float."""
    c = check_curvature(c)
    ld = check_map(dots, "dots")
    if dim % dots.dim() != 1:
        raise ValueError(f"dim must be the channel axis 1 of dots, got {dim} for {dots.dim()}-D")
    expected = list(dots.shape)
    expected[1] = 1
    if not isinstance(sq, Tensor) or list(sq.shape) != expected:
        raise ValueError(
            f"sq must have shape {tuple(expected)}, got {tuple(getattr(sq, 'shape', ()))}"
        )
    check_map(sq, "sq")
    if sq.dtype != dots.dtype or sq.device != dots.device:
        raise ValueError(f"sq must match dots in dtype and device, got {sq.dtype} {sq.device}")
    znorm_f = check_channel(znorm, "znorm", ld.c, dots)
    bias_f = check_channel(bias, "bias", ld.c, dots)
    return TritonFC.apply(dots, sq, znorm_f, bias_f, c, block_c)
