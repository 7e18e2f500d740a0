"""The Poincaré midpoint batch norm in PyTorch ops with a hand-written backward (any device).

The same map and the same float32-stable forms (``d = x − μ``, float64 [C]-sized maths) as the
native CPU kernels (``poincare_resnet/_cpp/batchnorm.cpp``); the per-pixel output chain is
shorter than theirs (the gyration as ``s_w (p_μ μ + m + p_β β)`` with four per-call constants,
``‖gyr w‖ = ‖w‖``), so its terms are not named one for one with the C++ and Triton code. Written
as PyTorch operations on ``[B, C, P]``
maps with the per-pixel scalars as ``[B, 1, P]`` tensors, so that it runs wherever PyTorch
runs (GPUs, a curvature tensor that needs no gradient) and agrees with the native path by
construction. Per pixel, with ``x = expmap0(v) = ax·v``::

    d = x − μ  (formed explicitly),   m = (−μ) ⊕ x = A·d − B·μ,
    A = (1 − c‖μ‖²)/den,  B = c‖d‖²/den,  den = (1 − c‖μ‖²)(1 − c‖x‖²) + c‖d‖²
    at = atanh(√c‖project(m)‖)                      (d(x, μ) = 2·at/√c)
    w' = gyr[β, −μ](r ⊗ m) = e_μ μ + e_w m + e_β β,   o = β ⊕ w' = o_μ μ + o_w m + o_β β
    out = logmap0(project(o)) = lg·o

All Möbius maths is per-pixel scalar arithmetic on a few inner products; only those inner
products (channel reductions and ``[K, C] @ [B, C, P]`` matmuls) and the final combination touch
the full maps. ``m`` is never formed from the closed form's ``a1·μ + a2·v``, whose coefficients
cancel in float32 when ``x ≈ μ`` near the boundary (~1e-3 error): every product of ``m`` comes
from those of the small vector ``d``.

Two autograd functions, each saving only its inputs and per-channel statistics and recomputing
the rest in ``backward`` (no host synchronisation, no Python branch on a tensor value):

* :class:`TorchTrainBatchNorm` ``(v, β, weight) → (out, μ, σ²)`` with batch statistics; the
  gradient flows through μ (the gyromidpoint) and σ² into ``v``, as the native
  ``_TrainBatchNorm``. The [C]-sized maths between the reductions runs in float64.
* :class:`TorchBatchNormMap` ``(v, μ, β, r) → out`` with given (running) statistics.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..ball._autograd import _ind
from ..ball.config import MIN_NORM

Scalar = Tensor | float
_MN2 = MIN_NORM * MIN_NORM


class Scalars:
    """A bag of named per-pixel scalars / constants (a plain class: ``torch.compile`` traces
    attribute writes on it, not ``types.SimpleNamespace(**kw)``)."""


def _where0(mask: Tensor, a: Tensor) -> Tensor:
    """``a`` where the 0/1 ``mask`` (:func:`_ind`) is 1, else 0 (the kernels' ``sel``): a
    product, a twentieth of ``torch.where``'s cost on CPU (``a`` is finite where the masks
    below are 0, or NaN from a NaN input, which may then spread to the gradient)."""
    return a * mask


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """``Σ_c a_c b_c`` per pixel: ``[B, C, P] × [B, C, P] → [B, 1, P]``."""
    return torch.linalg.vecdot(a, b, dim=1).unsqueeze(1)


def _sq(a: Tensor) -> Tensor:
    """``‖a‖²`` per pixel, ``[B, 1, P]`` (one reduction, no [B, C, P] temporary; not
    ``linalg.vector_norm``, whose CPU reduction over a non-inner axis is ~50× slower)."""
    return torch.linalg.vecdot(a, a, dim=1).unsqueeze(1)


def _proj(basis: Tensor, t: Tensor) -> Tensor:
    """``⟨basis_k, t⟩`` per pixel: ``[K, C] @ [B, C, P] → [B, K, P]`` (one read of ``t``)."""
    return torch.matmul(basis, t)


def _combine(basis: Tensor, coef: Tensor) -> Tensor:
    """``Σ_k coef_k basis_k``: ``[B, K, P] → [B, C, P]``."""
    return torch.matmul(basis.t(), coef)


def _chan_sums(t: Tensor, coef: Tensor) -> Tensor:
    """``Σ_{b,p} coef[b, k, p] t[b, c, p]``: ``[K, C]`` (one read of ``t``)."""
    return torch.matmul(t, coef.transpose(1, 2)).sum(0).t()


def _axpy(x: Tensor, a: Scalar, y: Tensor) -> Tensor:
    """``x + a·y`` in one pass, ``a`` a number or a 0-d tensor."""
    if isinstance(a, Tensor):
        return torch.addcmul(x, a, y)
    return torch.add(x, y, alpha=a)


def _fma(x: Tensor, *terms: tuple[Scalar, Tensor]) -> Tensor:
    """``x + Σᵢ aᵢ·bᵢ``, one pass per term (:func:`_axpy`)."""
    for a, b in terms:
        x = _axpy(x, a, b)
    return x


def _pdot(a: Tensor, b: Tensor) -> Tensor:
    """``Σ_p a_p b_p`` over all pixels of two [B, 1, P] scalars (one pass, nothing written)."""
    return torch.dot(a.reshape(-1), b.reshape(-1))


class Globals:
    """Adjoints of the global scalars (``‖μ‖², ‖β‖², ⟨β, μ⟩``, ``1 − c‖β‖²``, ``r`` and the
    gyration's coefficients ``a₁…a₄``), each a sum of per-pixel terms ``w·Σ_p a_p b_p``: each
    term is one ``torch.dot`` (no per-pixel accumulator, no [B, 1, P] write), taken when it is
    added, so that its per-pixel factors can be freed at once (a deferred sum kept some fifteen
    of them alive through the rest of the backward)."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor | float] = {}

    def add(self, name: str, a: Tensor, b: Tensor | None = None, w: Scalar = 1.0) -> None:
        """Add ``w·Σ_p a_p b_p`` (``b`` None: ``w·Σ_p a_p``) to the adjoint ``name``."""
        s = a.sum() if b is None else _pdot(a, b)
        self.sums[name] = self.sums.get(name, 0.0) + s * w

    def total(self, name: str) -> Tensor | float:
        """The adjoint ``name`` summed over the pixels (0 if nothing was added)."""
        return self.sums.get(name, 0.0)


def consts(mu: Tensor, beta: Tensor, c: Scalar, t_max: float, proj_eps: float, r):
    """Constants and the global scalars ``‖μ‖², ‖β‖², ⟨β, μ⟩`` (the kernels' ``Consts``), and
    the gyration's coefficients ``a₁…a₄`` (:func:`_pixel_coefficients`)."""
    k = Scalars()
    k.c, k.sc, k.c2 = c, c**0.5, c * c
    k.t_max, k.s_max = t_max, 1 - proj_eps
    k.radius = k.s_max / k.sc
    # the Gram entries summed in float64 and rounded once, as the kernels do: 1 − c‖μ‖² cancels
    # near the boundary, and a float32 sum's few ulp of ‖μ‖² become its relative error there
    m64, b64 = mu.double(), beta.double()
    k.m2, k.b2, k.bm = (x.to(mu.dtype) for x in (m64.dot(m64), b64.dot(b64), b64.dot(m64)))
    k.omm = 1 - c * k.m2
    k.gd_raw = 1 + c * 2 * (-k.bm) + k.c2 * k.b2 * k.m2
    k.gd = k.gd_raw.clamp_min(MIN_NORM)
    k.big_b2 = 1 - c * k.b2
    k.r = r
    # gyr[β, −μ](s_w m) = s_w (p_μ μ + m + p_β β),  p_μ = a₃⟨m, μ⟩ + a₄⟨m, β⟩,
    # p_β = a₁⟨m, β⟩ + a₂⟨m, μ⟩ (the gyration's e_μ, e_β over s_w)
    k.a1 = -2 * k.c2 * k.m2 / k.gd
    k.a2 = 2 * (2 * k.c2 * k.bm - c) / k.gd
    k.a3 = -2 * k.c2 * k.b2 / k.gd
    k.a4 = 2 * c / k.gd
    k.c2b2 = k.c2 * k.b2
    return k


# ---------------------------------------------------------------- centre: x, d and m = A d − B μ
def _centre_expmap(n2: Tensor, k) -> Scalars:
    s = Scalars()
    s.n2 = n2
    s.n = n2.clamp_min(_MN2).sqrt()
    s.t = k.sc * s.n
    s.inv_t = 1 / s.t
    s.th = torch.tanh(s.t.clamp_max(k.t_max))
    s.ax = s.th * s.inv_t
    s.omx = 1 - s.th * s.th  # 1 − c‖x‖²
    return s


def _centre_coefficients(s, d2: Tensor, k) -> None:
    s.d2 = d2
    cd2 = k.c * d2
    s.den_raw = k.omm * s.omx + cd2
    s.inv_den = 1 / s.den_raw.clamp_min(MIN_NORM)
    s.A = k.omm * s.inv_den
    s.B = cd2 * s.inv_den


def _centre_backward(s, k, g_A, g_B, s_v, dv, G: Globals) -> tuple[Tensor, Tensor]:
    """Adjoints of (A, B) → adjoints of (‖v‖², ‖d‖²); the ‖μ‖² part into ``G``."""
    inv = s.inv_den
    g_den = -(s.A * g_A + s.B * g_B) * inv
    g_denr = _where0(_ind(s.den_raw, torch.ge, MIN_NORM), g_den)
    g_omm = g_A * inv + s.omx * g_denr
    g_omx = k.omm * g_denr
    gd2 = k.c * (g_B * inv + g_denr)
    G.add("m2", g_omm, w=-k.c)
    g_ax = s.A * s_v + 2 * gd2 * dv
    g_th = -2 * s.th * g_omx + g_ax * s.inv_t
    g_t = -(s.ax * s.inv_t * g_ax) + _where0(_ind(s.t, torch.le, k.t_max), g_th * (1 - s.th * s.th))
    g_n = k.sc * g_t
    g_n2 = _where0(_ind(s.n2, torch.ge, _MN2), g_n / (2 * s.n))
    return g_n2, gd2


def pixel_products(v: Tensor, mu: Tensor, beta: Tensor, k, g=None, dots: bool = False, centre=None):
    """Per-pixel inner products and the centre: ``(s, d)`` with ``s`` the [B, 1, P] scalars.

    ``dots``: also ``⟨v, μ⟩, ⟨v, β⟩, ⟨d, v⟩`` and, with the output gradient ``g``,
    ``⟨g, μ⟩, ⟨g, β⟩, ⟨g, v⟩, ⟨g, d⟩`` (the backward's products; ``⟨·, v⟩`` as
    ``(⟨·, d⟩ + ⟨·, μ⟩)/ax``). ``centre``: the centre_expmap scalars of ``v`` if already
    computed. With ``m = A d − B μ``: ``⟨m, d⟩ = A‖d‖² − B⟨d, μ⟩``,
    ``⟨m, μ⟩ = A⟨d, μ⟩ − B‖μ‖²`` and ``‖m‖² = A²‖d‖² − 2AB⟨d, μ⟩ + B²‖μ‖²`` in the kernels'
    order: near the boundary ``at = atanh(√c‖m‖)`` amplifies its rounding, and the float32
    test of the weight's gradient sees a reordering (``A⟨m, d⟩ − B⟨m, μ⟩`` or a Horner form:
    1.2–1.4× the error)."""
    basis = torch.stack([mu, beta])
    s = _centre_expmap(_sq(v), k) if centre is None else centre
    d = torch.addcmul(-mu.view(1, -1, 1), s.ax, v)
    pd = _proj(basis, d)
    s.dmu, s.db = pd[:, :1], pd[:, 1:]
    _centre_coefficients(s, _sq(d), k)
    A, B = s.A, s.B
    s.md = torch.addcmul(A * s.d2, B, s.dmu, value=-1)
    s.mm = _axpy(A * s.dmu, -k.m2, B)
    s.mb = _axpy(A * s.db, -k.bm, B)
    s.q = A * A * s.d2 - 2 * A * B * s.dmu + B * B * k.m2  # the kernels' order (see above)
    if dots:
        # v = (d + μ)/ax: ⟨v, μ⟩, ⟨v, β⟩, ⟨d, v⟩ and ⟨g, v⟩ from the products of d (as
        # accurate as formed from v, and three full-size passes fewer)
        inv_ax = 1 / s.ax
        s.vm = (s.dmu + k.m2) * inv_ax
        s.vb = (s.db + k.bm) * inv_ax
        s.dv = (s.d2 + s.dmu) * inv_ax
        s.mv = torch.addcmul(A * s.dv, B, s.vm, value=-1)
        if g is not None:
            pg = _proj(basis, g)
            s.g_mu, s.g_b = pg[:, :1], pg[:, 1:]
            s.g_d = _dot(g, d)
            s.g_v = (s.g_d + s.g_mu) * inv_ax
            s.g_m = torch.addcmul(A * s.g_d, B, s.g_mu, value=-1)
    return s, d


# ---------------------------------------------------------------- pixel output: the rest, per pixel
def _gram(k, s, cm: Tensor, cw: Tensor, cb: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(r_μ, r_m, r_β, q)`` for ``y = cm μ + cw m + cb β``: ``r = ⟨μ|m|β, y⟩`` from the Gram
    entries (``‖m‖² = s.mnn``, ``⟨m, μ⟩``, ``⟨m, β⟩``, the globals) and
    ``q = ‖y‖² = cm r_μ + cw r_m + cb r_β``; ``∂q/∂(cm, cw, cb) = 2 r``."""
    r_mu = _axpy(torch.addcmul(cm * k.m2, cw, s.mm), k.bm, cb)
    r_m = torch.addcmul(torch.addcmul(cw * s.mnn, cm, s.mm), cb, s.mb)
    r_b = torch.addcmul(_axpy(cb * k.b2, k.bm, cm), cw, s.mb)
    q = torch.addcmul(torch.addcmul(cm * r_mu, cw, r_m), cb, r_b)
    return r_mu, r_m, r_b, q


def _pixel_distance(s, k) -> None:
    """From ``‖m‖² = s.q`` to ``at = atanh(√c‖project(m)‖)`` (the variance needs only this)."""
    s.mn0 = s.q.clamp_min(_MN2).sqrt()
    s.big = _ind(s.mn0, torch.gt, k.radius)
    s.shrink = (k.radius / s.mn0).clamp_max(1.0)  # radius/‖m‖ where ‖m‖ > radius, else 1
    s.mn = s.mn0 * s.shrink
    s.u = k.sc * s.mn
    s.at = torch.atanh(s.u.clamp_max(k.s_max))


def _pixel_coefficients(s, k) -> None:
    """The output coefficients ``o = o_μ μ + o_w m + o_β β`` and ``lg`` (after
    :func:`_pixel_distance`). With ``w = r ⊗ project(m) = s_w m`` and the gyration
    ``w' = s_w (p_μ μ + m + p_β β)`` (:func:`consts`): ``⟨β, w'⟩ = s_w p_w``,
    ``p_w = ⟨m, β⟩ + ⟨β, μ⟩ p_μ + ‖β‖² p_β``; ``‖w'‖² = ‖w‖² = s_w²‖m‖²`` (a gyration keeps
    norms); ``β ⊕ w' = ((A₂ + B₂ e_β) β + B₂ w'_{μ, m}) / den₂`` with ``t = 1 + 2c⟨β, w'⟩``,
    ``A₂ = t + c‖w'‖²``, ``den₂ = t + c²‖β‖²‖w'‖²``, ``B₂ = 1 − c‖β‖²``; so ``o_w = s_w B₂/den₂``,
    ``o_μ = p_μ o_w``, ``o_β = A₂/den₂ + p_β o_w``; ``out = lg·o``,
    ``lg = atanh(min(√c‖o‖, 1 − ε))/(√c‖o‖)``."""
    s.inv_u = 1 / s.u
    s.thr = torch.tanh(k.r * s.at)
    s.s_w = s.thr * s.inv_u * s.shrink
    s.mnn = s.mn0 * s.mn0
    s.pm = _axpy(k.a3 * s.mm, k.a4, s.mb)
    s.pb = _axpy(k.a1 * s.mb, k.a2, s.mm)
    s.pw = _axpy(_axpy(s.mb, k.bm, s.pm), k.b2, s.pb)
    s.bw = s.s_w * s.pw
    s.w2 = s.s_w * s.s_w * s.mnn
    t = torch.mul(s.bw, 2 * k.c).add_(1)
    s.big_a2 = _axpy(t, k.c, s.w2)
    s.den2_raw = _axpy(t, k.c2b2, s.w2)
    s.inv_den2 = 1 / s.den2_raw.clamp_min(MIN_NORM)
    s.bi = s.inv_den2 * k.big_b2
    s.o_w = s.s_w * s.bi
    s.o_mu = s.pm * s.o_w
    s.o_b = torch.addcmul(s.big_a2 * s.inv_den2, s.pb, s.o_w)
    s.r_mu, s.r_m, s.r_b, s.o2 = _gram(k, s, s.o_mu, s.o_w, s.o_b)
    s.on = s.o2.clamp_min(_MN2).sqrt()
    s.scon = k.sc * s.on
    s.inv_scon = 1 / s.scon
    s.s = s.scon.clamp_max(k.s_max)
    s.lg = torch.atanh(s.s) * s.inv_scon


def pixel_output(s, k, out: bool = True) -> None:
    """From ``‖m‖², ⟨m, μ⟩, ⟨m, β⟩`` to ``at`` (and, with ``out``, the output coefficients)."""
    _pixel_distance(s, k)
    if out:
        _pixel_coefficients(s, k)


def _logmap_backward(s, k, g_lg: Tensor) -> Tensor:
    """Adjoint of ``‖o‖²`` from that of ``lg = atanh(s)/scon``, ``s = min(scon, 1 − ε)``,
    ``scon = √c‖o‖``: ``∂o2 = (c/2)·∂scon/scon``, ``∂scon = (∂lg/scon)(𝟙/(1 − s²) − lg)``."""
    d_at = _where0(_ind(s.scon, torch.le, k.s_max), 1 / (1 - s.s * s.s))
    g_scon = (g_lg * s.inv_scon) * (d_at - s.lg)
    return _where0(_ind(s.o2, torch.ge, _MN2), g_scon * s.inv_scon) * (k.c / 2)


def _pixel_output_backward_out(s, k, g_kmu, g_kb, g_kw, G: Globals):
    """Reverse of :func:`_pixel_coefficients`, from the adjoints of ``k_μ = lg·o_μ``,
    ``k_β = lg·o_β``, ``k_w = lg·o_w``: ``(g_q, g_mm, g_mb, g_u, g_shrink, g_at)``; the global
    scalars' adjoints accumulated into ``G``."""
    g_lg = torch.addcmul(torch.addcmul(g_kmu * s.o_mu, g_kb, s.o_b), g_kw, s.o_w)
    two_go2 = 2 * _logmap_backward(s, k, g_lg)
    # o2 = quad(o_μ, o_w, o_β): ∂o_* += 2∂o2 r_*; the Gram entries' adjoints
    g_omu = torch.addcmul(g_kmu * s.lg, two_go2, s.r_mu)
    g_ow = torch.addcmul(g_kw * s.lg, two_go2, s.r_m)
    g_ob = torch.addcmul(g_kb * s.lg, two_go2, s.r_b)
    t_mu, t_w = two_go2 * s.o_mu, two_go2 * s.o_w
    G.add("m2", t_mu, s.o_mu, 0.5)
    G.add("bm", t_mu, s.o_b)
    G.add("b2", two_go2 * s.o_b, s.o_b, 0.5)
    g_mnn = (t_w * s.o_w).mul_(0.5)
    g_mm = t_w * s.o_mu
    g_mb = t_w * s.o_b
    # o_w = s_w B₂ inv, o_μ = p_μ o_w, o_β = A₂ inv + p_β o_w (inv = 1/den₂)
    g_owt = torch.addcmul(torch.addcmul(g_ow, g_omu, s.pm), g_ob, s.pb)
    g_pm, g_pb = g_omu * s.o_w, g_ob * s.o_w
    g_bi = g_owt * s.s_w
    g_sw = g_owt * s.bi
    G.add("big_b2", g_bi, s.inv_den2)
    g_a2 = g_ob * s.inv_den2
    g_inv = _axpy(g_ob * s.big_a2, k.big_b2, g_bi)
    # n_den = −∂den₂_raw (inv = 1/max(den₂_raw, min))
    n_den = _where0(_ind(s.den2_raw, torch.ge, MIN_NORM), g_inv * s.inv_den2 * s.inv_den2)
    # A₂ = t + c w2, den₂ = t + c²‖β‖² w2, t = 1 + 2c bw
    g_bw = (g_a2 - n_den) * (2 * k.c)
    g_w2 = _axpy(k.c * g_a2, -k.c2b2, n_den)
    G.add("b2", s.w2, n_den, -k.c2)
    # w2 = s_w² ‖m‖², bw = s_w p_w, p_w = ⟨m, β⟩ + ⟨β, μ⟩ p_μ + ‖β‖² p_β
    sg = s.s_w * g_w2
    g_sw = torch.addcmul(torch.addcmul(g_sw, sg, s.mnn, value=2), g_bw, s.pw)
    g_mnn = torch.addcmul(g_mnn, sg, s.s_w)
    g_pw = g_bw * s.s_w
    g_mb = g_mb + g_pw
    g_pm, g_pb = _axpy(g_pm, k.bm, g_pw), _axpy(g_pb, k.b2, g_pw)
    G.add("bm", g_pw, s.pm)
    G.add("b2", g_pw, s.pb)
    # p_μ = a₃⟨m, μ⟩ + a₄⟨m, β⟩, p_β = a₁⟨m, β⟩ + a₂⟨m, μ⟩
    g_mm = _axpy(_axpy(g_mm, k.a3, g_pm), k.a2, g_pb)
    g_mb = _axpy(_axpy(g_mb, k.a4, g_pm), k.a1, g_pb)
    G.add("a3", g_pm, s.mm)
    G.add("a4", g_pm, s.mb)
    G.add("a1", g_pb, s.mb)
    G.add("a2", g_pb, s.mm)
    # s_w = thr / u · shrink, thr = tanh(r at)
    gi = g_sw * s.inv_u
    g_thr = gi * s.shrink
    g_u = (gi * s.s_w).neg_()
    g_shrink = gi * s.thr
    g_rat = g_thr * (1 - s.thr * s.thr)
    G.add("r", g_rat, s.at)
    g_at = g_rat * k.r
    g_q = _where0(_ind(s.q, torch.ge, _MN2), g_mnn)
    return g_q, g_mm, g_mb, g_u, g_shrink, g_at


