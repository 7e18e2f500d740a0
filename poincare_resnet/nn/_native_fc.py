"""The tangent FC map on CPU with the native kernel (``_cpp/fc.cpp``).

The same map as :func:`poincare_resnet.ball.fc_tangent` (the PyTorch Function
``FullyConnectedTangent``): ``dots [B, K, …]`` is read as ``[B, K, P]`` and every full-size and
per-pixel term, forward and backward, is one native pass; the backward recomputes the chain
from the saved inputs. The per-feature terms ``cosh(2√c r_k)``, ``sinh(2√c r_k)``, ``2‖z_k‖``
are [K]-sized PyTorch.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..ball._autograd import FC_ARG_LIMIT, _small
from ..ball.config import MIN_NORM, manual_backward_enabled, max_tangent_radius


def fc_limits(c: float, dtype: torch.dtype) -> tuple[float, float, float, float, float, float]:
    """The FC map's constants for a kernel: ``(√c, t_max, g_max, 2 t_max, small, min_norm)``.

    ``t_max = artanh(1 − ε)`` caps ``√c‖p‖`` and (doubled) the output's ``asinh(‖ψ‖)``,
    ``g_max = FC_ARG_LIMIT`` clamps ``2‖z_k‖ asinh(q_k)`` before ``sinh``, ``small`` is where
    the Taylor series take over; the native and the Triton kernels take the same six.
    """
    limit = max_tangent_radius(dtype)
    return (c**0.5, limit, FC_ARG_LIMIT, 2 * limit, _small(dtype), MIN_NORM)


def native_fc_tangent_applicable(dots: Tensor, c, dim: int) -> bool:
    """Whether :func:`native_fc_tangent` takes this call: hand-written backward passes on, a CPU
    float32/float64 map of at least 3 dims with its features along dim 1, a fixed (Python
    number) curvature, and the kernel available (built on first use). Under ``torch.compile`` the
    kernel enters the graph as a custom op and the availability check runs once, at trace time.

    Parameters
    ----------
    dots : Tensor
        ``⟨p, ẑ_k⟩``, features along ``dim``.
    c : float or Tensor
        The curvature; a tensor (learnable or not) takes the PyTorch path.
    dim : int
        The feature axis.

    Returns
    -------
    bool
    """
    if (
        isinstance(c, Tensor)
        or not manual_backward_enabled()
        or dots.device.type != "cpu"
        or dots.dim() < 3
        or dim % dots.dim() != 1
        or dots.dtype not in (torch.float32, torch.float64)
    ):
        return False
    from .. import _cpp

    return _cpp.native_enabled() and _cpp.native_available("fc")


def _kernel_args(dots: Tensor, sq: Tensor, znorm: Tensor, bias: Tensor, c: float):
    """``[B, K, P]`` / ``[B, P]`` views and the per-feature terms ``(cosh(2√c r), sinh(2√c r),
    2‖z‖)`` the kernel reads, and its constants."""
    two_sr = 2 * c**0.5 * bias
    b, k = dots.shape[0], dots.shape[1]
    flat = (
        dots.reshape(b, k, -1).contiguous(),
        sq.reshape(b, -1).contiguous(),
        torch.cosh(two_sr),
        torch.sinh(two_sr),
        2 * znorm,
    )
    return flat, fc_limits(c, dots.dtype)


class _NativeFC(torch.autograd.Function):
    """``(dots, sq, ‖z‖, r) → logmap0(FC(expmap0(p)))`` by ``fc_forward`` / ``fc_backward``."""

    @staticmethod
    def forward(ctx, dots, sq, znorm, bias, c):  # type: ignore[override]
        from .._cpp import fc_ops

        flat, limits = _kernel_args(dots, sq, znorm, bias, c)
        ctx.save_for_backward(dots, sq, znorm, bias)
        ctx.c = c
        return fc_ops.fc_forward(*flat, *limits).view(dots.shape)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        from .._cpp import fc_ops

        dots, sq, znorm, bias = ctx.saved_tensors
        needs = ctx.needs_input_grad
        flat, limits = _kernel_args(dots, sq, znorm, bias, ctx.c)
        b, k = dots.shape[0], dots.shape[1]
        grad_dots, grad_sq, chan = fc_ops.fc_backward(
            grad.reshape(b, k, -1), *flat, *limits, bool(needs[0])
        )
        grad_dots = grad_dots.view(dots.shape) if needs[0] else None
        grad_sq = grad_sq.view(sq.shape) if needs[1] else None
        grad_znorm = 2 * chan[0] if needs[2] else None
        grad_bias = None
        if needs[3]:  # through cosh(2√c r) and sinh(2√c r)
            _, _, ch_k, sh_k, _ = flat
            grad_bias = (chan[1] * sh_k + chan[2] * ch_k) * (2 * ctx.c**0.5)
        return grad_dots, grad_sq, grad_znorm, grad_bias, None


def native_fc_tangent(
    dots: Tensor, sq: Tensor, znorm: Tensor, bias: Tensor, c: float, dim: int = 1
) -> Tensor:
    """The tangent FC map by the native kernel; check :func:`native_fc_tangent_applicable` and
    the arguments (:func:`poincare_resnet.ball.fc_tangent` does) first.

    With ``t = min(√c‖p‖, artanh(1 − ε))``::

        q_k = sinh(2t)/‖p‖ · ⟨p, ẑ_k⟩ cosh(2√c r_k) − cosh(2t) sinh(2√c r_k)
        ψ_k = sinh(2‖z_k‖ asinh(q_k)),   out = asinh(‖ψ‖)/(2√c‖ψ‖) · ψ

    Parameters
    ----------
    dots : Tensor
        ``⟨p, ẑ_k⟩``, float32 or float64 on the CPU.
    sq : Tensor
        ``‖p‖²``, ``dots``' shape with size 1 along dim 1, same dtype.
    znorm, bias : Tensor
        ``‖z_k‖`` and ``r_k``, one per output feature, same dtype.
    c : float
        The curvature.
    dim : int
        The feature axis; must be 1.

    Returns
    -------
    Tensor
        ``logmap0(FC(expmap0(p)))``, ``dots``' shape.

    Shapes
    ------
    ``dots [B, K, *S]``, ``sq [B, 1, *S]``, ``znorm, bias [K]`` → ``[B, K, *S]``.
    """
    if dim % dots.dim() != 1:
        raise ValueError(f"native_fc_tangent: the features must lie along dim 1, got dim={dim}")
    return _NativeFC.apply(dots, sq, znorm, bias, float(c))
