"""The Poincaré midpoint batch norm on CPU with native kernels (``_cpp/batchnorm.cpp``).

The same map as :func:`._kernels.batchnorm_forward`, split at its two global reductions:

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
from ._kernels import _radial, batchnorm_forward


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


def _centre(beta_t: Tensor, c: float, t_max: float) -> Tensor:
    """``β = expmap0(bias)`` as in the closed form."""
    b_alpha, _ = _radial(beta_t.pow(2).sum(), c**0.5, t_max)
    return beta_t * b_alpha


def _rescale(var: Tensor, weight: Tensor, bn_eps: float) -> Tensor:
    """``r = |weight| / √(σ² + eps)`` as a [1] tensor."""
    return (weight.abs() / torch.sqrt(var + bn_eps)).reshape(-1)[:1]


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


def _check_per_channel(v: Tensor, mu, beta_t: Tensor, weight: Tensor, var) -> None:
    """``ValueError`` naming the argument for a wrongly sized per-channel tensor (shapes only:
    no host sync). ``bias`` and the running mean hold one value per channel, ``weight`` and the
    running variance one value."""
    channels = v.shape[1]
    named = [("bias", beta_t, channels), ("weight", weight, 1)]
    if mu is not None:
        named.append(("running mean", mu, channels))
    if var is not None:
        named.append(("running variance", var, 1))
    for name, t, n in named:
        if t.numel() != n:
            what = "one per channel" if n == channels and name != "weight" else "a scalar"
            raise ValueError(
                f"batch norm: {name} has {t.numel()} elements (shape {tuple(t.shape)}), expected "
                f"{n} ({what} of the input of shape {tuple(v.shape)})"
            )


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
    """:func:`._kernels.batchnorm_forward` with native kernels: ``(out, μ, σ², N)``.

    ``mu``/``var`` ``None``: batch statistics (gradients flow through them into ``v``; the
    returned μ and σ² are detached); otherwise the given running statistics. ``c`` must be a
    Python float.
    """
    c = float(c)
    _check_per_channel(v, mu, beta_t, weight, var)
    if (mu is None) != (var is None):  # one batch statistic and one given: not a layer's case
        return batchnorm_forward(v, mu, beta_t, weight, var, c, bn_eps, proj_eps, t_max)
    shape = v.shape
    # [B, C, H·W]: under torch.compile a saved 4-D map downstream of a convolution would be
    # copied to channels-last (inductor's layout optimisation) and back for the kernel
    v = v.reshape(shape[0], shape[1], -1).contiguous()
    dtype = v.dtype
    if mu is None and var is None:
        out, mu, var = _TrainBatchNorm.apply(v, beta_t, weight, c, bn_eps, proj_eps, t_max)
        count = torch.full((), float(v.numel() // v.shape[1]), dtype=dtype)
        return out.view(shape), mu, var, count
    mu = mu.reshape(-1).to(dtype).contiguous()
    beta = _centre(beta_t.to(dtype), c, t_max).contiguous()
    r = _rescale(var.to(dtype), weight.to(dtype), bn_eps)
    out = _BatchNormMap.apply(v, mu, beta, r, c, t_max, proj_eps)
    return out.view(shape), mu, var, None