def _pixel_output_backward_tail(s, k, g_u, g_shrink, g_at) -> Tensor:
    """Reverse of ``at = atanh(√c‖project(m)‖)`` (linear in its seeds): the adjoint of ‖m‖²."""
    uc = s.u.clamp_max(k.s_max)
    g_u = g_u + _where0(_ind(s.u, torch.le, k.s_max), g_at / (1 - uc * uc))
    g_mn = k.sc * g_u
    g_mn0 = g_mn * s.shrink
    g_shrink = g_shrink + g_mn * s.mn0
    g_mn0 = g_mn0 + _where0(s.big, -(k.radius / (s.mn0 * s.mn0) * g_shrink))
    return _where0(_ind(s.q, torch.ge, _MN2), g_mn0 / (2 * s.mn0))


def _reduce_globals(G: Globals, k, mu: Tensor, beta: Tensor):
    """Per-pixel global adjoints → ``(Δ∂μ [C], Δ∂β [C], ∂r)`` through ‖μ‖², ‖β‖², ⟨β, μ⟩
    (``a₁…a₄`` through ``gd = max(1 − 2c⟨β, μ⟩ + c²‖β‖²‖μ‖², min)``)."""
    S = {n: G.total(n) for n in ("m2", "b2", "bm", "big_b2", "r", "a1", "a2", "a3", "a4")}
    ok = k.gd_raw >= MIN_NORM
    zero = torch.zeros((), dtype=mu.dtype, device=mu.device)
    g_gd = -(S["a1"] * k.a1 + S["a2"] * k.a2 + S["a3"] * k.a3 + S["a4"] * k.a4) / k.gd
    g_gd = torch.where(ok, g_gd, zero)
    two_c2_gd = 2 * k.c2 / k.gd
    g_m2 = S["m2"] - two_c2_gd * S["a1"] + k.c2 * k.b2 * g_gd
    g_b2 = S["b2"] - two_c2_gd * S["a3"] + k.c2 * k.m2 * g_gd - k.c * S["big_b2"]
    g_bm = S["bm"] + 2 * two_c2_gd * S["a2"] - 2 * k.c * g_gd
    return 2 * g_m2 * mu + g_bm * beta, 2 * g_b2 * beta + g_bm * mu, S["r"]


