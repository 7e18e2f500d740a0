"""The Poincaré residual through the native CPU kernel ``poincare_resnet/_cpp/residual.cpp``.

Same map as :func:`._closed_forms.residual_forward` (``logmap0(expmap0(α f) ⊕ expmap0(res))``, or
``res ⊕ f``, along dim 1), computed in three passes over each block of pixels; the backward is
hand-written in the kernel and recomputes the forward from the saved inputs ``f`` and ``res``
(nothing else is kept). Used for CPU float32/float64 maps with a fixed (Python float) curvature;
a learnable curvature takes the PyTorch path.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable


def native_residual_applicable(f: Tensor, res: Tensor, alpha, c) -> bool:
    """Whether :func:`native_residual` can run these inputs (else use the PyTorch path).

    Under ``torch.compile`` the kernel enters the graph as a custom op."""
    if (
        isinstance(c, Tensor)
        or isinstance(c, bool)
        or not isinstance(c, numbers.Real)
        or f.device.type != "cpu"
        or res.device.type != "cpu"
        or f.dtype not in (torch.float32, torch.float64)
        or res.dtype != f.dtype
        or f.dim() != 4
        or f.shape != res.shape
        or f.numel() == 0
    ):
        return False
    if isinstance(alpha, Tensor) and (alpha.numel() != 1 or alpha.device.type != "cpu"):
        return False
    from .. import _cpp

    return _cpp.native_enabled() and _cpp.native_available("residual")


def _flat(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], t.shape[1], -1).contiguous()


class _NativeResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f, res, alpha, c, proj_eps, t_max, f_first):  # type: ignore[override]
        from .._cpp import residual_ops

        alpha_t = alpha.detach().reshape(()) if isinstance(alpha, Tensor) else None
        if alpha_t is None:
            alpha_t = torch.tensor(1.0 if alpha is None else float(alpha), dtype=torch.float64)
        args = (float(c), float(proj_eps), float(t_max), bool(f_first))
        out = residual_ops.residual_forward(_flat(f), _flat(res), alpha_t, *args)
        ctx.args = args
        ctx.alpha_tensor = isinstance(alpha, Tensor)
        if ctx.alpha_tensor:
            ctx.alpha_meta = (alpha.shape, alpha.dtype)
        ctx.save_for_backward(f, res, alpha_t)
        return out.view(f.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        from .._cpp import residual_ops

        f, res, alpha_t = ctx.saved_tensors
        grad_f, grad_r, grad_a = residual_ops.residual_backward(
            _flat(grad), _flat(f), _flat(res), alpha_t, *ctx.args
        )
        needs = ctx.needs_input_grad
        grad_alpha = None
        if ctx.alpha_tensor and needs[2]:
            shape, dtype = ctx.alpha_meta
            grad_alpha = grad_a.to(dtype).reshape(shape)
        return (
            grad_f.view(f.shape) if needs[0] else None,
            grad_r.view(res.shape) if needs[1] else None,
            grad_alpha,
            None,
            None,
            None,
            None,
        )


def native_residual(
    f: Tensor,
    res: Tensor,
    alpha: Tensor | float | None,
    c: float,
    proj_eps: float,
    t_max: float,
    f_first: bool = True,
) -> Tensor:
    """The residual map by the native kernel; check :func:`native_residual_applicable` first.

    ``logmap0(expmap0(α f) ⊕ expmap0(res))`` (``f_first``; else ``res ⊕ α f``) along dim 1.

    Parameters
    ----------
    f, res, alpha, c, proj_eps, t_max, f_first
        As :func:`.residual_map.residual`, with float32 or float64 CPU maps, ``c`` a Python
        number and ``alpha`` (if a tensor) on the CPU.

    Returns
    -------
    Tensor
        The residual map (a tangent map at the origin).

    Shapes
    ------
    ``f``, ``res`` and the output: ``[B, C, H, W]``.
    """
    return _NativeResidual.apply(f, res, alpha, c, proj_eps, t_max, f_first)
