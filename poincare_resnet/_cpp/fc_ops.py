"""The native tangent-FC kernels as ``torch.library`` custom ops.

Registering them (with shape-only "fake" implementations) lets ``torch.compile`` put the native
kernels into a compiled graph as opaque nodes instead of breaking the graph at them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import check_same_device, require_kernel


@torch.library.custom_op("poincare_resnet::fc_forward", mutates_args=())
def fc_forward(
    dots: Tensor,
    sq: Tensor,
    ch: Tensor,
    sh: Tensor,
    zn2: Tensor,
    sc: float,
    in_limit: float,
    arg_limit: float,
    out_limit: float,
    small: float,
    min_norm: float,
) -> Tensor:
    """Fused tangent FC forward on ``dots [B, C, P]`` with ``sq = ‖p‖² [B, P]``."""
    limits = (sc, in_limit, arg_limit, out_limit, small, min_norm)
    return require_kernel("fc").fc_forward(dots, sq, ch, sh, zn2, *limits)


@fc_forward.register_fake
def _(dots, sq, ch, sh, zn2, sc, in_limit, arg_limit, out_limit, small, min_norm):
    check_same_device("fc_forward", "dots", dict(dots=dots, sq=sq, ch=ch, sh=sh, zn2=zn2))
    return torch.empty_like(dots)


@torch.library.custom_op("poincare_resnet::fc_backward", mutates_args=())
def fc_backward(
    grad: Tensor,
    dots: Tensor,
    sq: Tensor,
    ch: Tensor,
    sh: Tensor,
    zn2: Tensor,
    sc: float,
    in_limit: float,
    arg_limit: float,
    out_limit: float,
    small: float,
    min_norm: float,
    need_dots: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(grad_dots (empty if not needed), grad_sq, [∂/∂zn2, ∂/∂ch, ∂/∂sh])``."""
    limits = (sc, in_limit, arg_limit, out_limit, small, min_norm)
    grad_dots, grad_sq, chan = require_kernel("fc").fc_backward(
        grad.contiguous(), dots, sq, ch, sh, zn2, *limits, need_dots
    )
    if grad_dots is None:
        grad_dots = dots.new_empty(0)
    return grad_dots, grad_sq, chan


@fc_backward.register_fake
def _(grad, dots, sq, ch, sh, zn2, sc, in_limit, arg_limit, out_limit, small, min_norm, need):
    named = dict(dots=dots, grad=grad, sq=sq, ch=ch, sh=sh, zn2=zn2)
    check_same_device("fc_backward", "dots", named)
    grad_dots = torch.empty_like(dots) if need else dots.new_empty(0)
    return grad_dots, torch.empty_like(sq), dots.new_empty(3, dots.shape[1])
