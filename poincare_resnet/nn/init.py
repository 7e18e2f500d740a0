"""Initialisations of Poincaré linear and conv weights (``[out, in]`` or ``[out, in, k, k]``).

* ``"identity"`` — the paper's: ``weight = ½·I`` over the flattened input (channel-major, the
  order of the β-concatenated patch vector), ``bias = 0``. With the correct conformal factor a
  square FC layer is then exactly the identity, so tangent norms survive any depth.
* ``"center"`` — centre-tap identity: ``weight[o, o, k//2, k//2] = ½``. A spatial identity for
  convolutions; **not the paper's** initialisation.
* ``"hnn"`` — HNN++ normal ``N(0, (2·n·m)^-½)`` with ``n`` the flattened input size and ``m`` the
  outputs; it makes tangent norms collapse in deep stacks.
* ``"kaiming"`` — He-normal for the layer's effective Euclidean weight near the origin. For small
  tangent inputs the layer is linear, ``v ≈ 2·s·W·p`` (``s`` the β-concatenation ratio of a conv,
  1 for a linear layer), so ``weight ~ N(0, σ²)`` with ``σ = √(2/n) / (2s)`` keeps the tangent
  variance of a ReLU network across layers. Meant for normalisation-free networks.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

INITS = ("identity", "center", "hnn", "kaiming")


@torch.no_grad()
def init_poincare_weight(weight: Tensor, init: str, scale: float = 1.0) -> Tensor:
    """Initialise ``weight`` in place (see the module docstring) and return it.

    ``scale`` is the β-concatenation ratio ``s`` of a convolution (used by ``"kaiming"`` only).
    """
    out = weight.shape[0]
    flat = weight.view(out, -1)
    n_in = flat.shape[1]
    if init == "identity":
        flat.zero_()
        k = min(out, n_in)
        flat[torch.arange(k), torch.arange(k)] = 0.5
    elif init == "center":
        weight.zero_()
        k = min(out, weight.shape[1])
        if weight.dim() == 2:
            weight[torch.arange(k), torch.arange(k)] = 0.5
        else:
            cy, cx = weight.shape[2] // 2, weight.shape[3] // 2
            weight[torch.arange(k), torch.arange(k), cy, cx] = 0.5
    elif init == "hnn":
        weight.normal_(0.0, (2.0 * n_in * out) ** -0.5)
    elif init == "kaiming":
        if not scale > 0:
            raise ValueError(f"init 'kaiming' needs a positive scale, got {scale}")
        weight.normal_(0.0, math.sqrt(2.0 / n_in) / (2.0 * scale))
    else:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    return weight


def beta_concat_scale(in_channels: int, kernel_elems: int) -> float:
    """β-concatenation ratio ``s = B(C_in·k²/2, ½) / B(C_in/2, ½)`` (≈ 1/k)."""

    def log_beta(a: float, b: float) -> float:
        return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)

    n = in_channels * kernel_elems
    return math.exp(log_beta(n / 2, 0.5) - log_beta(in_channels / 2, 0.5))
