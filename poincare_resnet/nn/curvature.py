"""The ball's curvature as a module, fixed or learnable, shareable between layers."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..ball import check_curvature


def _softplus_inv(c: float) -> float:
    """``softplus⁻¹(c) = log(expm1(c))`` (stable for large c)."""
    return c + math.log(-math.expm1(-c))


class Curvature(nn.Module):
    """Curvature ``c > 0`` of the ball ``{x : c‖x‖² < 1}``.

    Fixed (``learnable=False``): ``forward()`` returns the Python float, so compiled graphs
    specialise on it. Learnable: the parameter ``raw`` stores ``softplus⁻¹(c)`` and ``forward()``
    returns ``softplus(raw)``, so the value asked for is the value used and it stays positive.
    """

    def __init__(self, c: float = 0.1, learnable: bool = False) -> None:
        super().__init__()
        value = check_curvature(c)
        self.learnable = bool(learnable)
        if self.learnable:
            self.raw = nn.Parameter(torch.tensor(_softplus_inv(float(value))))
        else:
            self.value = float(value)

    def forward(self) -> float | Tensor:
        if self.learnable:
            return nn.functional.softplus(self.raw)
        return self.value

    def extra_repr(self) -> str:
        if self.learnable:
            return f"c={float(nn.functional.softplus(self.raw.detach())):.4g}, learnable=True"
        return f"c={self.value:.4g}"


def as_curvature(c: float | Curvature) -> Curvature:
    """Wrap a float in a fixed :class:`Curvature`; pass a module through (to share it)."""
    return c if isinstance(c, Curvature) else Curvature(c)
