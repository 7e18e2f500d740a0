"""Optional fusion of the element-wise layer kernels with ``torch.compile`` (inductor).

Eager PyTorch runs each element-wise op of a hyperbolic layer as its own pass over memory; the
kernels in :mod:`._kernels` and the tangent FC map are pure functions, so ``torch.compile`` can
fuse each into a couple of loops (and derive a rematerialising backward). ``set_fusion(True)``
(or ``POINCARE_RESNET_FUSION=1``) turns this on for models run eagerly; inside an outer
``torch.compile`` the plain functions are traced directly. If compilation fails (no C++
compiler, unsupported platform) the plain functions are used, with one warning.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any

import torch

from .. import ball
from ..ball.functional import _fc_tangent_ref
from ._kernels import batchnorm_forward, residual_forward

_enabled = os.environ.get("POINCARE_RESNET_FUSION", "0") not in ("0", "", "false", "off")
_failed = False


def set_fusion(enabled: bool) -> None:
    """Fuse the element-wise kernels with ``torch.compile`` when running eagerly."""
    global _enabled
    _enabled = bool(enabled)


def fusion_enabled() -> bool:
    return _enabled and not _failed


def _compiled(fn: Callable) -> Callable:
    cache: dict[str, Callable] = {}

    def run(*args: Any) -> Any:
        global _failed
        if not fusion_enabled() or torch.compiler.is_compiling():
            return fn(*args)
        if "fn" not in cache:
            cache["fn"] = torch.compile(fn, dynamic=True, fullgraph=True)
        try:
            return cache["fn"](*args)
        except Exception as exc:  # pragma: no cover - depends on the platform's toolchain
            _failed = True
            warnings.warn(f"poincare_resnet: kernel fusion disabled ({exc!r:.200})", stacklevel=2)
            return fn(*args)

    run.__name__ = getattr(fn, "__name__", "fused")
    return run


_bn_fused = _compiled(batchnorm_forward)
_residual_fused = _compiled(residual_forward)
_fc_fused = _compiled(_fc_tangent_ref)


_REDUCED = (torch.float16, torch.bfloat16)


def full_precision(t: torch.Tensor) -> torch.Tensor:
    """Hyperbolic maths runs in float32 even under autocast: upcast half-precision tensors."""
    return t.float() if t.dtype in _REDUCED else t


def _no_autocast(t: torch.Tensor):
    return torch.autocast(t.device.type, enabled=False)


def fused_batchnorm(v, mu, beta_t, weight, var, c, bn_eps, proj_eps, t_max, all_reduce):
    v = full_precision(v)
    with _no_autocast(v):
        return _batchnorm(v, mu, beta_t, weight, var, c, bn_eps, proj_eps, t_max, all_reduce)


def _batchnorm(v, mu, beta_t, weight, var, c, bn_eps, proj_eps, t_max, all_reduce):
    if (
        all_reduce is not None
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
    ):
        return batchnorm_forward(v, mu, beta_t, weight, var, c, bn_eps, proj_eps, t_max, all_reduce)
    # without a process group the all-reduce is the identity: the local statistics are exact
    from ._native_batchnorm import native_batchnorm, native_batchnorm_applicable

    if native_batchnorm_applicable(v, c, None):  # CPU, fixed c: fused C++ forward and backward
        return native_batchnorm(v, mu, beta_t, weight, var, c, bn_eps, proj_eps, t_max)
    return _bn_fused(v, mu, beta_t, weight, var, c, bn_eps, proj_eps, t_max, None)


def fused_residual(f, res, alpha, c, proj_eps, t_max, f_first):
    from ._native_residual import native_residual, native_residual_applicable

    f, res = full_precision(f), full_precision(res)
    with _no_autocast(f):
        if native_residual_applicable(f, res, alpha, c):
            return native_residual(f, res, alpha, c, proj_eps, t_max, f_first)
        return _residual_fused(f, res, alpha, c, proj_eps, t_max, f_first)


def fused_fc_tangent(dots, sq, znorm, bias, c, dim):
    """The tangent FC map: compiled plain formula when fusing, else the manual-backward op."""
    dots, sq = full_precision(dots), full_precision(sq)
    with _no_autocast(dots):
        return _fc_tangent(dots, sq, znorm, bias, c, dim)


def _fc_tangent(dots, sq, znorm, bias, c, dim):
    if fusion_enabled() and ball.manual_backward_enabled() and not torch.compiler.is_compiling():
        return _fc_fused(dots, sq, znorm, bias, c, dim)
    return ball.fc_tangent(dots, sq, znorm, bias, c=c, dim=dim)
