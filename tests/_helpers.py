"""Test helpers shared by several test modules (imported as ``_helpers``: pytest puts
``tests/`` on ``sys.path``)."""

from __future__ import annotations

import math

import torch

from poincare_resnet import ball
from poincare_resnet.ball import get_eps, max_tangent_radius

F64 = torch.float64


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def bn_inputs(shape, c, scale, dtype, seed, train, equal=False):
    """``(v, bias, weight, μ, σ², grad)`` of a batch-norm case: ``v`` of scale ``scale/√c``,
    running statistics only in eval mode (``train`` false); ``equal``: every position the same
    point, ``x = μ``."""
    g = gen(seed)
    v = torch.randn(shape, generator=g, dtype=F64) * (scale / math.sqrt(c))
    if equal:
        v = v[:1, :, :1, :1].expand(shape).contiguous()
    bias = torch.randn(shape[1], generator=g, dtype=F64) * 0.4
    weight = torch.tensor([1.3], dtype=F64)
    mu = var = None
    if not train:
        mu = ball.expmap0(torch.randn(shape[1], generator=g, dtype=F64) * 0.6, c=c).to(dtype)
        var = torch.tensor([0.7], dtype=dtype)
    grad = torch.randn(shape, generator=g, dtype=F64).to(dtype)
    return v.to(dtype), bias.to(dtype), weight.to(dtype), mu, var, grad


def bn_run(fn, v, bias, weight, mu, var, grad, c, like=None, grad_mu=False):
    """``fn``'s ``(out, μ, σ², ∂v, ∂bias, ∂weight[, ∂μ])`` and its count ``N`` (``None`` with
    running statistics); ``like``: the dtype whose eps and clip radius to use; ``grad_mu``: also
    the gradient of a given μ."""
    v, bias, weight = (t.clone().requires_grad_(True) for t in (v, bias, weight))
    if grad_mu and mu is not None:
        mu = mu.clone().requires_grad_(True)
    like = v.dtype if like is None else like
    out, m, s2, n = fn(v, mu, bias, weight, var, c, 1e-5, get_eps(like), max_tangent_radius(like))
    (out * grad).sum().backward()
    count = None if n is None else float(n.detach())
    res = [out.detach(), m.detach(), s2.detach(), v.grad, bias.grad, weight.grad]
    return res + ([mu.grad] if grad_mu and mu is not None else []), count
