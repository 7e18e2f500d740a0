"""Poincaré 2D convolution by β-concatenation, computed in fused form (no unfold)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

from .curvature import Curvature
from .init import beta_concat_scale
from .linear import _PoincareFCBase


class PoincareConv2d(_PoincareFCBase):
    """Poincaré convolution on a tangent map at the origin ``U [B, C_in, H, W]`` (channel axis).

    Reference construction: scale ``U`` by the β-concatenation ratio ``s``, take each k×k patch
    vector ``p`` (zero padding = the origin), ``x = expmap0(p)``, apply the HNN++ FC layer with
    ``weight [C_out, C_in, k, k]``, return ``logmap0``. Here it is computed in fused form::

        ‖p‖²     = s² · boxsum_k(‖U‖²_channels)        (one k×k sum of a 1-channel map)
        ⟨p, ẑ_o⟩ = s · conv2d(U, ẑ_o)                  (one ordinary convolution)

    followed by the element-wise tangent FC map (:func:`poincare_resnet.ball.fc_tangent`). It is
    mathematically identical to the unfold construction. Output shape equals ``nn.Conv2d``'s.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        bias: bool = True,
        c: float | Curvature = 0.1,
        init: str = "identity",
        legacy_lambda: bool = False,
        center_weight: bool = False,
    ) -> None:
        super().__init__()
        self.center_weight = bool(center_weight)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size)
        self.stride = _pair(stride)
        self.padding = _pair(padding)
        kh, kw = self.kernel_size
        self.scale = beta_concat_scale(in_channels, kh * kw)
        self._setup((out_channels, in_channels, kh, kw), bias, c, init, legacy_lambda)

    def forward(self, u: Tensor) -> Tensor:
        if u.dim() != 4 or u.shape[1] != self.in_channels:
            raise ValueError(
                f"PoincareConv2d expected input [B, {self.in_channels}, H, W], "
                f"got shape {tuple(u.shape)}"
            )
        zhat, znorm = self._unit_weight()
        s = self.scale
        dots = F.conv2d(u, zhat * s, None, self.stride, self.padding)  # s folded into the kernel
        kh, kw = self.kernel_size
        sq = u.pow(2).sum(1, keepdim=True)
        ph, pw = self.padding
        if ph or pw:  # zero padding = the origin; avg_pool2d's own padding is capped at k/2
            sq = F.pad(sq, (pw, pw, ph, ph))
        sq = F.avg_pool2d(sq, self.kernel_size, self.stride) * (kh * kw)
        return self._fc(dots, sq * (s * s), znorm, dim=1)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}, "
            f"init={self.init!r}" + (", center_weight=True" if self.center_weight else "")
        )
