"""The Poincaré residual connection (Möbius addition along the channel axis)."""

from __future__ import annotations

from torch import Tensor, nn

from .. import ball
from ..ball import get_eps, max_tangent_radius
from .curvature import Curvature, as_curvature
from .residual_map import residual

ORDERS = ("f+res", "res+f")


class PoincareResidual(nn.Module):
    """``logmap0(expmap0(α·f) ⊕ expmap0(res))`` on tangent maps, Möbius addition over ``dim``.

    ``order="f+res"`` is the paper's ``f ⊕ res``; ``"res+f"`` computes ``res ⊕ f`` (Möbius
    addition is not commutative). ``α·f`` in the tangent space is the Möbius scalar
    multiplication ``α ⊗ expmap0(f)`` on the ball; ``alpha=None`` means 1. The official code adds
    along the image width by mistake; this adds along the channel axis (``dim=1``).
    """

    def __init__(self, c: float | Curvature = 0.1, order: str = "f+res", dim: int = 1) -> None:
        super().__init__()
        if order not in ORDERS:
            raise ValueError(f"unknown residual order {order!r}; choose one of {ORDERS}")
        self.curvature = as_curvature(c)
        self.order = order
        self.dim = dim

    def forward(self, f: Tensor, res: Tensor, alpha: Tensor | float | None = None) -> Tensor:
        if self.dim != 1 or not ball.manual_backward_enabled():
            return self._forward_reference(f, res, alpha)
        if f.shape != res.shape:
            raise ValueError(
                f"residual branch shape {tuple(f.shape)} != shortcut shape {tuple(res.shape)}"
            )
        c = self.curvature()
        return residual(
            f, res, alpha, c, get_eps(f.dtype), max_tangent_radius(f.dtype), self.order == "f+res"
        )

    def _forward_reference(self, f: Tensor, res: Tensor, alpha=None) -> Tensor:
        """The same map as a chain of :mod:`poincare_resnet.ball` operations (for tests)."""
        c = self.curvature()
        if alpha is not None:
            f = f * alpha
        xf = ball.expmap0(f, c=c, dim=self.dim)
        xr = ball.expmap0(res, c=c, dim=self.dim)
        a, b = (xf, xr) if self.order == "f+res" else (xr, xf)
        return ball.logmap0(ball.mobius_add(a, b, c=c, dim=self.dim), c=c, dim=self.dim)
