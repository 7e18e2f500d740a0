"""The native batch-norm kernels as ``torch.library`` custom ops (see :mod:`.fc_ops`).

Scalars that are tensors in the model (the batch-norm ``weight``, the rescale ``r``) travel as
tensors and are read inside the ops (:func:`.scalar_arg`), so the traced program has no host
reads.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import check_same_device, native_op, require_kernel, scalar_arg

_TRAIN = "float c, float bn_eps, float proj_eps, float t_max, float min_norm"  # train mode
_MAP = "float c, float t_max, float proj_eps, float min_norm"  # the per-pixel map (eval)


@native_op(
    "bn_train_forward",
    f"(Tensor v, Tensor beta_t, Tensor weight, {_TRAIN}) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def bn_train_forward(
    v: Tensor, beta_t: Tensor, weight: Tensor, *scalars: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Batch norm with batch statistics: ``(out, μ [C], σ² [], midpoint sums [C+1], Σ d² [])``;
    ``scalars`` are ``c, bn_eps, proj_eps, t_max, min_norm``."""
    out, mu, var, sums, dist = require_kernel("batchnorm").bn_train_forward(
        v, beta_t, scalar_arg(weight, "weight"), *scalars
    )
    return out, mu, var, sums, dist


@bn_train_forward.register_fake
def _(v, beta_t, weight, *scalars):
    check_same_device("bn_train_forward", "v", dict(v=v, beta_t=beta_t, weight=weight))
    n = v.shape[1]
    return torch.empty_like(v), v.new_empty(n), v.new_empty(()), v.new_empty(n + 1), v.new_empty(())


@native_op(
    "bn_train_backward",
    f"(Tensor v, Tensor grad, Tensor sums, Tensor dist, Tensor beta_t, Tensor weight, {_TRAIN}, "
    "bool need_v) -> (Tensor, Tensor, Tensor)",
)
def bn_train_backward(
    v: Tensor, grad: Tensor, sums: Tensor, dist: Tensor, beta_t: Tensor, weight: Tensor, *rest
) -> tuple[Tensor, Tensor, Tensor]:
    """``(∂L/∂v (empty if not needed), ∂L/∂bias [C] (float64), ∂L/∂weight [] (float64))``;
    ``rest`` is ``c, bn_eps, proj_eps, t_max, min_norm, need_v``."""
    grad_v, g_bias, g_weight = require_kernel("batchnorm").bn_train_backward(
        v, grad.contiguous(), sums, dist, beta_t, scalar_arg(weight, "weight"), *rest
    )
    if grad_v is None:
        grad_v = v.new_empty(0)
    return grad_v, g_bias, g_weight


@bn_train_backward.register_fake
def _(v, grad, sums, dist, beta_t, weight, *rest):
    named = dict(v=v, grad=grad, sums=sums, dist=dist, beta_t=beta_t, weight=weight)
    check_same_device("bn_train_backward", "v", named)
    grad_v = torch.empty_like(v) if rest[-1] else v.new_empty(0)
    f64 = torch.float64
    return grad_v, v.new_empty(v.shape[1], dtype=f64), v.new_empty((), dtype=f64)


@native_op("bn_out", f"(Tensor v, Tensor mu, Tensor beta, Tensor r, {_MAP}) -> Tensor")
def bn_out(v: Tensor, mu: Tensor, beta: Tensor, r: Tensor, *scalars: float) -> Tensor:
    """The per-pixel map ``logmap0(β ⊕ gyr[β, −μ](r ⊗ project((−μ) ⊕ expmap0(v))))``;
    ``scalars`` are ``c, t_max, proj_eps, min_norm``."""
    return require_kernel("batchnorm").bn_out(v, mu, beta, scalar_arg(r, "r"), *scalars)


@bn_out.register_fake
def _(v, mu, beta, r, *scalars):
    check_same_device("bn_out", "v", dict(v=v, mu=mu, beta=beta, r=r))
    return torch.empty_like(v)


@native_op(
    "bn_backward",
    f"(Tensor v, Tensor mu, Tensor beta, Tensor grad, Tensor r, {_MAP}) "
    "-> (Tensor, Tensor, Tensor, Tensor)",
)
def bn_backward(
    v: Tensor, mu: Tensor, beta: Tensor, grad: Tensor, r: Tensor, *scalars: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of :func:`bn_out`: ``(∂L/∂v, ∂L/∂μ, ∂L/∂β, ∂L/∂r [1])``."""
    c, t_max, proj_eps, min_norm = scalars
    grad_v, grad_mu, grad_beta, grad_r = require_kernel("batchnorm").bn_backward(
        v, mu, beta, grad.contiguous(), scalar_arg(r, "r"), c, t_max, proj_eps, min_norm
    )
    return grad_v, grad_mu, grad_beta, grad_r


@bn_backward.register_fake
def _(v, mu, beta, grad, r, *scalars):
    check_same_device("bn_backward", "v", dict(v=v, mu=mu, beta=beta, grad=grad, r=r))
    return torch.empty_like(v), torch.empty_like(mu), torch.empty_like(beta), v.new_empty(1)
