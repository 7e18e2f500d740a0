"""The native tangent-FC kernels as ``torch.library`` custom ops.

Registering them (with shape-only "fake" implementations) lets ``torch.compile`` put the native
kernels into a compiled graph as opaque nodes instead of breaking the graph at them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import load_kernel


@torch.library.custom_op("poincare_resnet::fc_forward", mutates_args=())
def fc_forward(
    dots: Tensor,
    a: Tensor,
    e: Tensor,
    ch: Tensor,
    sh: Tensor,
    zn2: Tensor,
    sc: float,
    arg_limit: float,
    out_limit: float,
    small_p: float,
    min_norm: float,
) -> Tensor:
    """Fused tangent FC forward on ``dots [B, C, P]`` with per-pixel ``a, e [B, P]``."""
    return load_kernel("fc").fc_forward(
        dots, a, e, ch, sh, zn2, sc, arg_limit, out_limit, small_p, min_norm
    )


@fc_forward.register_fake
def _(dots, a, e, ch, sh, zn2, sc, arg_limit, out_limit, small_p, min_norm):
    return torch.empty_like(dots)


@torch.library.custom_op("poincare_resnet::fc_backward", mutates_args=())
def fc_backward(
    grad: Tensor,
    dots: Tensor,
    a: Tensor,
    e: Tensor,
    ch: Tensor,
    sh: Tensor,
    zn2: Tensor,
    sc: float,
    arg_limit: float,
    out_limit: float,
    small_p: float,
    min_norm: float,
    need_dots: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns ``(grad_dots (empty if not needed), grad_a, grad_e, [∂/∂zn2, ∂/∂ch, ∂/∂sh])``."""
    grad_dots, grad_a, grad_e, chan = load_kernel("fc").fc_backward(
        grad.contiguous(), dots, a, e, ch, sh, zn2, sc, arg_limit, out_limit, small_p, min_norm,
        need_dots,
    )
    if grad_dots is None:
        grad_dots = dots.new_empty(0)
    return grad_dots, grad_a, grad_e, chan


@fc_backward.register_fake
def _(grad, dots, a, e, ch, sh, zn2, sc, arg_limit, out_limit, small_p, min_norm, need_dots):
    grad_dots = torch.empty_like(dots) if need_dots else dots.new_empty(0)
    return grad_dots, torch.empty_like(a), torch.empty_like(e), dots.new_empty(3, dots.shape[1])
