"""Where each layer kernel runs: native C++ (CPU), the PyTorch path, or the autograd closed form.

The layers call these entry points, which pick, in order:

1. the native kernels (:mod:`poincare_resnet._cpp`): CPU float32/float64 maps, fixed curvature;
2. the PyTorch path (:mod:`._torch_batchnorm`, :mod:`._torch_residual`): autograd Functions with
   hand-written backward passes, the same algebra as the native kernels, on any device (GPUs,
   or the CPU with ``POINCARE_RESNET_NATIVE=0``), for a fixed curvature or a curvature tensor
   that needs no gradient;
3. the autograd closed forms of :mod:`._kernels` only where 2 does not apply: a learnable
   curvature that needs its gradient, and synchronised batch norm across processes (its
   all-reduce of the statistics is differentiable there; the Function does not all-reduce).

All three compute the same values (the tests compare them). Under autocast the hyperbolic maths
is upcast to float32.
"""

from __future__ import annotations

import torch

from .. import ball
from ._kernels import batchnorm_forward, residual_forward
from ._native_batchnorm import native_batchnorm, native_batchnorm_applicable
from ._native_residual import native_residual, native_residual_applicable
from ._torch_batchnorm import torch_batchnorm, torch_batchnorm_applicable
from ._torch_residual import torch_residual, torch_residual_applicable

_REDUCED = (torch.float16, torch.bfloat16)


def full_precision(t: torch.Tensor) -> torch.Tensor:
    """Hyperbolic maths runs in float32 even under autocast: upcast half-precision tensors."""
    return t.float() if t.dtype in _REDUCED else t


def _no_autocast(t: torch.Tensor):
    return torch.autocast(t.device.type, enabled=False)


def batchnorm(v, mu, beta_t, weight, var, c, bn_eps, proj_eps, t_max, all_reduce):
    """:func:`._kernels.batchnorm_forward`, native or on the PyTorch path where they apply
    (``all_reduce`` is used only when a process group exists: without one it is the identity
    and the local statistics are exact)."""
    v = full_precision(v)
    with _no_autocast(v):
        if all_reduce is not None and not (
            torch.distributed.is_available() and torch.distributed.is_initialized()
        ):
            all_reduce = None
        if native_batchnorm_applicable(v, c, all_reduce):
            return native_batchnorm(v, mu, beta_t, weight, var, c, bn_eps, proj_eps, t_max)
        if torch_batchnorm_applicable(v, c, all_reduce):
            return torch_batchnorm(v, mu, beta_t, weight, var, c, bn_eps, proj_eps, t_max)
        return batchnorm_forward(v, mu, beta_t, weight, var, c, bn_eps, proj_eps, t_max, all_reduce)


def residual(f, res, alpha, c, proj_eps, t_max, f_first):
    """:func:`._kernels.residual_forward`, native or on the PyTorch path where they apply."""
    f, res = full_precision(f), full_precision(res)
    with _no_autocast(f):
        if native_residual_applicable(f, res, alpha, c):
            return native_residual(f, res, alpha, c, proj_eps, t_max, f_first)
        if torch_residual_applicable(f, res, alpha, c):
            return torch_residual(f, res, alpha, c, proj_eps, t_max, f_first)
        return residual_forward(f, res, alpha, c, proj_eps, t_max, f_first)


def fc_tangent(dots, sq, znorm, bias, c, dim):
    """:func:`poincare_resnet.ball.fc_tangent` (which picks the native kernel itself)."""
    dots, sq = full_precision(dots), full_precision(sq)
    with _no_autocast(dots):
        return ball.fc_tangent(dots, sq, znorm, bias, c=c, dim=dim)
