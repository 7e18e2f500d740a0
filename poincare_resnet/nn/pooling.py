"""Global average pooling of a tangent map."""

from __future__ import annotations

from torch import Tensor, nn

from .. import ball
from .curvature import Curvature, as_curvature

POOL_MODES = ("tangent", "midpoint")


class PoincareGlobalAvgPool2d(nn.Module):
    """Pool ``U [B, C, H, W]`` to ``[B, C]`` (tangent vectors at the origin).

    ``mode="tangent"`` (the paper's): the mean of the tangent vectors. ``mode="midpoint"``: the
    gyromidpoint of the ball points ``expmap0(U)`` over the spatial positions, mapped back with
    ``logmap0``.
    """

    def __init__(self, mode: str = "tangent", c: float | Curvature = 0.1) -> None:
        super().__init__()
        if mode not in POOL_MODES:
            raise ValueError(f"unknown pooling mode {mode!r}; choose one of {POOL_MODES}")
        self.mode = mode
        self.curvature = as_curvature(c)

    def forward(self, u: Tensor) -> Tensor:
        if self.mode == "tangent":
            return u.mean((2, 3))
        c = self.curvature()
        x = ball.expmap0(u, c=c, dim=1)
        mid = ball.gyromidpoint(x, c=c, dim=1, reduce_dim=(2, 3))
        return ball.logmap0(mid, c=c, dim=1)
