"""Activation in the tangent space at the origin."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TangentReLU(nn.Module):
    """ReLU in the tangent space at the origin: ``expmap0(relu(logmap0(x)))``.

    With the tangent-map contract of :mod:`poincare_resnet.nn` this is a plain ``relu``.
    """

    def __init__(self, inplace: bool = False) -> None:
        super().__init__()
        self.inplace = inplace

    def forward(self, u: Tensor) -> Tensor:
        return torch.relu_(u) if self.inplace else torch.relu(u)
