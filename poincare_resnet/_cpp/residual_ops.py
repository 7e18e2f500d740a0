"""The native residual kernels as ``torch.library`` custom ops (see :mod:`.fc_ops`).

``alpha`` travels as a one-element CPU tensor and is read inside the op (:func:`.scalar_arg`),
so a learnable residual scale needs no host read in the traced program.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import check_same_device, native_op, require_kernel, scalar_arg

_SCALARS = "float c, float proj_eps, float t_max, bool f_first"


@native_op("residual_forward", f"(Tensor f, Tensor res, Tensor alpha, {_SCALARS}) -> Tensor")
def residual_forward(f: Tensor, res: Tensor, alpha: Tensor, *scalars: float | bool) -> Tensor:
    """``logmap0(expmap0(α f) ⊕ expmap0(res))`` (or ``res ⊕ f``) on ``[B, C, P]`` maps;
    ``scalars`` are ``c, proj_eps, t_max, f_first``."""
    return require_kernel("residual").residual_forward(f, res, scalar_arg(alpha, "alpha"), *scalars)


@residual_forward.register_fake
def _(f, res, alpha, *scalars):
    check_same_device("residual_forward", "f", dict(f=f, res=res))
    return torch.empty_like(f)


@native_op(
    "residual_backward",
    f"(Tensor grad, Tensor f, Tensor res, Tensor alpha, {_SCALARS}) -> (Tensor, Tensor, Tensor)",
)
def residual_backward(
    grad: Tensor, f: Tensor, res: Tensor, alpha: Tensor, *scalars: float | bool
) -> tuple[Tensor, Tensor, Tensor]:
    """Returns ``(∂L/∂f, ∂L/∂res, ∂L/∂α)``."""
    grad_f, grad_r, grad_a = require_kernel("residual").residual_backward(
        grad, f, res, scalar_arg(alpha, "alpha"), *scalars
    )
    return grad_f, grad_r, grad_a.reshape(())


@residual_backward.register_fake
def _(grad, f, res, alpha, *scalars):
    check_same_device("residual_backward", "f", dict(f=f, res=res, grad=grad))
    return torch.empty_like(f), torch.empty_like(res), f.new_empty(())
