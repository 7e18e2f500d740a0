"""Image files decoded on demand (Pillow, no torchvision): eval and train transforms on tensors.

An :class:`ImageSet` is a list of image files with their labels that indexes like a tensor of
shape ``[N, 3, S, S]``: ``images[i:j]`` decodes those files (resize + centre crop, values in
``[-1, 1]``), so evaluation code written for in-memory tensors runs unchanged on data on disk.
The training transform (random-resized crop + horizontal flip) draws its parameters from a
generator seeded by ``(seed, epoch, sample index)``: a sample's crop never depends on the batch,
the worker or the process that decodes it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .datasets import DatasetError

__all__ = ["ImageSet", "ImageSpec", "decode_rgb", "eval_transform", "train_transform"]

_MIX = 1000003
_SEED_MOD = 2**63
_LOG_RATIO = (math.log(3 / 4), math.log(4 / 3))


@dataclass(frozen=True)
class ImageSpec:
    """How the images of one dataset become ``[3, size, size]`` tensors.

    Parameters
    ----------
    size : int
        Output height and width ``S``.
    crop_fraction : float
        Evaluation: resize the shorter side to ``round(S / crop_fraction)``, then take the
        central ``S x S`` crop (``0.875``: ImageNet's 256 -> 224; ``1.0``: resize to ``S``).
    scale : tuple of float
        Training: the random-resized crop covers a fraction ``U(scale)`` of the image area,
        with aspect ratio ``exp(U(log 3/4, log 4/3))`` (the standard Inception crop).
    """

    size: int
    crop_fraction: float = 1.0
    scale: tuple[float, float] = (0.08, 1.0)

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"--image-size must be >= 1, got {self.size}")
        if not 0.0 < self.crop_fraction <= 1.0:
            raise ValueError(f"crop_fraction must be in (0, 1], got {self.crop_fraction}")
        if not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
            raise ValueError(f"crop scale must satisfy 0 < low <= high <= 1, got {self.scale}")


def decode_rgb(path: str) -> Tensor:
    """Decode one image file to a float32 ``[3, H, W]`` tensor of values ``0..255``.

    Raises
    ------
    DatasetError
        The file is missing, not an image, truncated or corrupt; the message names it.
    """
    from PIL import Image

    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DatasetError(f"{path}: cannot decode image ({type(e).__name__}: {e})") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float()


def _resize(x: Tensor, h: int, w: int) -> Tensor:
    """Bilinear (antialiased) resize of ``[3, H, W]`` to ``[3, h, w]``; exact if unchanged."""
    if tuple(x.shape[1:]) == (h, w):
        return x
    out = F.interpolate(x[None], size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return out[0]


def _to_unit_range(x: Tensor) -> Tensor:
    """Pixel values ``0..255`` -> ``x / 127.5 - 1`` in ``[-1, 1]`` (as the in-memory sets)."""
    return x.div(127.5).sub_(1.0).clamp_(-1.0, 1.0)


def eval_transform(x: Tensor, spec: ImageSpec) -> Tensor:
    """Resize the shorter side to ``round(S / crop_fraction)``, centre-crop ``S x S``, scale.

    Shapes: ``[3, H, W]`` (values 0..255) -> ``[3, S, S]`` (values in [-1, 1]).
    """
    h, w = x.shape[1:]
    short = max(spec.size, round(spec.size / spec.crop_fraction))
    nh, nw = (short, max(short, round(w * short / h))) if h <= w else (
        max(short, round(h * short / w)), short)  # fmt: skip
    x = _resize(x, nh, nw)
    top, left = (nh - spec.size) // 2, (nw - spec.size) // 2
    return _to_unit_range(x[:, top : top + spec.size, left : left + spec.size])


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of sample ``index`` in ``epoch``: seeded ``((seed*p + epoch)*p + index)``
    modulo ``2**63`` with ``p = 1000003``."""
    key = ((seed * _MIX + epoch) * _MIX + index) % _SEED_MOD
    return torch.Generator().manual_seed(key)


def crop_box(h: int, w: int, scale: tuple[float, float], g: torch.Generator) -> tuple[int, ...]:
    """``(top, left, height, width)`` of a random-resized crop of an ``h x w`` image.

    Up to 10 draws of area ``U(scale) * h * w`` and log-uniform aspect ratio in
    ``[3/4, 4/3]``; the first box that fits is placed uniformly. Otherwise the central crop
    of the whole image with the aspect ratio clamped to ``[3/4, 4/3]``.
    """
    area = h * w
    for _ in range(10):
        u = torch.rand(4, generator=g, dtype=torch.float64).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        ratio = math.exp(_LOG_RATIO[0] + (_LOG_RATIO[1] - _LOG_RATIO[0]) * u[1])
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            return int(u[2] * (h - ch + 1)), int(u[3] * (w - cw + 1)), ch, cw
    ratio = min(max(w / h, 3 / 4), 4 / 3)
    cw, ch = (w, round(w / ratio)) if w / h < ratio else (round(h * ratio), h)
    cw, ch = min(cw, w), min(ch, h)
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def train_transform(x: Tensor, spec: ImageSpec, hflip: bool, g: torch.Generator) -> Tensor:
    """Random-resized crop to ``S x S`` (:func:`crop_box`), flip with probability 1/2, scale.

    Shapes: ``[3, H, W]`` (values 0..255) -> ``[3, S, S]`` (values in [-1, 1]).
    """
    top, left, ch, cw = crop_box(int(x.shape[1]), int(x.shape[2]), spec.scale, g)
    out = _resize(x[:, top : top + ch, left : left + cw], spec.size, spec.size)
    if hflip and bool(torch.rand((), generator=g) < 0.5):
        out = out.flip(-1)
    return _to_unit_range(out)


class ImageSet:
    """Image files indexed like a float32 tensor ``[N, 3, S, S]`` (decoded when indexed).

    Parameters
    ----------
    files : sequence of str
        Image paths, one per sample.
    spec : ImageSpec
        Output size and the evaluation/training transforms.

    ``images[i]`` is ``[3, S, S]``; ``images[i:j]``, ``images[index_tensor]`` and
    ``images[list]`` are ``[k, 3, S, S]`` (:func:`eval_transform`). Decoding errors raise
    :class:`DatasetError` naming the file.
    """

    def __init__(self, files: Sequence[str] | np.ndarray, spec: ImageSpec) -> None:
        # fixed-width bytes, not Python objects: worker processes share the pages (no
        # reference counts to copy on write), a few bytes a path
        self.paths = np.asarray(
            files if isinstance(files, np.ndarray) and files.dtype.kind == "S"
            else [os.fsencode(f) for f in files], dtype=bytes,
        )  # fmt: skip
        self.spec = spec

    @property
    def files(self) -> list[str]:
        """The image paths, in order."""
        return [os.fsdecode(p) for p in self.paths]

    def path(self, index: int) -> str:
        """The path of image ``index``."""
        return os.fsdecode(self.paths[index])

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """``(N, 3, S, S)``, the shape of the decoded tensor."""
        return (len(self.paths), 3, self.spec.size, self.spec.size)

    def __getitem__(self, index) -> Tensor:
        if isinstance(index, (int, np.integer)):
            return eval_transform(decode_rgb(self.path(index)), self.spec)
        if isinstance(index, Tensor):
            index = index.cpu().numpy()
        picked = self.paths[index]
        if len(picked) == 0:
            return torch.zeros(0, 3, self.spec.size, self.spec.size)
        return torch.stack([eval_transform(decode_rgb(os.fsdecode(f)), self.spec) for f in picked])

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, index: np.ndarray) -> ImageSet:
        """The images at ``index`` (an integer array), same spec, not decoded."""
        return ImageSet(self.paths[index], self.spec)

    def __repr__(self) -> str:
        return f"ImageSet({len(self)} files, size {self.spec.size})"
