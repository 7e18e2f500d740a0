"""Poincaré midpoint batch normalisation with ``torch.nn.BatchNorm2d`` semantics."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ball
from ..ball import MIN_NORM, get_eps, max_tangent_radius
from ..ball.frechet import frechet_mean
from .batchnorm_map import batchnorm
from .curvature import Curvature, as_curvature

MEANS = ("midpoint", "frechet")


class PoincareBatchNorm2d(nn.Module):
    """Batch norm on the ball for a tangent map ``U [B, C, H, W]`` (manifold axis = channels).

    With ``x_i = expmap0(U_i)`` over the ``N = B·H·W`` positions (SPEC §6)::

        μ  = gyromidpoint(x)                        (mean="midpoint"; or the Fréchet mean)
        σ² = (1/N) Σ d(x_i, μ)²                     (one scalar over all channels, as the paper)
        out_i = expmap_β( PT_{μ→β}(logmap_μ(x_i)) · |weight| / √(σ² + eps) ),  β = expmap0(bias)

    computed as ``β ⊕ gyr[β, −μ](r ⊗ ((−μ) ⊕ x_i))`` with ``r = |weight|/√(σ² + eps)``; returns
    ``logmap0(out)``. ``weight [1]`` is the target Fréchet standard deviation (√g, init 1),
    ``bias [C]`` the tangent of the centre β (init 0).

    Running statistics as ``nn.BatchNorm2d``: in train mode ``running_mean`` (``logmap0(μ)``) and
    ``running_var`` (σ², unbiased) are updated with ``momentum`` (``None``: cumulative average)
    and used in eval mode. ``track_running_stats=False`` or ``eval_batch_stats=True`` (the
    paper's code) normalise with batch statistics in eval mode too.

    ``mean="frechet"`` runs ``frechet_iters`` Karcher steps (:func:`~poincare_resnet.ball.frechet.
    frechet_mean`), stopping early once a step is shorter than ``frechet_tol`` (a host read per
    step); ``frechet_tol=0`` runs exactly ``frechet_iters`` steps with no host read.
    """

    def __init__(
        self,
        num_features: int,
        c: float | Curvature = 0.1,
        momentum: float | None = 0.1,
        eps: float = 1e-5,
        track_running_stats: bool = True,
        mean: str = "midpoint",
        eval_batch_stats: bool = False,
        frechet_iters: int = 50,
        frechet_tol: float = 1e-7,
    ) -> None:
        super().__init__()
        if mean not in MEANS:
            raise ValueError(f"unknown mean {mean!r}; choose one of {MEANS}")
        self.num_features = num_features
        self.curvature = as_curvature(c)
        self.momentum = momentum
        self.eps = eps
        self.track_running_stats = track_running_stats
        self.mean = mean
        self.eval_batch_stats = eval_batch_stats
        self.frechet_iters = frechet_iters
        self.frechet_tol = frechet_tol
        self.weight = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(num_features))
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(1))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    # --- statistics (overridden by the synchronised version) --------------------------------
    synchronized = False

    def _all_reduce(self, t: Tensor) -> Tensor:
        return t

    def _batch_mean(self, x: Tensor, c) -> Tensor:
        """Midpoint m' = Σγ²x / (Σγ² − N/2), μ = m'/(1 + √(1 − c‖m'‖²)), shape [1, C, 1, 1]."""
        if self.mean == "frechet":
            points = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])
            mu = frechet_mean(points, c=c, iters=self.frechet_iters, tol=self.frechet_tol)
            return mu.view(1, -1, 1, 1)
        gamma2 = 1 / (1 - c * x.pow(2).sum(1, keepdim=True)).clamp_min(MIN_NORM)
        n = torch.tensor(float(x.numel() // x.shape[1]), dtype=x.dtype, device=x.device)
        sums = torch.cat([(gamma2 * x).sum((0, 2, 3)), gamma2.sum().view(1), n.view(1)])
        sums = self._all_reduce(sums)
        m = (sums[:-2] / (sums[-2] - sums[-1] / 2).clamp_min(MIN_NORM)).view(1, -1, 1, 1)
        mu = m / (1 + torch.sqrt((1 - c * m.pow(2).sum(1, keepdim=True)).clamp_min(MIN_NORM)))
        return ball.project(mu, c=c, dim=1)

    def _batch_var(self, d2: Tensor) -> tuple[Tensor, Tensor]:
        n = torch.tensor(float(d2.numel()), dtype=d2.dtype, device=d2.device)
        sums = self._all_reduce(torch.stack([d2.sum(), n]))
        return sums[0] / sums[1], sums[1]

    # --- forward ------------------------------------------------------------------------------
    def _check(self, u: Tensor) -> None:
        if u.dim() != 4 or u.shape[1] != self.num_features:
            raise ValueError(
                f"PoincareBatchNorm2d expected input [B, {self.num_features}, H, W], "
                f"got shape {tuple(u.shape)}"
            )

    def _use_batch_stats(self) -> bool:
        return self.training or not self.track_running_stats or self.eval_batch_stats

    def forward(self, u: Tensor) -> Tensor:
        self._check(u)
        if self.mean == "frechet" or not ball.manual_backward_enabled():
            return self._forward_reference(u)
        c = self.curvature()
        use_batch = self._use_batch_stats()
        mu = var = None
        if not use_batch:
            mu = ball.expmap0(self.running_mean.to(u.dtype), c=c)
            var = self.running_var.to(u.dtype)
        reduce = self._all_reduce if (use_batch and self.synchronized) else None
        out, mu, var, count = batchnorm(
            u,
            mu,
            self.bias,
            self.weight,
            var,
            c,
            self.eps,
            get_eps(u.dtype),
            max_tangent_radius(u.dtype),
            reduce,
        )
        if self.training and self.track_running_stats:
            self._update_running_stats(mu.view(1, -1, 1, 1), var, count, c)
        return out

    def _forward_reference(self, u: Tensor) -> Tensor:
        """The same map as a chain of :mod:`poincare_resnet.ball` operations (slow, for tests
        and for the Fréchet mean)."""
        self._check(u)
        c = self.curvature()
        sc = c**0.5
        x = ball.expmap0(u, c=c, dim=1)
        use_batch = self._use_batch_stats()
        if use_batch:
            mu = self._batch_mean(x, c)
        else:
            mu = ball.expmap0(self.running_mean.view(1, -1, 1, 1).to(u.dtype), c=c, dim=1)
        m = ball.mobius_add(-mu, x, c=c, dim=1)
        mn = m.norm(dim=1, keepdim=True).clamp_min(MIN_NORM)
        a = torch.atanh((sc * mn).clamp_max(1 - get_eps(u.dtype)))  # d(x_i, μ) = 2a/√c
        if use_batch:
            var, count = self._batch_var((2 / sc * a).pow(2))
            if self.training and self.track_running_stats:
                self._update_running_stats(mu, var, count, c)
        else:
            var = self.running_var.to(u.dtype)
        r = self.weight.abs() / torch.sqrt(var + self.eps)
        w = torch.tanh(r * a) / (sc * mn) * m  # r ⊗ m
        beta = ball.expmap0(self.bias.view(1, -1, 1, 1), c=c, dim=1)
        w = ball.gyration(beta, -mu, w, c=c, dim=1)
        return ball.logmap0(ball.mobius_add(beta, w, c=c, dim=1), c=c, dim=1)

    @torch.no_grad()
    def _update_running_stats(self, mu: Tensor, var: Tensor, count: Tensor, c) -> None:
        self.num_batches_tracked.add_(1)
        if self.momentum is None:
            factor = 1.0 / self.num_batches_tracked.to(var.dtype)
        else:
            factor = self.momentum
        mean_t = ball.logmap0(mu.detach(), c=c, dim=1).view(-1)
        unbiased = var.detach() * count / (count - 1).clamp_min(1)
        self.running_mean.lerp_(mean_t.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.view(1).to(self.running_var.dtype), factor)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, momentum={self.momentum}, eps={self.eps}, "
            f"track_running_stats={self.track_running_stats}, mean={self.mean!r}"
        )
