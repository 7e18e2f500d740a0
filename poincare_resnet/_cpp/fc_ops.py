"""The native tangent-FC kernels as ``torch.library`` custom ops.

Registering them (with shape-only "fake" implementations) lets ``torch.compile`` put the native
kernels into a compiled graph as opaque nodes instead of breaking the graph at them. Both ops
take the per-pixel inputs ``dots [B, K, P]``, ``sq = ‖p‖² [B, P]``, the per-feature terms
``ch = cosh(2√c r)``, ``sh = sinh(2√c r)``, ``zn2 = 2‖z‖`` ([K]) and the six constants of
:func:`poincare_resnet.nn._native_fc.fc_limits`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import check_same_device, native_op, require_kernel

_TERMS = "Tensor dots, Tensor sq, Tensor ch, Tensor sh, Tensor zn2"
_LIMITS = "float sc, float in_limit, float arg_limit, float out_limit, float small, float min_norm"


def _terms(dots: Tensor, sq: Tensor, ch: Tensor, sh: Tensor, zn2: Tensor) -> dict[str, Tensor]:
    return dict(dots=dots, sq=sq, ch=ch, sh=sh, zn2=zn2)


@native_op("fc_forward", f"({_TERMS}, {_LIMITS}) -> Tensor")
def fc_forward(
    dots: Tensor, sq: Tensor, ch: Tensor, sh: Tensor, zn2: Tensor, *limits: float
) -> Tensor:
    """Fused tangent FC forward on ``dots [B, C, P]`` with ``sq = ‖p‖² [B, P]``."""
    return require_kernel("fc").fc_forward(dots, sq, ch, sh, zn2, *limits)


@fc_forward.register_fake
def _(dots, sq, ch, sh, zn2, *limits):
    check_same_device("fc_forward", "dots", _terms(dots, sq, ch, sh, zn2))
    return torch.empty_like(dots)


@native_op(
    "fc_backward", f"(Tensor grad, {_TERMS}, {_LIMITS}, bool need_dots) -> (Tensor, Tensor, Tensor)"
)
def fc_backward(
    grad: Tensor, dots: Tensor, sq: Tensor, ch: Tensor, sh: Tensor, zn2: Tensor, *rest: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(grad_dots (empty if not needed), grad_sq, [∂/∂zn2, ∂/∂ch, ∂/∂sh])``; ``rest``
    is the six limits and ``need_dots``."""
    grad_dots, grad_sq, chan = require_kernel("fc").fc_backward(
        grad.contiguous(), dots, sq, ch, sh, zn2, *rest
    )
    if grad_dots is None:
        grad_dots = dots.new_empty(0)
    return grad_dots, grad_sq, chan


@fc_backward.register_fake
def _(grad, dots, sq, ch, sh, zn2, *rest):
    check_same_device("fc_backward", "dots", dict(_terms(dots, sq, ch, sh, zn2), grad=grad))
    grad_dots = torch.empty_like(dots) if rest[-1] else dots.new_empty(0)
    return grad_dots, torch.empty_like(sq), dots.new_empty(3, dots.shape[1])