def map_forward(v: Tensor, mu: Tensor, beta: Tensor, k) -> Tensor:
    """The output map ``out = k_μ μ + k_β β + k_w m`` for ``v [B, C, P]``."""
    s, d = pixel_products(v, mu, beta, k)
    pixel_output(s, k)
    return _output(s, d, mu, beta)


def _output(s, d: Tensor, mu: Tensor, beta: Tensor) -> Tensor:
    """``out = k_μ μ + k_β β + k_w m`` with ``m = A d − B μ`` (two passes)."""
    k_mu, k_b, k_w = s.lg * s.o_mu, s.lg * s.o_b, s.lg * s.o_w
    coef = torch.cat([k_mu - k_w * s.B, k_b], dim=1)  # m = A d − B μ
    return torch.addcmul(_combine(torch.stack([mu, beta]), coef), k_w * s.A, d)


def map_backward(v, g, mu, beta, k, var_seed=None):
    """Backward of :func:`map_forward` (plus, in train mode, of ``g_S·Σ at²``).

    ``var_seed(∂r) → g_S``: the adjoint of the variance sum, known only once ``∂r`` is reduced.
    Returns ``(grad_v_parts, ∂μ [C], ∂β [C], ∂r, s)`` with ``grad_v_parts`` a function
    ``(extra basis, extra coefficients, extra v coefficient) → ∂v`` so that the midpoint's
    gradient joins the same final pass."""
    s, d = pixel_products(v, mu, beta, k, g=g, dots=True)
    pixel_output(s, k)
    G = Globals()
    k_mu, k_b, k_w = s.lg * s.o_mu, s.lg * s.o_b, s.lg * s.o_w
    g_q, g_mm, g_mb, g_u, g_shrink, g_at = _pixel_output_backward_out(s, k, s.g_mu, s.g_b, s.g_m, G)
    g_var_s = None
    if var_seed is not None:
        g_var_s = var_seed(G.total("r"))
        g_at = g_at + 2 * g_var_s * s.at
    g_q = g_q + _pixel_output_backward_tail(s, k, g_u, g_shrink, g_at)
    two_gq = 2 * g_q
    A, B, ax = s.A, s.B, s.ax
    s_d = _fma(k_w * s.g_d, (two_gq, s.md), (g_mm, s.dmu), (g_mb, s.db))
    s_mu = _fma(k_w * s.g_mu, (two_gq, s.mm), (k.m2, g_mm), (k.bm, g_mb))
    s_v = _fma(k_w * s.g_v, (two_gq, s.mv), (g_mm, s.vm), (g_mb, s.vb))
    g_n2, g_d2 = _centre_backward(s, k, s_d, -s_mu, s_v, s.dv, G)
    # per channel, with m = A d − B μ:  gm = 2g_q m + g_mm μ + k_w g + g_mb β,
    # gd = A gm + 2 g_d2 d,  ∂v = ax gd + 2 g_n2 v,  ∂μ += g_mm m + k_μ g − gd − B gm,
    # ∂β += k_β g + g_mb m: each a per-pixel combination of d, g, μ, β (and v)
    gm_mu = torch.addcmul(g_mm, two_gq, B, value=-1)
    a_gq = A * two_gq
    p_d = torch.addcmul(2 * g_d2, a_gq, A)
    p_g = A * k_w
    p_mu = A * gm_mu
    p_b = A * g_mb
    amu_d = torch.addcmul(g_mm * A - p_d, B, a_gq, value=-1)
    amu_g = torch.addcmul(k_mu - p_g, B, k_w, value=-1)
    a_b = A + B
    sd = _chan_sums(d, torch.cat([amu_d, p_b], dim=1))
    sg = _chan_sums(g, torch.cat([amu_g, k_b], dim=1))
    # Σ amu_μ = −Σ(g_mm B + (A + B) gm_μ),  Σ amu_β = −Σ (A + B) g_mb,  Σ ab_μ = −Σ g_mb B
    t_mu = _pdot(g_mm, B) + _pdot(a_b, gm_mu)
    grad_mu = sd[0] + sg[0] - t_mu * mu - _pdot(a_b, g_mb) * beta
    grad_beta = sd[1] + sg[1] - _pdot(g_mb, B) * mu
    dmu_g, dbeta_g, g_r = _reduce_globals(G, k, mu, beta)
    grad_mu, grad_beta = grad_mu + dmu_g, grad_beta + dbeta_g

    def grad_v(extra_basis=None, extra_coef=None, extra_v=None) -> Tensor:
        basis = torch.stack([mu, beta])
        coef = torch.cat([ax * p_mu, ax * p_b], dim=1)
        if extra_basis is not None:
            basis = torch.cat([basis, extra_basis])
            coef = torch.cat([coef, extra_coef], dim=1)
        cv = 2 * g_n2 if extra_v is None else 2 * g_n2 + extra_v
        out = torch.addcmul(_combine(basis, coef), ax * p_d, d)
        out = out.addcmul_(ax * p_g, g)
        return out.addcmul_(cv, v)

    return grad_v, grad_mu, grad_beta, g_r, s


