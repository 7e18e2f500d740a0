"""The native residual kernels as ``torch.library`` custom ops (see :mod:`.fc_ops`).

``alpha`` travels as a one-element CPU tensor and is read inside the op, so a learnable
residual scale needs no host read in the traced program.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import check_same_device, require_kernel


def _alpha(alpha: Tensor) -> float:
    """The residual scale's value (a one-element tensor; a wrongly sized one is an error)."""
    if alpha.numel() != 1:
        raise ValueError(f"alpha must have one element, got shape {tuple(alpha.shape)}")
    return float(alpha)


@torch.library.custom_op("poincare_resnet::residual_forward", mutates_args=())
def residual_forward(
    f: Tensor, res: Tensor, alpha: Tensor, c: float, proj_eps: float, t_max: float, f_first: bool
) -> Tensor:
    """``logmap0(expmap0(α f) ⊕ expmap0(res))`` (or ``res ⊕ f``) on ``[B, C, P]`` maps."""
    return require_kernel("residual").residual_forward(
        f, res, _alpha(alpha), c, proj_eps, t_max, f_first
    )


@residual_forward.register_fake
def _(f, res, alpha, c, proj_eps, t_max, f_first):
    check_same_device("residual_forward", "f", dict(f=f, res=res))
    return torch.empty_like(f)


@torch.library.custom_op("poincare_resnet::residual_backward", mutates_args=())
def residual_backward(
    grad: Tensor,
    f: Tensor,
    res: Tensor,
    alpha: Tensor,
    c: float,
    proj_eps: float,
    t_max: float,
    f_first: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(∂L/∂f, ∂L/∂res, ∂L/∂α)``."""
    grad_f, grad_r, grad_a = require_kernel("residual").residual_backward(
        grad, f, res, _alpha(alpha), c, proj_eps, t_max, f_first
    )
    return grad_f, grad_r, grad_a.reshape(())


@residual_backward.register_fake
def _(grad, f, res, alpha, c, proj_eps, t_max, f_first):
    check_same_device("residual_backward", "f", dict(f=f, res=res, grad=grad))
    return torch.empty_like(f), torch.empty_like(res), f.new_empty(())
