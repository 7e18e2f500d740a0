"""Triton kernels of the Poincaré midpoint batch norm (:func:`.._closed_forms.batchnorm_forward`).

Per pixel (the chain of ``_cpp/batchnorm_pixel.h``, which these kernels port)::

    x = expmap0(v) = ax v,   d = x − μ,   m = (−μ) ⊕ x = A d − B μ   (formed from d explicitly)
    A = (1 − c‖μ‖²)/den,  B = c‖d‖²/den,  den = (1 − c‖μ‖²)(1 − c‖x‖²) + c‖d‖²
    at = artanh(√c‖project(m)‖)             (d(x, μ) = 2 at/√c)
    w = r ⊗ project(m) = s_w m,  w' = gyr[β, −μ] w = e_μ μ + e_w m + e_β β
    o = β ⊕ w' = o_μ μ + o_w m + o_β β,  out = logmap0(project(o)) = lg o

``d = x − μ`` is the float32-stable form of ``(−μ) ⊕ x`` (no cancellation between O(1) terms
when x ≈ μ near the boundary). All Möbius maths is per-pixel scalar arithmetic on a few inner
products with μ, β and v; channel loops (blocks of ``BLOCK_C``) form those products and the
final combination. Three autograd functions, each with a Triton forward and backward:

* :class:`MidpointSums` ``v → (Σ γ² x [C], Σ γ²)``, the gyromidpoint sums (train mode);
* :class:`DistanceSum` ``(v, μ) → Σ at²``, the batch variance ``σ² = (4/c) Σ at² / N``;
* :class:`BatchNormMap` ``(v, μ, β, r, [‖μ‖², ‖β‖², ⟨β, μ⟩]) → out``.

μ from the sums, ``β = expmap0(bias)``, ``r = |weight|/√(σ² + eps)`` and the three inner
products are [C]-sized PyTorch maths between them, differentiated by autograd; so in train mode
the gradient reaches ``v`` through the output, σ² and μ. Reductions over the batch go through
per-program partial sums (no atomics: deterministic), summed by PyTorch; nothing syncs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...ball.config import MIN_NORM
from .._batchnorm_front import centre_from_bias, rescale_from_variance
from .._closed_forms import midpoint_from_sums
from ._layout import check_channel, check_curvature, check_map, layout_or_none, pixel_blocks
from ._math import atanh_pos, tanh_pos
from ._tiles import channel_column, dense_like, grad_map, program_block, store_tile, tile, tile0

BLOCK_P = 32
BLOCK_C = 32
N_GLOBALS = 7  # adjoints of ‖μ‖², ‖β‖², ⟨β, μ⟩, gd, 1 − c‖β‖², ⟨u, v⟩ of the gyration, r


@triton.jit
def _globals(glob_ptr, r_ptr, BLOCK_P: tl.constexpr):
    """``‖μ‖², ‖β‖², ⟨β, μ⟩, r`` broadcast to ``[BLOCK_P]``: Python-float constants combine
    with block tensors in their dtype, but with 0-d scalars they may round through float32."""
    zero = tl.zeros([BLOCK_P], tl.load(r_ptr).dtype)
    m2 = tl.load(glob_ptr) + zero
    return m2, tl.load(glob_ptr + 1) + zero, tl.load(glob_ptr + 2) + zero, tl.load(r_ptr) + zero


@triton.jit
def _pixel_products(
    v_ptr, mu_ptr, be_ptr, g_ptr, b, pix, vsb, vsc, vsp, gsb, gsc, gsp, C, P, m2, bm,
    C_: tl.constexpr, SC: tl.constexpr, T_MAX: tl.constexpr, MN: tl.constexpr,
    HAS_BETA: tl.constexpr, DOTS: tl.constexpr, HAS_G: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """Stage 1 and the inner products: two passes over the channels."""
    zero = tl.zeros([BLOCK_P], m2.dtype)
    n2, vm, vb, g_mu, g_b, g_v = zero, zero, zero, zero, zero, zero
    for c0 in range(0, C, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        x, mask = tile(v_ptr, b, ch, pix, vsb, vsc, vsp, C, P)
        n2 += tl.sum(x * x, axis=0)
        if DOTS:
            muc = channel_column(mu_ptr, ch, C)
            vm += tl.sum(x * muc, axis=0)
            if HAS_BETA:
                bc = channel_column(be_ptr, ch, C)
                vb += tl.sum(x * bc, axis=0)
            if HAS_G:
                g = tile0(g_ptr, b, ch, pix, gsb, gsc, gsp, C, P)
                g_mu += tl.sum(g * muc, axis=0)
                g_b += tl.sum(g * bc, axis=0)
                g_v += tl.sum(g * x, axis=0)
    # centre_expmap: x = ax v
    n = tl.sqrt(tl.maximum(n2, MN * MN))
    t = SC * n
    inv_t = 1.0 / t
    th = tanh_pos(tl.minimum(t, T_MAX))
    ax = th * inv_t
    omx = 1.0 - th * th
    d2, dmu, db, dv, g_d = zero, zero, zero, zero, zero
    for c0 in range(0, C, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        x, mask = tile(v_ptr, b, ch, pix, vsb, vsc, vsp, C, P)
        muc = channel_column(mu_ptr, ch, C)
        d = tl.where(mask, ax[None, :] * x - muc, 0.0)
        d2 += tl.sum(d * d, axis=0)
        dmu += tl.sum(d * muc, axis=0)
        if HAS_BETA:
            bc = channel_column(be_ptr, ch, C)
            db += tl.sum(d * bc, axis=0)
        if DOTS:
            dv += tl.sum(d * x, axis=0)
            if HAS_G:
                g = tile0(g_ptr, b, ch, pix, gsb, gsc, gsp, C, P)
                g_d += tl.sum(g * d, axis=0)
    # centre_coefficients: m = A d − B μ, and the products of m from those of d
    omm = 1.0 - C_ * m2
    cd2 = C_ * d2
    den_raw = omm * omx + cd2
    inv_den = 1.0 / tl.maximum(den_raw, MN)
    A = omm * inv_den
    B = cd2 * inv_den
    q = A * A * d2 - 2.0 * A * B * dmu + B * B * m2
    mm = A * dmu - B * m2
    mb = A * db - B * bm
    md = A * d2 - B * dmu
    mv = A * dv - B * vm
    g_m = A * g_d - B * g_mu
    s1 = (n2, n, t, inv_t, th, ax, omx, d2, den_raw, inv_den, A, B)
    dots = (dmu, db, dv, vm, vb, g_mu, g_b, g_v, g_d, q, mm, mb, md, mv, g_m)
    return s1, dots


@triton.jit
def _quad(cm, cw, cb, mnn, mm, mb, m2, b2, bm):
    """``‖cm μ + cw m + cb β‖²`` from the Gram entries."""
    return (
        cm * cm * m2
        + cw * cw * mnn
        + cb * cb * b2
        + 2.0 * (cm * cw * mm + cm * cb * bm + cw * cb * mb)
    )


@triton.jit
def _pixel_output(
    q, mm, mb, m2, b2, bm, r, C_: tl.constexpr, SC: tl.constexpr, S_MAX: tl.constexpr,
    MN: tl.constexpr, KOUT: tl.constexpr,
):  # fmt: skip
    """Projection and distance of m, then (KOUT) the rescaling, gyration, β ⊕ · and logmap0."""
    mn0 = tl.sqrt(tl.maximum(q, MN * MN))
    big = mn0 > (S_MAX / SC)
    shrink = tl.where(big, (S_MAX / SC) / mn0, 1.0)
    mn = mn0 * shrink
    u = SC * mn
    at = atanh_pos(tl.minimum(u, S_MAX))
    gd = tl.maximum(1.0 - 2.0 * C_ * bm + (C_ * C_) * b2 * m2, MN)
    big_b2 = 1.0 - C_ * b2
    if KOUT:
        inv_u = 1.0 / u
        thr = tanh_pos(r * at)
        s_w = thr * inv_u * shrink
        mnn = mn0 * mn0
        uw = s_w * mb
        vw = -s_w * mm
        ga = -(C_ * C_) * m2 * uw + C_ * vw - 2.0 * (C_ * C_) * bm * vw
        gb = -(C_ * C_) * b2 * vw - C_ * uw
        e_mu = -2.0 / gd * gb
        e_w = s_w
        e_b = 2.0 / gd * ga
        bw = e_mu * bm + e_w * mb + e_b * b2
        w2 = _quad(e_mu, e_w, e_b, mnn, mm, mb, m2, b2, bm)
        big_a2 = 1.0 + 2.0 * C_ * bw + C_ * w2
        den2_raw = 1.0 + 2.0 * C_ * bw + (C_ * C_) * b2 * w2
        inv_den2 = 1.0 / tl.maximum(den2_raw, MN)
        o_b = (big_a2 + big_b2 * e_b) * inv_den2
        o_mu = big_b2 * e_mu * inv_den2
        o_w = big_b2 * e_w * inv_den2
        o2 = _quad(o_mu, o_w, o_b, mnn, mm, mb, m2, b2, bm)
        on = tl.sqrt(tl.maximum(o2, MN * MN))
        scon = SC * on
        inv_scon = 1.0 / scon
        s = tl.minimum(scon, S_MAX)
        lg = atanh_pos(s) * inv_scon
    else:
        inv_u, thr, s_w, mnn, uw, vw = u, u, u, u, u, u
        e_mu, e_w, e_b, bw, w2, den2_raw, inv_den2 = u, u, u, u, u, u, u
        o_b, o_mu, o_w, o2, on, scon, inv_scon, s, lg = u, u, u, u, u, u, u, u, u
    head = (mn0, big, shrink, mn, u, at, gd, big_b2)
    tail = (inv_u, thr, s_w, mnn, uw, vw, e_mu, e_w, e_b, bw, w2, den2_raw, inv_den2)
    outs = (o_b, o_mu, o_w, o2, on, scon, inv_scon, s, lg)
    return head, tail, outs


@triton.jit
def _gram_adjoint(g, k_mu, k_w, k_b, m2, mm, bm, mnn, mb, b2):
    """Adjoint of ``q = ‖k_μ μ + k_w m + k_β β‖²`` written over the Gram entries ``‖μ‖² = m2``,
    ``⟨m, μ⟩ = mm``, ``⟨β, μ⟩ = bm``, ``‖m‖² = mnn``, ``⟨m, β⟩ = mb``, ``‖β‖² = b2``, given
    ``g = ∂L/∂q``: ``∂L/∂(k_μ, k_w, k_β, m2, b2, bm, mnn, mm, mb)``."""
    d_mu = 2.0 * g * (k_mu * m2 + k_w * mm + k_b * bm)
    d_w = 2.0 * g * (k_w * mnn + k_mu * mm + k_b * mb)
    d_b = 2.0 * g * (k_b * b2 + k_mu * bm + k_w * mb)
    d_m2 = g * k_mu * k_mu
    d_b2 = g * k_b * k_b
    d_bm = 2.0 * g * k_mu * k_b
    d_mnn = g * k_w * k_w
    d_mm = 2.0 * g * k_mu * k_w
    d_mb = 2.0 * g * k_w * k_b
    return d_mu, d_w, d_b, d_m2, d_b2, d_bm, d_mnn, d_mm, d_mb


@triton.jit
def _pixel_output_backward(
    q, mm, mb, m2, b2, bm, r, head, tail, outs, g_kmu, g_kb, g_kw, g_at_seed,
    C_: tl.constexpr, SC: tl.constexpr, S_MAX: tl.constexpr, MN: tl.constexpr,
    KOUT: tl.constexpr,
):  # fmt: skip
    """Reverse of :func:`_pixel_output`: adjoints of q, ⟨m, μ⟩, ⟨m, β⟩ and of the globals."""
    mn0, big, shrink, mn, u, at, gd, big_b2 = head
    inv_u, thr, s_w, mnn, uw, vw, e_mu, e_w, e_b, bw, w2, den2_raw, inv_den2 = tail
    o_b, o_mu, o_w, o2, on, scon, inv_scon, s, lg = outs
    zero = q * 0.0
    g_at = g_at_seed
    g_q, g_mm, g_mb, g_u, g_shrink = zero, zero, zero, zero, zero
    G_m2, G_b2, G_bm, G_gd, G_bb2, G_uv, G_r = zero, zero, zero, zero, zero, zero, zero
    if KOUT:
        g_lg = g_kmu * o_mu + g_kb * o_b + g_kw * o_w
        g_omu = g_kmu * lg
        g_ob = g_kb * lg
        g_ow = g_kw * lg
        g_scon = -(lg * inv_scon * g_lg)
        g_s = g_lg * inv_scon / (1.0 - s * s)
        g_scon += tl.where(scon <= S_MAX, g_s, 0.0)
        g_on = SC * g_scon
        g_o2 = tl.where(o2 >= MN * MN, g_on / (2.0 * on), 0.0)
        qo = _gram_adjoint(g_o2, o_mu, o_w, o_b, m2, mm, bm, mnn, mb, b2)  # o2 = ‖o‖²
        g_omu, g_ow, g_ob = g_omu + qo[0], g_ow + qo[1], g_ob + qo[2]
        G_m2, G_b2, G_bm = G_m2 + qo[3], G_b2 + qo[4], G_bm + qo[5]
        g_mnn, g_mm, g_mb = qo[6], qo[7], qo[8]
        inv = inv_den2
        g_a2 = g_ob * inv
        g_eb = g_ob * big_b2 * inv
        g_emu = g_omu * big_b2 * inv
        g_ew = g_ow * big_b2 * inv
        G_bb2 += (g_ob * e_b + g_omu * e_mu + g_ow * e_w) * inv
        g_den2 = -(g_ob * o_b + g_omu * o_mu + g_ow * o_w) * inv
        g_d2r = tl.where(den2_raw >= MN, g_den2, 0.0)
        g_bw = 2.0 * C_ * (g_d2r + g_a2)
        g_w2 = (C_ * C_) * b2 * g_d2r + C_ * g_a2
        G_b2 += (C_ * C_) * w2 * g_d2r
        qw = _gram_adjoint(g_w2, e_mu, e_w, e_b, m2, mm, bm, mnn, mb, b2)  # w2 = ‖w'‖²
        g_emu, g_ew, g_eb = g_emu + qw[0], g_ew + qw[1], g_eb + qw[2]
        G_m2, G_b2, G_bm = G_m2 + qw[3], G_b2 + qw[4], G_bm + qw[5]
        g_mnn, g_mm, g_mb = g_mnn + qw[6], g_mm + qw[7], g_mb + qw[8]
        g_emu += g_bw * bm
        g_ew += g_bw * mb
        g_eb += g_bw * b2
        G_bm += g_bw * e_mu
        G_b2 += g_bw * e_b
        g_mb += g_bw * e_w
        g_gb = -2.0 / gd * g_emu
        g_ga = 2.0 / gd * g_eb
        g_sw = g_ew
        G_gd -= (g_emu * e_mu + g_eb * e_b) / gd
        uv = -bm
        g_uw = -(C_ * C_) * m2 * g_ga - C_ * g_gb
        g_vw = (C_ + 2.0 * (C_ * C_) * uv) * g_ga - (C_ * C_) * b2 * g_gb
        G_m2 -= (C_ * C_) * uw * g_ga
        G_uv += 2.0 * (C_ * C_) * vw * g_ga
        G_b2 -= (C_ * C_) * vw * g_gb
        g_sw += g_uw * mb - g_vw * mm
        g_mb += g_uw * s_w
        g_mm -= g_vw * s_w
        g_thr = g_sw * shrink * inv_u
        g_u = -(g_sw * s_w * inv_u)
        g_shrink = g_sw * thr * inv_u
        g_rat = g_thr * (1.0 - thr * thr)
        G_r += g_rat * at
        g_at += g_rat * r
        g_q = tl.where(q >= MN * MN, g_mnn, 0.0)
    uc = tl.minimum(u, S_MAX)
    g_u += tl.where(u <= S_MAX, g_at / (1.0 - uc * uc), 0.0)
    g_mn = SC * g_u
    g_mn0 = g_mn * shrink
    g_shrink += g_mn * mn0
    g_mn0 += tl.where(big, -((S_MAX / SC) / (mn0 * mn0) * g_shrink), 0.0)
    g_q += tl.where(q >= MN * MN, g_mn0 / (2.0 * mn0), 0.0)
    return g_q, g_mm, g_mb, (G_m2, G_b2, G_bm, G_gd, G_bb2, G_uv, G_r)


@triton.jit
def _centre_backward(s1, m2, g_A, g_B, s_v, dv, C_: tl.constexpr, SC: tl.constexpr,
                 T_MAX: tl.constexpr, MN: tl.constexpr):  # fmt: skip
    """Reverse of the centre: adjoints of ‖v‖², ‖d‖² and (through 1 − c‖μ‖²) of ‖μ‖²."""
    n2, n, t, inv_t, th, ax, omx, d2, den_raw, inv_den, A, B = s1
    omm = 1.0 - C_ * m2
    g_den = -(A * g_A + B * g_B) * inv_den
    g_denr = tl.where(den_raw >= MN, g_den, 0.0)
    g_omm = g_A * inv_den + omx * g_denr
    g_omx = omm * g_denr
    g_d2 = C_ * (g_B * inv_den + g_denr)
    g_ax = A * s_v + 2.0 * g_d2 * dv
    g_th = -2.0 * th * g_omx + g_ax * inv_t
    g_t = -(ax * inv_t * g_ax) + tl.where(t <= T_MAX, g_th * (1.0 - th * th), 0.0)
    g_n2 = tl.where(n2 >= MN * MN, SC * g_t / (2.0 * n), 0.0)
    return g_n2, g_d2, -C_ * g_omm


@triton.jit
def bn_out_kernel(
    v_ptr, mu_ptr, be_ptr, glob_ptr, r_ptr, o_ptr, vsb, vsc, vsp, osb, osc, osp, C, P,
    C_: tl.constexpr, SC: tl.constexpr, T_MAX: tl.constexpr, S_MAX: tl.constexpr,
    MN: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    b, pid, pix = program_block(BLOCK_P)
    m2, b2, bm, r = _globals(glob_ptr, r_ptr, BLOCK_P)
    s1, dots = _pixel_products(
        v_ptr, mu_ptr, be_ptr, v_ptr, b, pix, vsb, vsc, vsp, vsb, vsc, vsp, C, P, m2, bm, C_, SC,
        T_MAX, MN, True, False, False, BLOCK_C, BLOCK_P,
    )  # fmt: skip
    ax, A, B = s1[5], s1[10], s1[11]
    q, mm, mb = dots[9], dots[10], dots[11]
    head, tail, outs = _pixel_output(q, mm, mb, m2, b2, bm, r, C_, SC, S_MAX, MN, True)
    o_b, o_mu, o_w, lg = outs[0], outs[1], outs[2], outs[8]
    k_mu, k_b, k_w = lg * o_mu, lg * o_b, lg * o_w
    for c0 in range(0, C, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        x, mask = tile(v_ptr, b, ch, pix, vsb, vsc, vsp, C, P)
        muc = channel_column(mu_ptr, ch, C)
        bc = channel_column(be_ptr, ch, C)
        m = A[None, :] * (ax[None, :] * x - muc) - B[None, :] * muc
        out = k_mu[None, :] * muc + k_b[None, :] * bc + k_w[None, :] * m
        store_tile(o_ptr, b, ch, pix, osb, osc, osp, out, mask)


@triton.jit
def bn_var_kernel(
    v_ptr, mu_ptr, glob_ptr, part_ptr, vsb, vsc, vsp, C, P,
    C_: tl.constexpr, SC: tl.constexpr, T_MAX: tl.constexpr, S_MAX: tl.constexpr,
    MN: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    b, pid, pix = program_block(BLOCK_P)
    m2 = _globals(glob_ptr, glob_ptr, BLOCK_P)[0]
    s1, dots = _pixel_products(
        v_ptr, mu_ptr, mu_ptr, v_ptr, b, pix, vsb, vsc, vsp, vsb, vsc, vsp, C, P, m2, m2, C_, SC,
        T_MAX, MN, False, False, False, BLOCK_C, BLOCK_P,
    )  # fmt: skip
    head = _pixel_output(dots[9], dots[10], dots[11], m2, m2, m2, m2, C_, SC, S_MAX, MN, False)[0]
    at = head[5]
    tl.store(part_ptr + pid, tl.sum(tl.where(pix < P, at * at, 0.0), axis=0))


@triton.jit
def bn_bwd_kernel(
    v_ptr, mu_ptr, be_ptr, glob_ptr, r_ptr, g_ptr, gs_ptr, gv_ptr, part_ptr,
    vsb, vsc, vsp, gsb, gsc, gsp, osb, osc, osp, C, P,
    C_: tl.constexpr, SC: tl.constexpr, T_MAX: tl.constexpr, S_MAX: tl.constexpr,
    MN: tl.constexpr, KOUT: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """Gradients of ⟨g, out⟩ (KOUT) or of g_S · Σ at² (not KOUT) w.r.t. v, μ, β and the
    globals; ``part [programs, 2C + 7]``: per-program sums of the μ, β and global adjoints."""
    b, pid, pix = program_block(BLOCK_P)
    pm = pix < P
    m2, b2, bm, r = _globals(glob_ptr, r_ptr, BLOCK_P)
    s1, dots = _pixel_products(
        v_ptr, mu_ptr, be_ptr, g_ptr, b, pix, vsb, vsc, vsp, gsb, gsc, gsp, C, P, m2, bm, C_, SC,
        T_MAX, MN, KOUT, True, KOUT, BLOCK_C, BLOCK_P,
    )  # fmt: skip
    dmu, db, dv, vm, vb, g_mu, g_b, g_v, g_d, q, mm, mb, md, mv, g_m = dots
    ax, A, B = s1[5], s1[10], s1[11]
    head, tail, outs = _pixel_output(q, mm, mb, m2, b2, bm, r, C_, SC, S_MAX, MN, KOUT)
    if KOUT:
        g_at = q * 0.0
        lg = outs[8]
        k_mu, k_b, k_w = lg * outs[1], lg * outs[0], lg * outs[2]
    else:
        g_at = tl.where(pm, 2.0 * head[5] * tl.load(gs_ptr), 0.0)
        k_mu, k_b, k_w = g_at * 0.0, g_at * 0.0, g_at * 0.0
    g_q, g_mm, g_mb, G = _pixel_output_backward(
        q, mm, mb, m2, b2, bm, r, head, tail, outs, g_mu, g_b, g_m, g_at, C_, SC, S_MAX, MN, KOUT
    )
    two_gq = 2.0 * g_q
    s_d = k_w * g_d + two_gq * md + g_mm * dmu + g_mb * db
    s_mu = k_w * g_mu + two_gq * mm + g_mm * m2 + g_mb * bm
    s_v = k_w * g_v + two_gq * mv + g_mm * vm + g_mb * vb
    g_n2, g_d2, gm2_omm = _centre_backward(s1, m2, s_d, -s_mu, s_v, dv, C_, SC, T_MAX, MN)
    two_gn2, two_gd2 = 2.0 * g_n2, 2.0 * g_d2
    for c0 in range(0, C, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        cm = ch < C
        x, mask = tile(v_ptr, b, ch, pix, vsb, vsc, vsp, C, P)
        muc = tl.load(mu_ptr + ch, mask=cm, other=0.0)[:, None]
        d = ax[None, :] * x - muc
        m = A[None, :] * d - B[None, :] * muc
        gm = two_gq[None, :] * m + g_mm[None, :] * muc
        amu = g_mm[None, :] * m
        if KOUT:
            g = tile0(g_ptr, b, ch, pix, gsb, gsc, gsp, C, P)
            bc = tl.load(be_ptr + ch, mask=cm, other=0.0)[:, None]
            gm += k_w[None, :] * g + g_mb[None, :] * bc
            amu += k_mu[None, :] * g
            abeta = k_b[None, :] * g + g_mb[None, :] * m
            tl.store(
                part_ptr + pid * (2 * C + 7) + C + ch,
                tl.sum(tl.where(mask, abeta, 0.0), 1),
                mask=cm,
            )
        gd = A[None, :] * gm + two_gd2[None, :] * d
        amu += -gd - B[None, :] * gm
        tl.store(part_ptr + pid * (2 * C + 7) + ch, tl.sum(tl.where(mask, amu, 0.0), 1), mask=cm)
        gv = ax[None, :] * gd + two_gn2[None, :] * x
        store_tile(gv_ptr, b, ch, pix, osb, osc, osp, gv, mask)
    base = part_ptr + pid * (2 * C + 7) + 2 * C
    tl.store(base, tl.sum(tl.where(pm, G[0] + gm2_omm, 0.0), 0))
    for i in tl.static_range(1, 7):
        tl.store(base + i, tl.sum(tl.where(pm, G[i], 0.0), 0))


@triton.jit
def mid_fwd_kernel(
    v_ptr, part_ptr, vsb, vsc, vsp, C, P, SC: tl.constexpr, T_MAX: tl.constexpr,
    MN: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    """``part [programs, C + 1]``: per-program ``Σ γ² ax v`` and ``Σ γ²``."""
    b, pid, pix = program_block(BLOCK_P)
    pm = pix < P
    n2 = tl.zeros([BLOCK_P], tl.load(v_ptr).dtype)
    for c0 in range(0, C, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        x = tile0(v_ptr, b, ch, pix, vsb, vsc, vsp, C, P)
        n2 += tl.sum(x * x, axis=0)
    t = SC * tl.sqrt(tl.maximum(n2, MN * MN))
    th = tanh_pos(tl.minimum(t, T_MAX))
    g2 = 1.0 / tl.maximum(1.0 - th * th, MN)
    w = tl.where(pm, g2 * th / t, 0.0)
    for c0 in range(0, C, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        x = tile0(v_ptr, b, ch, pix, vsb, vsc, vsp, C, P)
        tl.store(part_ptr + pid * (C + 1) + ch, tl.sum(x * w[None, :], 1), mask=ch < C)
    tl.store(part_ptr + pid * (C + 1) + C, tl.sum(tl.where(pm, g2, 0.0), 0))


@triton.jit
def mid_bwd_kernel(
    v_ptr, gs1_ptr, gs0_ptr, gv_ptr, vsb, vsc, vsp, osb, osc, osp, C, P,
    SC: tl.constexpr, T_MAX: tl.constexpr, MN: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):  # fmt: skip
    b, pid, pix = program_block(BLOCK_P)
    g_s0 = tl.load(gs0_ptr)
    n2 = tl.zeros([BLOCK_P], g_s0.dtype)
    gv = tl.zeros([BLOCK_P], g_s0.dtype)
    for c0 in range(0, C, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        x = tile0(v_ptr, b, ch, pix, vsb, vsc, vsp, C, P)
        gs1 = channel_column(gs1_ptr, ch, C)
        n2 += tl.sum(x * x, axis=0)
        gv += tl.sum(x * gs1, axis=0)
    n = tl.sqrt(tl.maximum(n2, MN * MN))
    t = SC * n
    th = tanh_pos(tl.minimum(t, T_MAX))
    ax = th / t
    g2 = 1.0 / tl.maximum(1.0 - th * th, MN)
    w = g2 * ax
    # w = g2 ax; g2 = 1 / max(1 − th², min); ax = th / t; th = tanh(min(t, t_max))
    g_g2 = g_s0 + gv * ax
    g_ax = gv * g2
    g_th = tl.where(1.0 - th * th >= MN, 2.0 * th * g2 * g2 * g_g2, 0.0) + g_ax / t
    g_t = -(ax / t * g_ax) + tl.where(t <= T_MAX, g_th * (1.0 - th * th), 0.0)
    two_gn2 = tl.where(n2 >= MN * MN, SC * g_t / n, 0.0)
    for c0 in range(0, C, BLOCK_C):
        ch = c0 + tl.arange(0, BLOCK_C)
        x, mask = tile(v_ptr, b, ch, pix, vsb, vsc, vsp, C, P)
        gs1 = channel_column(gs1_ptr, ch, C)
        store_tile(gv_ptr, b, ch, pix, osb, osc, osp, w[None, :] * gs1 + two_gn2[None, :] * x, mask)


def _consts(c: float, proj_eps: float, t_max: float) -> dict:
    return dict(C_=c, SC=c**0.5, T_MAX=float(t_max), S_MAX=1.0 - float(proj_eps), MN=MIN_NORM)


class MidpointSums(torch.autograd.Function):
    """``v → (Σ γ² ax v [C], Σ γ² [1])`` over the batch and pixels (``γ² = 1/(1 − th²)``)."""

    @staticmethod
    def forward(ctx, v, c, t_max, block_c):  # type: ignore[override]
        lv = layout_or_none(v)
        nblk = pixel_blocks(lv, BLOCK_P)
        part = torch.empty(lv.b * nblk, lv.c + 1, dtype=v.dtype, device=v.device)
        mid_fwd_kernel[(lv.b, nblk)](
            v, part, lv.sb, lv.sc, lv.sp, lv.c, lv.p,
            SC=c**0.5, T_MAX=float(t_max), MN=MIN_NORM, BLOCK_C=block_c, BLOCK_P=BLOCK_P,
        )  # fmt: skip
        sums = part.sum(0)
        ctx.save_for_backward(v)
        ctx.args = (c, t_max, block_c)
        return sums[:-1], sums[-1:]

    @staticmethod
    def backward(ctx, g_s1, g_s0):  # type: ignore[override]
        (v,) = ctx.saved_tensors
        c, t_max, block_c = ctx.args
        lv = layout_or_none(v)
        g_s1 = torch.zeros(lv.c, dtype=v.dtype, device=v.device) if g_s1 is None else g_s1
        g_s0 = torch.zeros(1, dtype=v.dtype, device=v.device) if g_s0 is None else g_s0
        grad_v, lo = dense_like(v)
        mid_bwd_kernel[(lv.b, pixel_blocks(lv, BLOCK_P))](
            v, g_s1.contiguous(), g_s0.contiguous(), grad_v, lv.sb, lv.sc, lv.sp,
            lo.sb, lo.sc, lo.sp, lv.c, lv.p,
            SC=c**0.5, T_MAX=float(t_max), MN=MIN_NORM, BLOCK_C=block_c, BLOCK_P=BLOCK_P,
        )  # fmt: skip
        return grad_v, None, None, None


def _bn_backward(v, mu, beta, glob, r, grad, g_s, args, kout):
    """Run :func:`bn_bwd_kernel`; returns ``(grad_v, grad_mu, grad_beta, grad_glob, grad_r)``."""
    c, proj_eps, t_max, block_c = args
    lv = layout_or_none(v)
    if kout:
        grad, lg = grad_map(grad, v)
    else:
        grad, lg = v, lv
    grad_v, lo = dense_like(v)
    nblk = pixel_blocks(lv, BLOCK_P)
    width = 2 * lv.c + N_GLOBALS
    part = torch.zeros(lv.b * nblk, width, dtype=v.dtype, device=v.device)
    bn_bwd_kernel[(lv.b, nblk)](
        v, mu, beta, glob, r, grad, g_s, grad_v, part,
        lv.sb, lv.sc, lv.sp, lg.sb, lg.sc, lg.sp, lo.sb, lo.sc, lo.sp, lv.c, lv.p,
        **_consts(c, proj_eps, t_max), KOUT=kout, BLOCK_C=block_c, BLOCK_P=BLOCK_P,
    )  # fmt: skip
    sums = part.sum(0)
    grad_mu, grad_beta, g = sums[: lv.c], sums[lv.c : 2 * lv.c], sums[2 * lv.c :]
    g_m2, g_b2, g_bm, g_gd, g_bb2, g_uv, g_r = g.unbind()
    m2, b2, bm = glob.unbind()
    # gd = max(1 − 2c⟨β, μ⟩ + c²‖β‖²‖μ‖², min), 1 − c‖β‖², ⟨u, v⟩ = −⟨β, μ⟩
    g_gd = torch.where(1 - 2 * c * bm + c * c * b2 * m2 >= MIN_NORM, g_gd, 0.0)
    grad_glob = torch.stack(
        [
            g_m2 + c * c * b2 * g_gd,
            g_b2 - c * g_bb2 + c * c * m2 * g_gd,
            g_bm - g_uv - 2 * c * g_gd,
        ]
    )
    return grad_v, grad_mu, grad_beta, grad_glob, g_r.reshape(1)


class DistanceSum(torch.autograd.Function):
    """``(v, μ, [‖μ‖², ·, ·]) → Σ at² [1]``, ``at = artanh(√c‖project((−μ) ⊕ expmap0(v))‖)``."""

    @staticmethod
    def forward(ctx, v, mu, glob, c, proj_eps, t_max, block_c):  # type: ignore[override]
        lv = layout_or_none(v)
        nblk = pixel_blocks(lv, BLOCK_P)
        part = torch.empty(lv.b * nblk, dtype=v.dtype, device=v.device)
        bn_var_kernel[(lv.b, nblk)](
            v, mu, glob, part, lv.sb, lv.sc, lv.sp, lv.c, lv.p,
            **_consts(c, proj_eps, t_max), BLOCK_C=block_c, BLOCK_P=BLOCK_P,
        )  # fmt: skip
        ctx.save_for_backward(v, mu, glob)
        ctx.args = (c, proj_eps, t_max, block_c)
        return part.sum().reshape(1)

    @staticmethod
    def backward(ctx, g_s):  # type: ignore[override]
        v, mu, glob = ctx.saved_tensors
        r = torch.zeros(1, dtype=v.dtype, device=v.device)
        grad_v, grad_mu, _, grad_glob, _ = _bn_backward(
            v, mu, mu, glob, r, None, g_s.contiguous(), ctx.args, kout=False
        )
        return grad_v, grad_mu, grad_glob, None, None, None, None


class BatchNormMap(torch.autograd.Function):
    """``(v, μ, β, r, [‖μ‖², ‖β‖², ⟨β, μ⟩]) → logmap0(β ⊕ gyr[β, −μ](r ⊗ ((−μ) ⊕ x)))``."""

    @staticmethod
    def forward(ctx, v, mu, beta, r, glob, c, proj_eps, t_max, block_c):  # type: ignore[override]
        lv = layout_or_none(v)
        out, lo = dense_like(v)
        bn_out_kernel[(lv.b, pixel_blocks(lv, BLOCK_P))](
            v, mu, beta, glob, r, out, lv.sb, lv.sc, lv.sp, lo.sb, lo.sc, lo.sp, lv.c, lv.p,
            **_consts(c, proj_eps, t_max), BLOCK_C=block_c, BLOCK_P=BLOCK_P,
        )  # fmt: skip
        ctx.save_for_backward(v, mu, beta, r, glob)
        ctx.args = (c, proj_eps, t_max, block_c)
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        v, mu, beta, r, glob = ctx.saved_tensors
        grad_v, grad_mu, grad_beta, grad_glob, grad_r = _bn_backward(
            v, mu, beta, glob, r, grad, r, ctx.args, kout=True
        )
        return grad_v, grad_mu, grad_beta, grad_r, grad_glob, None, None, None, None


def batchnorm(
    v: Tensor,
    mu: Tensor | None,
    beta_t: Tensor,
    weight: Tensor,
    var: Tensor | None,
    c: float,
    bn_eps: float,
    proj_eps: float,
    t_max: float,
    block_c: int = BLOCK_C,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """:func:`poincare_resnet.nn._closed_forms.batchnorm_forward` by the Triton kernels.

    ``v`` is a 4-D ``[B, C, H, W]`` tangent map; ``mu`` ([C] ball point) and ``var`` the
    running statistics, or ``None`` for the batch ones (then gradients flow through them into
    ``v``); ``beta_t`` [C] the tangent of the centre, ``weight`` [1] the target standard
    deviation, ``c`` a Python float. Returns ``(out, μ, σ², N)`` (``N`` the number of pixels
    when a batch statistic was computed, else ``None``), as the closed form.
    """
    c = check_curvature(c)
    lv = check_map(v, "v", dims=(4,))
    beta_t = check_channel(beta_t, "beta_t", lv.c, v)
    if not isinstance(weight, Tensor) or weight.numel() != 1:
        raise ValueError(
            f"weight must be a one-element tensor, got {getattr(weight, 'shape', weight)}"
        )
    if weight.device != v.device:
        raise ValueError(f"weight must be on {v.device}, got {weight.device}")
    count = None
    n_pix = lv.b * lv.p
    mu_given, var_given = mu, var  # returned as given, as the closed form does
    if mu is None:
        s1, s0 = MidpointSums.apply(v, c, t_max, block_c)
        count = torch.full((), float(n_pix), dtype=v.dtype, device=v.device)
        mu = midpoint_from_sums(s1, s0[0], count, c, proj_eps)
    else:
        mu = check_channel(mu, "mu", lv.c, v)
    m2 = mu.pow(2).sum()
    if var is None:
        glob_m = torch.stack([m2, m2, m2])
        s_at = DistanceSum.apply(v, mu, glob_m, c, proj_eps, t_max, block_c)
        count = torch.full((), float(n_pix), dtype=v.dtype, device=v.device)
        var = (4 / c) * s_at[0] / count
    else:
        if not isinstance(var, Tensor) or var.numel() != 1:
            raise ValueError(f"var must be a one-element tensor, got {getattr(var, 'shape', var)}")
        var = var.to(v.dtype)
    beta = centre_from_bias(beta_t, c, t_max)  # β = expmap0(bias)
    r = rescale_from_variance(var, weight.to(v.dtype), bn_eps)  # |weight| / √(σ² + eps), [1]
    glob = torch.stack([m2, beta.pow(2).sum(), (beta * mu).sum()])
    out = BatchNormMap.apply(v, mu, beta, r, glob, c, proj_eps, t_max, block_c)
    return (
        out,
        mu if mu_given is None else mu_given,
        var if var_given is None else var_given,
        count,
    )