# ------------------------------------------------------------------ [C]-sized train-mode maths
def midpoint_from_sums(s1: Tensor, s0: Tensor, count: float, c: Scalar, proj_eps: float):
    """``μ`` from the sums (as the closed form's, and the C++ one), with its intermediates."""
    z = Scalars()
    z.s1 = s1
    z.s0 = s0
    z.c = c
    z.den0 = s0 - count / 2
    z.den = z.den0.clamp_min(MIN_NORM)
    z.m = s1 / z.den
    z.e = 1 - c * z.m.dot(z.m)
    z.sq = z.e.clamp_min(MIN_NORM).sqrt()
    z.dd = 1 + z.sq
    z.mu0 = z.m / z.dd
    z.radius = (1 - proj_eps) / c**0.5
    z.norm0 = z.mu0.norm()
    z.normc = z.norm0.clamp_min(MIN_NORM)
    z.proj = z.normc > z.radius
    z.mu = torch.where(z.proj, z.mu0 / z.normc * z.radius, z.mu0)
    return z


def midpoint_from_sums_backward(z, g_mu: Tensor) -> tuple[Tensor, Tensor]:
    """Adjoint of μ → adjoints of ``(Σγ²x [C], Σγ²)``."""
    g_normc = -(g_mu * z.mu0).sum() * z.radius / (z.normc * z.normc)
    g_normc = torch.where(z.norm0 >= MIN_NORM, g_normc, torch.zeros_like(g_normc))
    g_mu0 = torch.where(z.proj, g_mu * z.radius / z.normc + g_normc * z.mu0 / z.norm0, g_mu)
    g_m = g_mu0 / z.dd
    g_dd = -(g_mu0 * z.m).sum() / (z.dd * z.dd)
    g_e = torch.where(z.e >= MIN_NORM, g_dd / (2 * z.sq), torch.zeros_like(g_dd))
    g_m = g_m + 2 * z.m * (-z.c * g_e)
    g_s1 = g_m / z.den
    g_den = -(g_m * z.s1).sum() / (z.den * z.den)
    g_s0 = torch.where(z.den0 >= MIN_NORM, g_den, torch.zeros_like(g_den))
    return g_s1, g_s0


