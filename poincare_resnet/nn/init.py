"""Initialisations of Poincaré linear and conv weights (``[out, in]`` or ``[out, in, k, k]``).

* ``"identity"`` — the paper's: ``weight = ½·I`` over the flattened input (channel-major, the
  order of the β-concatenated patch vector), ``bias = 0``. With the correct conformal factor a
  square FC layer is then exactly the identity, so tangent norms survive any depth.
* ``"center"`` — centre-tap identity: ``weight[o, o, k//2, k//2] = ½``. A spatial identity for
  convolutions; **not the paper's** initialisation. Outputs beyond ``C_in`` (a widening conv)
  read input channel ``o mod C_in`` at the next tap in centre-first order, so none starts dead.
* ``"hnn"`` — HNN++ normal ``N(0, (2·n·m)^-½)`` with ``n`` the flattened input size and ``m`` the
  outputs; it makes tangent norms collapse in deep stacks.
* ``"kaiming"`` — He-normal for the layer's effective Euclidean weight near the origin. For small
  tangent inputs the layer is linear, ``v ≈ 2·s·W·p`` (``s`` the β-concatenation ratio of a conv,
  1 for a linear layer), so ``weight ~ N(0, σ²)`` with ``σ = √(2/n) / (2s)`` keeps the tangent
  variance of a ReLU network across layers. Meant for normalisation-free networks.
* ``"identity-compensated"`` — a centre-tap identity whose scale compensates the
  β-concatenation ratio and the FC map's non-linearity at an operating tangent norm ``a`` (per
  pixel; default :data:`COMPENSATED_NORM`), so tangent norms survive deep stacks of k×k
  convolutions (see :func:`compensated_gain`); **not the paper's**. For a linear layer it is the
  paper's ½·I (the gain is exactly 1).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

INITS = ("identity", "center", "hnn", "kaiming", "identity-compensated")

#: The default operating tangent norm of ``"identity-compensated"``: the root-mean-square
#: tangent norm per pixel after a Poincaré batch norm with target variance ``g = 1`` centred at
#: the origin (``E d(β, x)² = 1`` and ``d(0, expmap0(u)) = 2‖u‖``).
COMPENSATED_NORM = 0.5


@torch.no_grad()
def init_poincare_weight(
    weight: Tensor, init: str, scale: float = 1.0, *, c: float = 0.1, norm: float = COMPENSATED_NORM
) -> Tensor:
    """Initialise ``weight`` in place (see the module docstring) and return it.

    Parameters
    ----------
    weight : Tensor
        ``[out, in]`` or ``[out, in, k_h, k_w]``.
    init : str
        One of :data:`INITS`.
    scale : float
        The β-concatenation ratio ``s`` of a convolution (used by ``"kaiming"`` only).
    c, norm : float
        The curvature and the operating tangent norm (used by ``"identity-compensated"`` only).

    Returns
    -------
    Tensor
        ``weight``.
    """
    out = weight.shape[0]
    flat = weight.view(out, -1)
    n_in = flat.shape[1]
    if init == "identity":
        flat.zero_()
        k = min(out, n_in)
        flat[torch.arange(k), torch.arange(k)] = 0.5
    elif init == "center":
        _center_tap(weight, 0.5)
    elif init == "identity-compensated":
        kernel_elems = weight[0, 0].numel()
        _center_tap(weight, 0.5 * compensated_gain(weight.shape[1], kernel_elems, c, norm))
    elif init == "hnn":
        weight.normal_(0.0, (2.0 * n_in * out) ** -0.5)
    elif init == "kaiming":
        if not scale > 0:
            raise ValueError(f"init 'kaiming' needs a positive scale, got {scale}")
        weight.normal_(0.0, math.sqrt(2.0 / n_in) / (2.0 * scale))
    else:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    return weight


def _center_tap(weight: Tensor, value: float) -> None:
    """Zero ``weight`` but one tap ``value`` per output: output ``o`` reads input channel
    ``o mod C_in`` at the ``(o div C_in)``-th tap in centre-first order (the centre tap
    ``weight[o, o, k_h//2, k_w//2]`` for ``o < C_in``: a square conv is a spatial identity; a
    widening conv also copies shifted taps, so no output starts dead). 2-D: ``weight[o, o]``."""
    weight.zero_()
    out, c_in = weight.shape[0], weight.shape[1]
    if weight.dim() == 2:
        k = min(out, c_in)
        weight[torch.arange(k), torch.arange(k)] = value
        return
    kh, kw = weight.shape[2], weight.shape[3]
    taps = sorted(
        ((i, j) for i in range(kh) for j in range(kw)),
        key=lambda t: (t[0] - kh // 2) ** 2 + (t[1] - kw // 2) ** 2,
    )
    o = torch.arange(min(out, c_in * kh * kw))
    rows, cols = torch.tensor(taps).index_select(0, o // c_in).unbind(1)
    weight[o, o % c_in, rows, cols] = value


def compensated_gain(in_channels: int, kernel_elems: int, c: float, norm: float) -> float:
    """Normal length ``κ = 2‖z_o‖`` of the centre-tap identity that keeps the tangent norm ``a``.

    With ``weight[o, o, centre] = κ/2`` (so ``ẑ_o`` is the centre tap of channel ``o``), ``r = 0``
    and a tangent map of norm ``a`` at every pixel (``C`` channels, ``K`` taps, β-ratio ``s``),
    a patch has ``‖p‖ = s√K·a`` and the FC map (:func:`~poincare_resnet.nn.fc_map.fc_tangent`)
    reads::

        q_o = sinh(2t)/‖p‖ · s·U_o  (t = √c‖p‖, so ‖q‖ = sinh(2t)/√K),
        ψ_o = sinh(κ·asinh q_o),    ‖output‖ = asinh(‖ψ‖)/(2√c).

    The output keeps the norm ``a`` iff ``‖ψ‖ = sinh(2√c·a)``. For an isotropic direction of
    ``U`` (``E q_o⁴ = 3‖q‖⁴/(C(C+2))``) and ``sinh(κ asinh q) = κq + κ(κ²−1)q³/6 + O(q⁵)``,
    ``E‖ψ‖² = κ²‖q‖²(1 + (κ²−1)σ²)`` with ``σ² = ‖q‖²/(C+2)``; equating it to
    ``sinh²(2√c·a) = T·‖q‖²`` gives the quadratic ``σ²κ⁴ + (1−σ²)κ² − T = 0``::

        T  = K·sinh²(2√c·a) / sinh²(2√c·s√K·a)
        κ² = (√((1−σ²)² + 4σ²T) − (1−σ²)) / (2σ²)

    As ``a → 0``, ``κ → 1/s`` (the β-ratio compensated); a linear layer (``K = s = 1``) has
    ``T = 1`` and ``κ = 1``: the paper's ½·I, exactly the identity.

    Parameters
    ----------
    in_channels, kernel_elems : int
        ``C`` and ``K = k_h·k_w``.
    c, norm : float
        The curvature and the operating tangent norm ``a`` (per pixel, > 0).

    Returns
    -------
    float
        ``κ``.
    """
    if not (c > 0 and norm > 0):
        raise ValueError(f"identity-compensated needs c > 0 and norm > 0, got c={c}, norm={norm}")
    s = beta_concat_scale(in_channels, kernel_elems)
    rc, root_k = math.sqrt(c), math.sqrt(kernel_elems)
    q_norm = math.sinh(2 * rc * s * root_k * norm) / root_k
    target = math.sinh(2 * rc * norm) / q_norm
    var = q_norm**2 / (in_channels + 2)
    b = 1.0 - var  # κ² = 2T / (√(b² + 4σ²T) + b): the stable root of the quadratic
    return math.sqrt(2 * target**2 / (math.sqrt(b * b + 4 * var * target**2) + b))


def beta_concat_scale(in_channels: int, kernel_elems: int) -> float:
    """β-concatenation ratio ``s = B(C_in·k²/2, ½) / B(C_in/2, ½)`` (≈ 1/k)."""

    def log_beta(a: float, b: float) -> float:
        return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)

    n = in_channels * kernel_elems
    return math.exp(log_beta(n / 2, 0.5) - log_beta(in_channels / 2, 0.5))
