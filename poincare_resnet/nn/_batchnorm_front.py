"""The front end every batch-norm implementation shares (native, PyTorch path; see
:mod:`.batchnorm_map`): the argument checks, the ``[B, C, H·W]`` view, the train/eval split and,
in eval mode, ``β = expmap0(bias)`` and ``r = |weight|/√(σ² + eps)``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ._closed_forms import _radial

__all__ = [
    "BatchNormFront",
    "batchnorm_front",
    "centre_from_bias",
    "check_per_channel",
    "rescale_from_variance",
]


def check_per_channel(v: Tensor, mu, beta_t: Tensor, weight: Tensor, var) -> None:
    """``ValueError`` naming the argument for a wrongly sized per-channel tensor (shapes only:
    no host sync). ``bias`` and the running mean hold one value per channel, ``weight`` and the
    running variance one value."""
    channels = v.shape[1]
    named = [("bias", beta_t, channels), ("weight", weight, 1)]
    if mu is not None:
        named.append(("running mean", mu, channels))
    if var is not None:
        named.append(("running variance", var, 1))
    for name, t, n in named:
        if t.numel() != n:
            what = "one per channel" if n == channels and name != "weight" else "a scalar"
            raise ValueError(
                f"batch norm: {name} has {t.numel()} elements (shape {tuple(t.shape)}), expected "
                f"{n} ({what} of the input of shape {tuple(v.shape)})"
            )


def centre_from_bias(beta_t: Tensor, c, t_max: float) -> Tensor:
    """``β = expmap0(bias)`` (the closed form's, ``√c‖bias‖`` capped at ``t_max``)."""
    b_alpha, _ = _radial(beta_t.pow(2).sum(), c**0.5, t_max)
    return beta_t * b_alpha


def rescale_from_variance(var: Tensor, weight: Tensor, bn_eps: float) -> Tensor:
    """``r = |weight| / √(σ² + eps)`` as a ``[1]`` tensor."""
    return (weight.abs() / torch.sqrt(var + bn_eps)).reshape(-1)[:1]


class BatchNormFront(NamedTuple):
    """The implementation-independent part of a batch-norm call (:func:`batchnorm_front`)."""

    shape: torch.Size  # of the input map, for the output's view
    v: Tensor  # the map as a contiguous [B, C, H·W]
    train: bool  # batch statistics (μ, σ² from v) rather than the given running ones
    mu: Tensor | None  # eval: the running mean as a [C] ball point of v's dtype
    beta: Tensor | None  # eval: β = expmap0(bias), [C]
    r: Tensor | None  # eval: r = |weight|/√(σ² + eps), [1]

    def count(self) -> Tensor:
        """``N = B·H·W``, the number of positions a batch statistic averages over."""
        n = float(self.v.shape[0] * self.v.shape[2])
        return torch.full((), n, dtype=self.v.dtype, device=self.v.device)


def _given(t: Tensor | None) -> str:
    return "None" if t is None else "a tensor"


def batchnorm_front(
    v: Tensor,
    mu: Tensor | None,
    beta_t: Tensor,
    weight: Tensor,
    var: Tensor | None,
    c,
    bn_eps: float,
    t_max: float,
) -> BatchNormFront:
    """Check the arguments of a batch-norm call and prepare what every implementation reads.

    Parameters
    ----------
    v : Tensor
        The tangent map ``[B, C, H, W]``.
    mu, var : Tensor or None
        The running statistics (a ``[C]`` ball point, a one-element σ²), or both ``None`` for
        the batch statistics (train mode).
    beta_t : Tensor
        ``bias``, the tangent of the centre, ``[C]``.
    weight : Tensor
        The target standard deviation, one element.
    c : float or Tensor
        The curvature.
    bn_eps : float
        ``eps`` of ``√(σ² + eps)``.
    t_max : float
        ``artanh(1 − ε)``, the cap of ``√c‖bias‖``.

    Returns
    -------
    BatchNormFront
        ``(shape, v [B, C, H·W], train, μ, β, r)``; in train mode μ, β, r are ``None`` (the
        implementation computes them from the batch).

    Raises
    ------
    ValueError
        Naming the argument, for a wrongly sized per-channel tensor, or for one running
        statistic given without the other (not a layer's case: the closed form takes it).
    """
    check_per_channel(v, mu, beta_t, weight, var)
    if (mu is None) != (var is None):
        raise ValueError(
            "batch norm: give both running statistics (eval) or neither (batch statistics); "
            f"got mu={_given(mu)}, var={_given(var)}"
        )
    shape = v.shape
    # [B, C, H·W]: under torch.compile a saved 4-D map downstream of a convolution would be
    # copied to channels-last (inductor's layout optimisation) and back for the kernel
    flat = v.reshape(shape[0], shape[1], -1).contiguous()
    if mu is None:
        return BatchNormFront(shape, flat, True, None, None, None)
    dtype = v.dtype
    beta = centre_from_bias(beta_t.to(dtype), c, t_max).contiguous()
    r = rescale_from_variance(var.to(dtype), weight.to(dtype), bn_eps)
    return BatchNormFront(shape, flat, False, mu.reshape(-1).to(dtype).contiguous(), beta, r)