def _gamma_weight(s) -> tuple[Tensor, Tensor]:
    """``(γ², γ²·ax)`` per pixel, ``γ² = 1/(1 − c‖x‖²)`` (clamped)."""
    g2 = 1 / s.omx.clamp_min(MIN_NORM)
    return g2, g2 * s.ax


def midpoint_sums(v: Tensor, s) -> tuple[Tensor, Tensor]:
    """``(Σ γ² x [C], Σ γ²)`` from the centre scalars of ``v``."""
    g2, w = _gamma_weight(s)
    return _chan_sums(v, w)[0], g2.sum()


def midpoint_sums_backward(v: Tensor, s, k, g_s1: Tensor, g_s0: Tensor) -> tuple[Tensor, Tensor]:
    """Backward of :func:`midpoint_sums` as ``(w [B, 1, P], coefficient on v)``:
    ``∂v = w·g_s1 + coef·v``."""
    g2, w = _gamma_weight(s)
    gvs = _proj(g_s1.view(1, -1), v)  # ⟨v, g_s1⟩ per pixel
    g_g2 = g_s0 + gvs * s.ax
    g_ax = gvs * g2
    e_ok = _ind(s.omx, torch.ge, MIN_NORM)
    g_th = _where0(e_ok, 2 * s.th * g2 * g2 * g_g2) + g_ax * s.inv_t
    g_t = -(s.ax * s.inv_t * g_ax) + _where0(_ind(s.t, torch.le, k.t_max), g_th * (1 - s.th * s.th))
    g_n2 = _where0(_ind(s.n2, torch.ge, _MN2), k.sc * g_t / (2 * s.n))
    return w, 2 * g_n2


