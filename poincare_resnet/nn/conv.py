"""Poincaré 2D convolution by β-concatenation, computed in fused form (no unfold)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor
from torch.nn.modules.utils import _pair

from .curvature import Curvature
from .init import beta_concat_scale
from .linear import _PoincareFCBase
from .recompute import record_fc


def box_sum(
    q: Tensor, kernel_size: tuple[int, int], stride: tuple[int, int], padding: tuple[int, int]
) -> Tensor:
    """``Σ_{i<kh, j<kw} q[…, s_h y + i − p_h, s_w x + j − p_w]`` (zero outside): a conv's window
    sums of a ``[B, 1, H, W]`` map, as ``k_w`` then ``k_h`` shifted strided slices added up.

    Equal to ``avg_pool2d(pad(q), k, s) · k_h k_w``; written with slices because ``torch.compile``
    turns them (and their backward) into vectorised element-wise kernels, where its
    ``avg_pool2d`` backward is a scalar gather loop.
    """
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    if ph or pw:  # zero padding = the origin
        q = F.pad(q, (pw, pw, ph, ph))
    h_out = (q.shape[-2] - kh) // sh + 1
    w_out = (q.shape[-1] - kw) // sw + 1
    rows = q[..., 0 : sw * (w_out - 1) + 1 : sw]
    for j in range(1, kw):
        rows = rows + q[..., j : j + sw * (w_out - 1) + 1 : sw]
    out = rows[..., 0 : sh * (h_out - 1) + 1 : sh, :]
    for i in range(1, kh):
        out = out + rows[..., i : i + sh * (h_out - 1) + 1 : sh, :]
    return out


class PoincareConv2d(_PoincareFCBase):
    """Poincaré convolution on a tangent map at the origin ``U [B, C_in, H, W]`` (channel axis).

    Reference construction: scale ``U`` by the β-concatenation ratio ``s``, take each k×k patch
    vector ``p`` (zero padding = the origin), ``x = expmap0(p)``, apply the HNN++ FC layer with
    ``weight [C_out, C_in, k, k]``, return ``logmap0``. Here it is computed in fused form::

        ‖p‖²     = s² · boxsum_k(‖U‖²_channels)        (one k×k sum of a 1-channel map)
        ⟨p, ẑ_o⟩ = s · conv2d(U, ẑ_o)                  (one ordinary convolution)

    followed by the element-wise tangent FC map (:func:`poincare_resnet.nn.fc_map.fc_tangent`).
    It is mathematically identical to the unfold construction. Output shape equals ``nn.Conv2d``'s.
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
        sq = box_sum(u.pow(2).sum(1, keepdim=True), self.kernel_size, self.stride, self.padding)
        inputs = (dots, sq * (s * s), znorm)
        out = self._fc(*inputs, dim=1)
        record_fc(self, inputs, out)  # for conv_norm's recomputation (a no-op otherwise)
        return out

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}, "
            f"init={self.init!r}" + (", center_weight=True" if self.center_weight else "")
        )
