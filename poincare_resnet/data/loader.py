"""In-memory, deterministic, resumable and shardable batch iterator over tensors."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

from .augment import augment as _augment

__all__ = ["TensorLoader"]

_MIX = 1000003
_SEED_MOD = 2**63


class TensorLoader:
    """Iterate ``(xb, yb)`` batches of in-memory tensors.

    * The order of epoch ``e`` is ``randperm`` seeded with ``seed * 1000003 + e``.
    * Augmentation (``augment=(padding, hflip)``) uses a generator seeded from
      ``(seed, epoch, rank, batch index)``, so any batch is reproducible on its own.
    * With ``world_size > 1`` rank ``r`` takes positions ``r, r + world_size, ...`` of the
      permutation, padded by wrapping around so every rank has the same number of batches.
    * ``start_batch`` (set by :meth:`load_state_dict` or :meth:`iter_from`) skips the first
      batches of the next iteration, to resume mid-epoch; it is consumed by that iteration.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        augment: tuple[int, bool] | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if len(x) != len(y):
            raise ValueError(f"x has {len(x)} samples but y has {len(y)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, ws={world_size}")
        self.x, self.y = x, y
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.augment = augment
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.start_batch = 0
        self.position = 0  # batches of the current epoch already yielded

    @property
    def num_samples(self) -> int:
        """Samples per rank and epoch (including wrap-around padding)."""
        return math.ceil(len(self.x) / self.world_size)

    def __len__(self) -> int:
        m = self.num_samples
        return m // self.batch_size if self.drop_last else math.ceil(m / self.batch_size)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch; a pending ``start_batch`` is kept only if the epoch is unchanged."""
        if epoch != self.epoch:
            self.start_batch = 0
            self.position = 0
        self.epoch = epoch

    def indices(self, epoch: int | None = None) -> Tensor:
        """This rank's sample indices for ``epoch`` (default: the current one)."""
        epoch = self.epoch if epoch is None else epoch
        n = len(self.x)
        if self.shuffle:
            g = torch.Generator().manual_seed((self.seed * _MIX + epoch) % _SEED_MOD)
            perm = torch.randperm(n, generator=g)
        else:
            perm = torch.arange(n)
        if self.world_size > 1 and n > 0:
            total = self.num_samples * self.world_size
            perm = perm.repeat(math.ceil(total / n))[:total]
            perm = perm[self.rank :: self.world_size]
        return perm

    def _batch_generator(self, batch_index: int) -> torch.Generator:
        key = ((self.seed * _MIX + self.epoch) * _MIX + self.rank) * _MIX + batch_index
        return torch.Generator().manual_seed(key % _SEED_MOD)

    def batch(self, batch_index: int, idx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Batch ``batch_index`` of the current epoch (augmented if configured)."""
        idx = self.indices() if idx is None else idx
        sel = idx[batch_index * self.batch_size : (batch_index + 1) * self.batch_size]
        xb = self.x[sel.to(self.x.device)]
        yb = self.y[sel.to(self.y.device)]
        if self.augment is not None:
            padding, hflip = self.augment
            xb = _augment(xb, padding, hflip, self._batch_generator(batch_index))
        return xb, yb

    def iter_from(self, batch_index: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Iterate the current epoch starting at ``batch_index``."""
        if batch_index < 0:
            raise ValueError(f"batch_index must be >= 0, got {batch_index}")
        idx = self.indices()
        self.position = min(batch_index, len(self))
        for b in range(batch_index, len(self)):
            out = self.batch(b, idx)
            self.position = b + 1
            yield out

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        start, self.start_batch = self.start_batch, 0
        return self.iter_from(start)

    def state_dict(self) -> dict[str, int]:
        """Data-order position: current epoch and number of batches already yielded."""
        return {"epoch": int(self.epoch), "position": int(self.position)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore the position; the next iteration resumes at ``state['position']``."""
        self.epoch = int(state["epoch"])
        self.position = self.start_batch = int(state["position"])
