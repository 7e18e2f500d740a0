"""The Poincaré midpoint batch norm on CPU with native kernels (``_cpp/batchnorm.cpp``).

The same map as :func:`._closed_forms.batchnorm_forward`, split at its two global reductions:

1. ``v → (Σ γ² α v [C], Σ γ²)``: the gyromidpoint sums;
2. ``μ`` from the sums and ``β = expmap0(bias)``: [C]-sized maths;
3. ``(v, μ) → Σ atanh(√c‖(−μ) ⊕ x‖)²``: the batch variance, then ``r = |weight|/√(σ² + eps)``;
4. ``(v, μ, β, r) → out``: the per-pixel map.

Steps 1, 3 and 4 are native passes over the map; their backward passes (written out line by
line in the C++) recompute the per-pixel chain from the saved input. In train mode one autograd
function covers the whole map with one native call each way: the [C]-sized maths runs in C++
(in double, forward and reverse) and the three contributions to the input gradient (through
the output, σ² and μ) are accumulated into one buffer. In eval mode (running statistics) only
step 4 runs, with β and r from PyTorch. ``(−μ) ⊕ x`` is formed from ``d = x − μ`` (see the
C++), which agrees with the closed form to rounding and is more accurate in float32 when
x ≈ μ near the boundary.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..ball.config import MIN_NORM
from ._batchnorm_front import batchnorm_front


def native_batchnorm_applicable(v: Tensor, c, all_reduce) -> bool:
    """Whether :func:`native_batchnorm` handles this call (CPU float maps, fixed curvature).

    Under ``torch.compile`` the kernels enter the graph as custom ops."""
    if (
        all_reduce is not None
        or isinstance(c, Tensor)
        or not isinstance(c, (float, int))
        or v.device.type != "cpu"
        or v.dtype not in (torch.float32, torch.float64)
        or v.dim() != 4
    ):
        return False
    from .. import _cpp

    return _cpp.native_enabled() and _cpp.native_available("batchnorm")


class _TrainBatchNorm(torch.autograd.Function):
    """Batch norm with batch statistics: ``(v, bias, weight) → (out, μ, σ²)``.

    One native call each way: the [C]-sized maths between the reductions runs in C++ (in
    double), and the three contributions to the input gradient (through the output, σ² and μ)
    are accumulated into one buffer. μ and σ² are returned for the running statistics only
    (not differentiable).
    """

    @staticmethod
    def forward(ctx, v, beta_t, weight, c, bn_eps, proj_eps, t_max):  # type: ignore[override]
        from .._cpp import batchnorm_ops

        args = (c, bn_eps, proj_eps, t_max, MIN_NORM)
        out, mu, var, sums, dist = batchnorm_ops.bn_train_forward(
            v, beta_t.detach(), weight.detach(), *args
        )
        ctx.save_for_backward(v, beta_t, weight, sums, dist)
        ctx.args = args
        ctx.mark_non_differentiable(mu, var)
        return out, mu, var

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out, _grad_mu, _grad_var):  # type: ignore[override]
        from .._cpp import batchnorm_ops

        v, beta_t, weight, sums, dist = ctx.saved_tensors
        need_v, need_b, need_w = ctx.needs_input_grad[:3]
        grad_v, g_bt, g_w = batchnorm_ops.bn_train_backward(
            v, grad_out, sums, dist, beta_t, weight, *ctx.args, bool(need_v)
        )
        return (
            grad_v if need_v else None,
            g_bt.to(beta_t.dtype) if need_b else None,
            g_w.to(weight.dtype).expand(weight.shape).clone() if need_w else None,
            None,
            None,
            None,
            None,
        )


class _BatchNormMap(torch.autograd.Function):
    """``(v, μ, β, r) → logmap0(β ⊕ gyr[β, −μ](r ⊗ project((−μ) ⊕ expmap0(v))))``."""

    @staticmethod
    def forward(ctx, v, mu, beta, r, c, t_max, proj_eps):  # type: ignore[override]
        from .._cpp import batchnorm_ops

        ctx.save_for_backward(v, mu, beta, r)
        ctx.args = (c, t_max, proj_eps, MIN_NORM)
        return batchnorm_ops.bn_out(v, mu, beta, r.detach(), *ctx.args)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        from .._cpp import batchnorm_ops

        v, mu, beta, r = ctx.saved_tensors
        grad_v, grad_mu, grad_beta, grad_r = batchnorm_ops.bn_backward(
            v, mu, beta, grad, r, *ctx.args
        )
        return grad_v, grad_mu, grad_beta, grad_r.view(r.shape), None, None, None


def native_batchnorm(
    v: Tensor,
    mu: Tensor | None,
    beta_t: Tensor,
    weight: Tensor,
    var: Tensor | None,
    c: float,
    bn_eps: float,
    proj_eps: float,
    t_max: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """:func:`._closed_forms.batchnorm_forward` with native kernels: ``(out, μ, σ², N)``.

    Same map and arguments as :func:`.batchnorm_map.batchnorm` (without ``all_reduce``); check
    :func:`native_batchnorm_applicable` first.

    Parameters
    ----------
    v : Tensor
        The tangent map, float32 or float64 on the CPU.
    mu, var : Tensor or None
        The running statistics, or both ``None`` for the batch statistics (gradients flow
        through them into ``v``; the returned μ and σ² are detached).
    beta_t : Tensor
        ``bias``, ``[C]``.
    weight : Tensor
        One element.
    c : float
        The curvature (a Python number).
    bn_eps, proj_eps, t_max : float
        ``eps`` of ``√(σ² + eps)``, the projection ε and ``artanh(1 − ε)``.

    Returns
    -------
    tuple
        ``(out, μ, σ², N)``, ``N`` the number of positions (``None`` in eval mode).

    Shapes
    ------
    ``v [B, C, H, W]``, ``mu, beta_t [C]``, ``weight, var [1]`` → ``out [B, C, H, W]``.
    """
    c = float(c)
    front = batchnorm_front(v, mu, beta_t, weight, var, c, bn_eps, t_max)
    if front.train:
        out, mu, var = _TrainBatchNorm.apply(front.v, beta_t, weight, c, bn_eps, proj_eps, t_max)
        return out.view(front.shape), mu, var, front.count()
    out = _BatchNormMap.apply(front.v, front.mu, front.beta, front.r, c, t_max, proj_eps)
    return out.view(front.shape), front.mu, var, None