def _scalar_consts(c: Scalar, t_max: float):
    """The constants _centre_expmap needs (before μ exists)."""
    k = Scalars()
    k.c = c
    k.sc = c**0.5
    k.t_max = t_max
    return k


class TorchTrainBatchNorm(torch.autograd.Function):
    """Batch norm with batch statistics: ``(v [B, C, P], β [C], weight, c) → (out, μ, σ²)``.

    ``μ`` = gyromidpoint of ``x = expmap0(v)``, ``σ² = 4 Σ at² / (c N)``,
    ``r = |weight| / √(σ² + eps)``; ``out`` as :func:`map_forward`. Saves ``v``, ``β``,
    ``weight``, the midpoint sums and ``Σ at²``. μ and σ² are returned for the running
    statistics only (not differentiable). ``c``: a float or a tensor that needs no gradient.
    """

    @staticmethod
    def forward(ctx, v, beta, weight, c, bn_eps, proj_eps, t_max):  # type: ignore[override]
        k0 = _scalar_consts(c, t_max)
        s = _centre_expmap(_sq(v), k0)
        s1, s0 = midpoint_sums(v, s)
        count = v.shape[0] * v.shape[2]
        z = midpoint_from_sums(s1.double(), s0.double(), count, c, proj_eps)
        mu = z.mu.to(v.dtype)
        k = consts(mu, beta, c, t_max, proj_eps, None)
        s, d = pixel_products(v, mu, beta, k, centre=s)  # the variance and the output share d
        _pixel_distance(s, k)
        S = s.at.square().sum()
        var = S.double() * (4 / c) / count
        k.r = (weight.double().abs().reshape(-1)[0] / torch.sqrt(var + bn_eps)).to(v.dtype)
        _pixel_coefficients(s, k)
        out = _output(s, d, mu, beta)
        ctx.save_for_backward(v, beta, weight, s1, s0, S)
        ctx.args = (c, bn_eps, proj_eps, t_max)
        var = var.to(v.dtype)
        ctx.mark_non_differentiable(mu, var)
        return out, mu, var

    @staticmethod
    def backward(ctx, grad, _grad_mu, _grad_var):  # type: ignore[override]
        v, beta, weight, s1, s0, S = ctx.saved_tensors
        c, bn_eps, proj_eps, t_max = ctx.args
        count = v.shape[0] * v.shape[2]
        z = midpoint_from_sums(s1.double(), s0.double(), count, c, proj_eps)
        mu = z.mu.to(v.dtype)
        var = S.double() * (4 / c) / count
        w = weight.double().reshape(-1)[0]
        sd = torch.sqrt(var + bn_eps)
        r = w.abs() / sd
        k = consts(mu, beta, c, t_max, proj_eps, r.to(v.dtype))
        box = {}

        def var_seed(g_r: Tensor) -> Tensor:
            g_r = g_r.double()
            box["g_w"] = g_r * torch.sign(w) / sd
            g_var = -g_r * r / (2 * (var + bn_eps))
            return (g_var * 4 / (c * count)).to(v.dtype)

        grad_v, g_mu, g_beta, _, s = map_backward(v, grad, mu, beta, k, var_seed)
        g_s1, g_s0 = midpoint_from_sums_backward(z, g_mu.double())
        g_s1 = g_s1.to(v.dtype)
        w_mid, cv_mid = midpoint_sums_backward(v, s, k, g_s1, g_s0.to(v.dtype))
        gv = grad_v(g_s1.view(1, -1), w_mid, cv_mid) if ctx.needs_input_grad[0] else None
        g_w = box["g_w"].to(weight.dtype).expand(weight.shape).clone()
        return gv, g_beta, g_w, None, None, None, None


