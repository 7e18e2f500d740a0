"""Tile addressing shared by the Triton kernels, and the host-side maps they write and read.

A ``[B, C, P]`` map is read through its strides ``(sb, sc, sp)`` (see :mod:`._layout`) in
``[BLOCK_C, BLOCK_P]`` tiles: element ``(b, ch, pix)`` sits at ``b·sb + ch·sc + pix·sp``
(64-bit: a map may exceed 2³¹ elements); the mask is ``ch < C and pix < P``, and masked-out
loads read 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._layout import Layout, layout_or_none


@triton.jit
def program_block(BLOCK_P: tl.constexpr):
    """This program's batch element ``b`` (int64), its flat index ``pid`` over the
    ``(batch, pixel block)`` grid (where its partial sums go) and its pixels ``pix``."""
    b = tl.program_id(0).to(tl.int64)
    pid = b * tl.num_programs(1) + tl.program_id(1)
    pix = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
    return b, pid, pix


@triton.jit
def tile_offsets(b, ch, pix, sb, sc, sp):
    """Element offsets of the tile of channels ``ch`` and pixels ``pix`` of batch element ``b``."""
    return b * sb + ch[:, None].to(tl.int64) * sc + pix[None, :].to(tl.int64) * sp


@triton.jit
def tile(ptr, b, ch, pix, sb, sc, sp, C, P):
    """The tile of channels ``ch`` and pixels ``pix`` (0 outside the map), and its mask."""
    mask = (ch[:, None] < C) & (pix[None, :] < P)
    return tl.load(ptr + tile_offsets(b, ch, pix, sb, sc, sp), mask=mask, other=0.0), mask


@triton.jit
def tile0(ptr, b, ch, pix, sb, sc, sp, C, P):
    """:func:`tile`'s values only."""
    return tile(ptr, b, ch, pix, sb, sc, sp, C, P)[0]


@triton.jit
def store_tile(ptr, b, ch, pix, sb, sc, sp, value, mask):
    """Write ``value`` to the tile of channels ``ch`` and pixels ``pix`` where ``mask`` holds."""
    tl.store(ptr + tile_offsets(b, ch, pix, sb, sc, sp), value, mask=mask)


@triton.jit
def channel_column(ptr, ch, C):
    """The per-channel vector at ``ptr`` for channels ``ch`` (0 beyond ``C``) as a column
    ``[BLOCK_C, 1]`` that broadcasts over a tile's pixels."""
    return tl.load(ptr + ch, mask=ch < C, other=0.0)[:, None]


def dense_like(t: Tensor) -> tuple[Tensor, Layout]:
    """An uninitialised output of ``t``'s shape, dtype and device (its memory format if the
    pixels flatten, else contiguous), and its layout."""
    out = torch.empty_like(t)
    lay = layout_or_none(out)
    if lay is None:  # empty_like kept a layout whose pixels do not flatten: use a dense one
        out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
        lay = layout_or_none(out)
    return out, lay


def grad_map(grad: Tensor, like: Tensor) -> tuple[Tensor, Layout]:
    """The incoming gradient as a map the kernels can read (``like``'s shape, flattenable
    pixels; an expanded or oddly strided one is copied), and its layout."""
    lay = layout_or_none(grad)
    if lay is None or grad.shape != like.shape:
        grad = grad.expand(like.shape).contiguous()
        lay = layout_or_none(grad)
    return grad, lay
