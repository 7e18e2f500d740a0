"""Where each layer kernel runs: native C++ (CPU), Triton (CUDA), the PyTorch path or the closed
form.

The layers call these entry points, which pick, in order:

0. the Triton kernels (:mod:`._triton`) for CUDA tensors in eager mode, when ``triton`` is
   importable and not switched off (``POINCARE_RESNET_TRITON=0`` or :func:`set_triton`); under
   ``torch.compile`` the PyTorch path below runs instead, and inductor writes its own fused
   Triton code for it;
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

import os

import torch

from .. import ball
from . import _triton
from ._kernels import batchnorm_forward, residual_forward
from ._native_batchnorm import _check_per_channel, native_batchnorm, native_batchnorm_applicable
from ._native_residual import native_residual, native_residual_applicable
from ._torch_batchnorm import torch_batchnorm, torch_batchnorm_applicable
from ._torch_residual import torch_residual, torch_residual_applicable

_REDUCED = (torch.float16, torch.bfloat16)
_TRITON = {"enabled": os.environ.get("POINCARE_RESNET_TRITON", "1") != "0", "available": None}
# tests only: let CPU tensors take the Triton path under TRITON_INTERPRET=1
_TRITON_ON_CPU = False


def set_triton(enabled: bool) -> None:
    """Switch the Triton kernels of CUDA tensors on or off (process-wide)."""
    _TRITON["enabled"] = bool(enabled)


def _use_triton(*tensors: torch.Tensor, c, kind: str | None = None) -> bool:
    """Whether the Triton kernels take this call: enabled, eager, CUDA (or, for tests, CPU
    tensors under the interpreter), and :func:`._triton.applicable`."""
    if not _TRITON["enabled"] or torch.compiler.is_compiling():
        return False
    t = tensors[0]
    if not (t.is_cuda or (_TRITON_ON_CPU and t.device.type == "cpu")):
        return False
    if _TRITON["available"] is None:
        _TRITON["available"] = _triton.available()
    return bool(_TRITON["available"]) and _triton.applicable(*tensors, c=c, kind=kind)


def _check_curvature(c) -> None:
    if isinstance(c, torch.Tensor) and c.numel() != 1:
        raise ValueError(
            f"curvature c has {c.numel()} elements (shape {tuple(c.shape)}), expected a scalar"
        )


def _check_alpha(alpha) -> None:
    if isinstance(alpha, torch.Tensor) and alpha.numel() != 1:
        raise ValueError(
            f"residual: alpha has {alpha.numel()} elements (shape {tuple(alpha.shape)}), "
            "expected a scalar"
        )


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
    _check_per_channel(v, mu, beta_t, weight, var)
    _check_curvature(c)
    with _no_autocast(v):
        if all_reduce is not None and not (
            torch.distributed.is_available() and torch.distributed.is_initialized()
        ):
            all_reduce = None
        if all_reduce is None and _use_triton(v, c=c, kind="batchnorm"):
            return _triton.batchnorm(v, mu, beta_t, weight, var, c, bn_eps, proj_eps, t_max)
        if native_batchnorm_applicable(v, c, all_reduce):
            return native_batchnorm(v, mu, beta_t, weight, var, c, bn_eps, proj_eps, t_max)
        if torch_batchnorm_applicable(v, c, all_reduce):
            return torch_batchnorm(v, mu, beta_t, weight, var, c, bn_eps, proj_eps, t_max)
        return batchnorm_forward(v, mu, beta_t, weight, var, c, bn_eps, proj_eps, t_max, all_reduce)


def residual(f, res, alpha, c, proj_eps, t_max, f_first):
    """:func:`._kernels.residual_forward`, native or on the PyTorch path where they apply."""
    f, res = full_precision(f), full_precision(res)
    _check_curvature(c)
    _check_alpha(alpha)
    if f.shape != res.shape:
        raise ValueError(
            f"residual: f has shape {tuple(f.shape)} but res has {tuple(res.shape)}; "
            "they must match"
        )
    with _no_autocast(f):
        if f.dim() == 4 and _use_triton(f, res, c=c):
            return _triton.residual(f, res, alpha, c, proj_eps, t_max, f_first)
        if native_residual_applicable(f, res, alpha, c):
            return native_residual(f, res, alpha, c, proj_eps, t_max, f_first)
        if torch_residual_applicable(f, res, alpha, c):
            return torch_residual(f, res, alpha, c, proj_eps, t_max, f_first)
        return residual_forward(f, res, alpha, c, proj_eps, t_max, f_first)


def fc_tangent(dots, sq, znorm, bias, c, dim):
    """:func:`poincare_resnet.ball.fc_tangent` (which picks the native kernel itself), or the
    Triton kernel for CUDA maps."""
    dots, sq = full_precision(dots), full_precision(sq)
    with _no_autocast(dots):
        if dim == 1 and dots.dim() in (2, 4) and _use_triton(dots, sq, znorm, bias, c=c):
            ball.functional._check_fc_tangent(dots, sq, znorm, bias, dim)
            c = ball.functional.check_curvature(c, dots)
            return _triton.fc_tangent(dots, sq, znorm, bias, c, dim)
        return ball.fc_tangent(dots, sq, znorm, bias, c=c, dim=dim)
