"""Shapes, strides and input checks shared by the Triton kernels (no Triton import here).

Every map is read as ``[B, C, P]`` (batch, channels, pixels) through three strides, so a 4-D
``[B, C, H, W]`` tensor whose pixel axes flatten to one stride (contiguous NCHW or channels-last)
and a 2-D ``[N, C]`` matrix (read as ``B = 1``, ``P = N``) need no copy.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
from torch import Tensor

FLOATS = (torch.float32, torch.float64)


class Layout(NamedTuple):
    """``[B, C, P]`` sizes and the element strides ``(sb, sc, sp)`` of one map."""

    b: int
    c: int
    p: int
    sb: int
    sc: int
    sp: int

    @property
    def strides(self) -> tuple[int, int, int]:
        """``(sb, sc, sp)``, in the order the kernels take them."""
        return self.sb, self.sc, self.sp


def interpret() -> bool:
    """Whether the Triton interpreter is selected (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def device_ok(t: Tensor) -> bool:
    """CUDA tensors, or CPU tensors under the interpreter."""
    return t.device.type == "cuda" or (t.device.type == "cpu" and interpret())


def layout_or_none(t: Tensor) -> Layout | None:
    """The ``[B, C, P]`` strides of a 4-D or 2-D map, or ``None`` if its pixels do not flatten."""
    if t.dim() == 4:
        b, c, h, w = t.shape
        sb, sc, sh, sw = t.stride()
        if h > 1 and w > 1 and sh != w * sw:
            return None
        sp = sw if w > 1 else (sh if h > 1 else 1)
        return Layout(b, c, h * w, sb, sc, sp)
    if t.dim() == 2:
        n, c = t.shape
        return Layout(1, c, n, 0, t.stride(1), t.stride(0))
    return None


def layout(t: Tensor, name: str) -> Layout:
    """:func:`layout_or_none`, raising a ``ValueError`` that names the argument."""
    lay = layout_or_none(t)
    if lay is None:
        raise ValueError(
            f"{name} must be a [B, C, H, W] map whose H, W axes flatten to one stride "
            f"(contiguous or channels-last) or an [N, C] matrix; got shape {tuple(t.shape)} "
            f"with strides {t.stride()}"
        )
    return lay


def check_map(t: Tensor, name: str, dims: tuple[int, ...] = (2, 4)) -> Layout:
    """Check dtype, device and layout of a map argument."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.dtype not in FLOATS:
        raise ValueError(f"{name} must be float32 or float64, got {t.dtype}")
    if t.dim() not in dims:
        raise ValueError(f"{name} must have {' or '.join(map(str, dims))} dims, got {t.dim()}")
    if not device_ok(t):
        raise ValueError(
            f"{name} must be a CUDA tensor (or a CPU tensor with TRITON_INTERPRET=1), "
            f"got device {t.device}"
        )
    return layout(t, name)


def check_same(t: Tensor, ref: Tensor, name: str, ref_name: str) -> None:
    """``t`` has the shape, dtype and device of ``ref``."""
    if t.shape != ref.shape or t.dtype != ref.dtype or t.device != ref.device:
        raise ValueError(
            f"{name} must match {ref_name} in shape, dtype and device: got "
            f"{tuple(t.shape)} {t.dtype} {t.device} vs {tuple(ref.shape)} {ref.dtype} {ref.device}"
        )


def check_channel(t: Tensor, name: str, c: int, ref: Tensor) -> Tensor:
    """A per-channel tensor with ``c`` elements, on ``ref``'s device: returned flat, contiguous,
    in ``ref``'s dtype (differentiably)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    if t.numel() != c:
        raise ValueError(f"{name} must have {c} elements (one per channel), got {tuple(t.shape)}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on {ref.device}, got {t.device}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {t.dtype}")
    return t.reshape(-1).to(ref.dtype).contiguous()


def check_curvature(c) -> float:
    """A fixed positive Python-float curvature."""
    if isinstance(c, Tensor) or isinstance(c, bool) or not isinstance(c, (float, int)):
        raise TypeError(f"c must be a Python float for the Triton kernels, got {type(c).__name__}")
    c = float(c)
    if not c > 0:
        raise ValueError(f"c must be positive, got {c}")
    return c


def applicable(*tensors: Tensor) -> bool:
    """Whether all ``tensors`` can be read by the kernels: float32/float64, on CUDA (or CPU
    under ``TRITON_INTERPRET=1``), one dtype and device, 4-D or 2-D with flattenable pixels."""
    if not tensors:
        return False
    first = tensors[0]
    for t in tensors:
        if (
            not isinstance(t, Tensor)
            or t.dtype not in FLOATS
            or t.dtype != first.dtype
            or t.device != first.device
            or not device_ok(t)
            or layout_or_none(t) is None
            or t.numel() == 0
        ):
            return False
    return True


def pixel_blocks(lay: Layout, block_p: int) -> int:
    """Number of pixel blocks per batch element."""
    return (lay.p + block_p - 1) // block_p