class TorchBatchNormMap(torch.autograd.Function):
    """``(v [B, C, P], μ, β, r, c) → logmap0(β ⊕ gyr[β, −μ](r ⊗ project((−μ) ⊕ expmap0(v))))``
    with given statistics (``r = |weight| / √(σ² + eps)``, a one-element tensor). Saves its
    inputs only."""

    @staticmethod
    def forward(ctx, v, mu, beta, r, c, t_max, proj_eps):  # type: ignore[override]
        ctx.save_for_backward(v, mu, beta, r)
        ctx.args = (c, t_max, proj_eps)
        k = consts(mu, beta, c, t_max, proj_eps, r.reshape(-1)[0])
        return map_forward(v, mu, beta, k)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        v, mu, beta, r = ctx.saved_tensors
        c, t_max, proj_eps = ctx.args
        k = consts(mu, beta, c, t_max, proj_eps, r.reshape(-1)[0])
        grad_v, g_mu, g_beta, g_r, _ = map_backward(v, grad, mu, beta, k)
        gv = grad_v() if ctx.needs_input_grad[0] else None
        return gv, g_mu, g_beta, g_r.reshape(r.shape), None, None, None


def torch_batchnorm_applicable(v: Tensor, c, all_reduce) -> bool:
    """Whether :func:`torch_batchnorm` handles this call: a 4-D float map, a fixed curvature
    or one that needs no gradient, no cross-process reduction (synchronised batch norm keeps
    the autograd closed form, whose all-reduce is differentiable)."""
    if all_reduce is not None or v.dim() != 4 or v.dtype not in (torch.float32, torch.float64):
        return False
    if isinstance(c, Tensor):
        return c.numel() == 1 and not c.requires_grad
    return isinstance(c, (float, int)) and not isinstance(c, bool)


