"""Iterative Fréchet (Karcher) mean with an implicit-function backward (Lou et al., 2020).

Kept for the batch-norm ablation: the paper replaces it by the gyromidpoint, which is one pass.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .functional import Curvature, check_curvature, dist, expmap, gyromidpoint, logmap


def _residual(mu: Tensor, x: Tensor, c: Curvature) -> Tensor:
    """``F(μ) = mean_i logmap_μ(x_i)``; zero at the Fréchet mean."""
    return logmap(mu.expand_as(x), x, c=c, dim=-1).mean(0)


def _step_size(mu: Tensor, x: Tensor, c: Curvature) -> Tensor:
    """``1 / mean_i(√c dᵢ coth(√c dᵢ))``, ``dᵢ = d(μ, xᵢ)``: the inverse of a bound on the Hessian
    of ``(1/2N) Σ d(μ, xᵢ)²`` at μ. The unit step overshoots where the points are spread
    (``√c dᵢ ≳ 1``) and the flow then stalls away from the mean."""
    sd = c**0.5 * dist(mu.expand_as(x), x, c=c, dim=-1)
    h = torch.where(sd < 1e-3, 1 + sd * sd / 3, sd / torch.tanh(sd.clamp_min(1e-3)))
    return 1 / h.mean()


def karcher_step(mu: Tensor, x: Tensor, c: Curvature) -> Tensor:
    """The Karcher-flow step at ``μ``: ``η · mean_i logmap_μ(x_i)`` (``η`` of :func:`_step_size`);
    ``μ ← expmap_μ(step)``. Its norm says how far ``μ`` is from the Fréchet mean."""
    return _residual(mu, x, c) * _step_size(mu, x, c)


class _FrechetMean(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor, c: Curvature, iters: int, tol: float) -> Tensor:  # type: ignore[override]
        mu = gyromidpoint(x, c=c, dim=-1, reduce_dim=0)
        for _ in range(iters):
            step = karcher_step(mu, x, c)
            mu = expmap(mu, step, c=c, dim=-1)
            if tol > 0 and float(step.norm()) < tol:  # host read: this is the slow ablation path
                break
        return mu

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:  # type: ignore[override]
        x, c, _, _ = inputs
        ctx.c_is_tensor = isinstance(c, Tensor)
        ctx.c = None if ctx.c_is_tensor else c
        ctx.save_for_backward(x, output, *([c] if ctx.c_is_tensor else []))

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, mu, *rest = ctx.saved_tensors
        c = rest[0] if ctx.c_is_tensor else ctx.c
        with torch.enable_grad():
            mu_ = mu.detach().requires_grad_(True)
            x_ = x.detach().requires_grad_(True)
            c_ = c.detach().requires_grad_(True) if ctx.c_is_tensor else c
            jac = torch.autograd.functional.jacobian(lambda m: _residual(m, x_.detach(), c), mu_)
            # dμ/dθ = −J⁻¹ ∂F/∂θ  ⇒  ∂L/∂θ = −(∂F/∂θ)ᵀ J⁻ᵀ g
            lam = torch.linalg.solve(jac.transpose(0, 1), grad)
            res = _residual(mu_.detach(), x_, c_)
            inputs = [x_] + ([c_] if ctx.c_is_tensor and ctx.needs_input_grad[1] else [])
            grads = torch.autograd.grad(res, inputs, grad_outputs=-lam, allow_unused=True)
        grad_c = grads[1] if len(grads) > 1 else None
        return grads[0], grad_c, None, None


def frechet_mean(x: Tensor, *, c: Curvature, iters: int = 50, tol: float = 1e-7) -> Tensor:
    """Fréchet mean ``argmin_μ Σ d(μ, x_i)²`` of points ``x [N, D]`` (Karcher flow from the
    gyromidpoint, ``μ ← expmap_μ(η · mean_i logmap_μ(x_i))`` with the step ``η ≤ 1`` of
    :func:`_step_size`). The backward pass differentiates the
    optimality condition ``Σ logmap_μ(x_i) = 0`` implicitly, so its memory does not grow with
    ``iters``. It stops early once a step is shorter than ``tol`` (one host read per step);
    ``tol=0`` runs exactly ``iters`` steps with no host read.
    """
    c = check_curvature(c, x)
    if x.dim() != 2:
        raise ValueError(f"frechet_mean expects points of shape [N, D], got {tuple(x.shape)}")
    return _FrechetMean.apply(x, c, iters, tol)
