"""The native batch-norm kernels as ``torch.library`` custom ops (see :mod:`.fc_ops`).

Scalars that are tensors in the model (the batch-norm ``weight``, the rescale ``r``) travel as
tensors and are read inside the ops, so the traced program has no host reads.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import check_same_device, require_kernel


def _scalar(t: Tensor, name: str = "weight") -> float:
    """The value of a one-element tensor argument (checked: a wrongly sized one is an error)."""
    if t.numel() != 1:
        raise ValueError(f"{name} must have one element, got shape {tuple(t.shape)}")
    return float(t.reshape(-1)[0])


@torch.library.custom_op("poincare_resnet::bn_train_forward", mutates_args=())
def bn_train_forward(
    v: Tensor,
    beta_t: Tensor,
    weight: Tensor,
    c: float,
    bn_eps: float,
    proj_eps: float,
    t_max: float,
    min_norm: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Batch norm with batch statistics: ``(out, μ [C], σ² [], midpoint sums [C+1], Σ d² [])``."""
    out, mu, var, sums, dist = require_kernel("batchnorm").bn_train_forward(
        v, beta_t, _scalar(weight), c, bn_eps, proj_eps, t_max, min_norm
    )
    return out, mu, var, sums, dist


@bn_train_forward.register_fake
def _(v, beta_t, weight, c, bn_eps, proj_eps, t_max, min_norm):
    check_same_device("bn_train_forward", "v", dict(v=v, beta_t=beta_t, weight=weight))
    n = v.shape[1]
    return torch.empty_like(v), v.new_empty(n), v.new_empty(()), v.new_empty(n + 1), v.new_empty(())


@torch.library.custom_op("poincare_resnet::bn_train_backward", mutates_args=())
def bn_train_backward(
    v: Tensor,
    grad: Tensor,
    sums: Tensor,
    dist: Tensor,
    beta_t: Tensor,
    weight: Tensor,
    c: float,
    bn_eps: float,
    proj_eps: float,
    t_max: float,
    min_norm: float,
    need_v: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(∂L/∂v (empty if not needed), ∂L/∂bias [C] (float64), ∂L/∂weight [] (float64))``."""
    grad_v, g_bias, g_weight = require_kernel("batchnorm").bn_train_backward(
        v,
        grad.contiguous(),
        sums,
        dist,
        beta_t,
        _scalar(weight),
        c,
        bn_eps,
        proj_eps,
        t_max,
        min_norm,
        need_v,
    )
    if grad_v is None:
        grad_v = v.new_empty(0)
    return grad_v, g_bias, g_weight


@bn_train_backward.register_fake
def _(v, grad, sums, dist, beta_t, weight, c, bn_eps, proj_eps, t_max, min_norm, need_v):
    named = dict(v=v, grad=grad, sums=sums, dist=dist, beta_t=beta_t, weight=weight)
    check_same_device("bn_train_backward", "v", named)
    grad_v = torch.empty_like(v) if need_v else v.new_empty(0)
    f64 = torch.float64
    return grad_v, v.new_empty(v.shape[1], dtype=f64), v.new_empty((), dtype=f64)


@torch.library.custom_op("poincare_resnet::bn_out", mutates_args=())
def bn_out(
    v: Tensor,
    mu: Tensor,
    beta: Tensor,
    r: Tensor,
    c: float,
    t_max: float,
    proj_eps: float,
    min_norm: float,
) -> Tensor:
    """The per-pixel map ``logmap0(β ⊕ gyr[β, −μ](r ⊗ project((−μ) ⊕ expmap0(v))))``."""
    return require_kernel("batchnorm").bn_out(
        v, mu, beta, _scalar(r, "r"), c, t_max, proj_eps, min_norm
    )


@bn_out.register_fake
def _(v, mu, beta, r, c, t_max, proj_eps, min_norm):
    check_same_device("bn_out", "v", dict(v=v, mu=mu, beta=beta, r=r))
    return torch.empty_like(v)


@torch.library.custom_op("poincare_resnet::bn_backward", mutates_args=())
def bn_backward(
    v: Tensor,
    mu: Tensor,
    beta: Tensor,
    grad: Tensor,
    r: Tensor,
    c: float,
    t_max: float,
    proj_eps: float,
    min_norm: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Backward of :func:`bn_out`: ``(∂L/∂v, ∂L/∂μ, ∂L/∂β, ∂L/∂r [1])``."""
    grad_v, grad_mu, grad_beta, grad_r = require_kernel("batchnorm").bn_backward(
        v, mu, beta, grad.contiguous(), _scalar(r, "r"), c, t_max, proj_eps, min_norm
    )
    return grad_v, grad_mu, grad_beta, grad_r


@bn_backward.register_fake
def _(v, mu, beta, grad, r, c, t_max, proj_eps, min_norm):
    check_same_device("bn_backward", "v", dict(v=v, mu=mu, beta=beta, grad=grad, r=r))
    return torch.empty_like(v), torch.empty_like(mu), torch.empty_like(beta), v.new_empty(1)
