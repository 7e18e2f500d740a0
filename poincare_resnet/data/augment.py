"""Vectorised per-sample image augmentation on ``[N, C, H, W]`` tensors (no torchvision).

All randomness is drawn from an explicit :class:`torch.Generator` (on its own device, then
moved to the data's device), so a batch is reproducible from the generator's seed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["augment", "random_crop", "random_hflip"]


def _gen_device(generator: torch.Generator | None) -> torch.device:
    return generator.device if generator is not None else torch.device("cpu")


def random_crop(x: Tensor, padding: int, generator: torch.Generator | None = None) -> Tensor:
    """Zero-pad each side by ``padding`` and take a random ``H x W`` crop per sample.

    Padding uses the value 0 of the normalised ``[-1, 1]`` input ("zero padding", i.e. mid
    grey), matching the usual pad-then-crop recipe applied after normalisation.
    """
    if padding < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    if padding == 0 or x.shape[0] == 0:
        return x
    n, _, h, w = x.shape
    dev = _gen_device(generator)
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=dev).to(x.device)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=dev).to(x.device)
    padded = F.pad(x, (padding, padding, padding, padding))
    rows = oy[:, None] + torch.arange(h, device=x.device)  # [N, H]
    cols = ox[:, None] + torch.arange(w, device=x.device)  # [N, W]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, chans, rows[:, None, :, None], cols[:, None, None, :]]


def random_hflip(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Flip each sample horizontally with probability 1/2."""
    if x.shape[0] == 0:
        return x
    dev = _gen_device(generator)
    flip = (torch.rand(x.shape[0], generator=generator, device=dev) < 0.5).to(x.device)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def augment(
    x: Tensor, padding: int, hflip: bool, generator: torch.Generator | None = None
) -> Tensor:
    """Random crop with zero padding ``padding``, then (if ``hflip``) random horizontal flip."""
    x = random_crop(x, padding, generator)
    return random_hflip(x, generator) if hflip else x
