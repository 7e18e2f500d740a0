"""The batch-norm map of :class:`~.PoincareBatchNorm2d`: where it runs.

:func:`batchnorm` is the layer's entry point; it picks (see :mod:`._dispatch`) the Triton
kernels (:func:`._triton.batchnorm`, eager CUDA), the native kernels
(:func:`._native_batchnorm.native_batchnorm`, CPU), the PyTorch path
(:func:`._torch_batchnorm.torch_batchnorm`) or the closed form
(:func:`._closed_forms.batchnorm_forward`: synchronised batch norm, a learnable curvature). All give
the same values. The native and PyTorch wrappers share their front end
(:func:`._batchnorm_front.batchnorm_front`).
"""

from __future__ import annotations

import torch

from . import _triton
from ._batchnorm_front import check_per_channel
from ._closed_forms import batchnorm_forward
from ._dispatch import check_curvature, full_precision, no_autocast, use_triton
from ._native_batchnorm import native_batchnorm, native_batchnorm_applicable
from ._torch_batchnorm import torch_batchnorm, torch_batchnorm_applicable

__all__ = ["batchnorm"]


def batchnorm(v, mu, beta_t, weight, var, c, bn_eps, proj_eps, t_max, all_reduce):
    """The Poincaré midpoint batch norm (:func:`._closed_forms.batchnorm_forward`) by the fastest
    implementation that applies.

    With ``x_i = expmap0(v_i)`` over the ``N = B·H·W`` positions::

        μ  = gyromidpoint(x),   σ² = (1/N) Σ d(x_i, μ)²        (or the given running ones)
        out_i = logmap0(β ⊕ gyr[β, −μ](r ⊗ ((−μ) ⊕ x_i))),  β = expmap0(bias),
        r = |weight| / √(σ² + eps)

    Parameters
    ----------
    v : Tensor
        The tangent map; float16/bfloat16 is upcast to float32.
    mu, var : Tensor or None
        The running mean (a ball point, ``[C]``) and variance (one element), or ``None`` for
        the batch statistics (gradients then flow through them into ``v``).
    beta_t : Tensor
        ``bias``, ``[C]``.
    weight : Tensor
        One element.
    c : float or Tensor
        The curvature (a scalar tensor may require grad).
    bn_eps, proj_eps, t_max : float
        ``eps`` of ``√(σ² + eps)``, the projection ε and ``artanh(1 − ε)``.
    all_reduce : callable or None
        Sums a tensor across processes (synchronised batch norm); used only when a process
        group exists (without one it is the identity and the local statistics are exact).

    Returns
    -------
    tuple
        ``(out, μ, σ², N)``: the output map, the statistics used (detached batch ones, or the
        given running ones) and the number of positions (``None`` in eval mode).

    Shapes
    ------
    ``v [B, C, H, W]``, ``mu, beta_t [C]``, ``weight, var [1]`` → ``out [B, C, H, W]``.
    """
    v = full_precision(v)
    check_per_channel(v, mu, beta_t, weight, var)
    check_curvature(c)
    with no_autocast(v):
        if all_reduce is not None and not (
            torch.distributed.is_available() and torch.distributed.is_initialized()
        ):
            all_reduce = None
        if all_reduce is None and use_triton(v, c=c, kind="batchnorm"):
            return _triton.batchnorm(v, mu, beta_t, weight, var, c, bn_eps, proj_eps, t_max)
        both_or_neither = (mu is None) == (var is None)
        if both_or_neither and native_batchnorm_applicable(v, c, all_reduce):
            return native_batchnorm(v, mu, beta_t, weight, var, c, bn_eps, proj_eps, t_max)
        if torch_batchnorm_applicable(v, c, all_reduce):
            return torch_batchnorm(v, mu, beta_t, weight, var, c, bn_eps, proj_eps, t_max)
        return batchnorm_forward(v, mu, beta_t, weight, var, c, bn_eps, proj_eps, t_max, all_reduce)