def torch_batchnorm(
    v: Tensor,
    mu: Tensor | None,
    beta_t: Tensor,
    weight: Tensor,
    var: Tensor | None,
    c: Scalar,
    bn_eps: float,
    proj_eps: float,
    t_max: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """:func:`._closed_forms.batchnorm_forward` by the functions above: ``(out, μ, σ², N)``.

    ``mu``/``var`` ``None``: batch statistics (gradients flow through them into ``v``; the
    returned μ and σ² are detached); otherwise the given running statistics."""
    from ._closed_forms import batchnorm_forward

    if isinstance(c, Tensor):
        c = c.reshape(()).to(v.dtype)
    else:
        c = float(c)
    if (mu is None) != (var is None):  # one batch statistic and one given: not a layer's case
        return batchnorm_forward(v, mu, beta_t, weight, var, c, bn_eps, proj_eps, t_max)
    shape = v.shape
    v = v.reshape(shape[0], shape[1], -1).contiguous()
    dtype = v.dtype
    bt = beta_t.to(dtype)
    beta = bt * _radial_factor(bt.dot(bt), c, t_max)
    if mu is None:
        out, mu, var = TorchTrainBatchNorm.apply(v, beta, weight, c, bn_eps, proj_eps, t_max)
        count = torch.full((), float(v.shape[0] * v.shape[2]), dtype=dtype, device=v.device)
        return out.view(shape), mu, var, count
    mu = mu.reshape(-1).to(dtype)
    r = (weight.to(dtype).abs() / torch.sqrt(var.to(dtype) + bn_eps)).reshape(-1)[:1]
    out = TorchBatchNormMap.apply(v, mu, beta, r, c, t_max, proj_eps)
    return out.view(shape), mu, var, None


def _radial_factor(n2: Tensor, c: Scalar, t_max: float) -> Tensor:
    """``α`` with ``expmap0(b) = α b`` for ``‖b‖² = n2`` (plain autograd: [C]-sized)."""
    sc = c**0.5
    n = n2.clamp_min(_MN2).sqrt()
    return torch.tanh((sc * n).clamp_max(t_max)) / (sc * n)
