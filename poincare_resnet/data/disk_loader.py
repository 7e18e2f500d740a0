"""Resumable batch loader over image files, decoding in ``torch.utils.data`` worker processes.

:class:`DiskLoader` has the interface of :class:`~poincare_resnet.data.loader.TensorLoader`
(``len``, iteration, ``set_epoch``, ``state_dict``/``load_state_dict``, ranks) and the same
guarantees: the order of epoch ``e`` is a function of ``(seed, e)`` only, the augmentation of a
sample a function of ``(seed, e, sample index)`` only, so the batches do not depend on the
number of workers, and a run resumed at batch ``b`` yields exactly the batches ``b, b+1, ...``
of the uninterrupted run without decoding the images of batches ``0..b-1``.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .datasets import DatasetError, DatasetSplits
from .images import ImageSet, decode_rgb, eval_transform, sample_generator, train_transform
from .loader import TensorLoader

__all__ = ["DiskLoader", "make_loader"]


@dataclass(frozen=True)
class _DecodeFailure:
    """A worker's decoding error, carried to the main process as data (not a traceback)."""

    message: str


class _EpochBatches(torch.utils.data.Dataset):
    """Batch ``b`` of one epoch: decode and transform the files at ``order[b*B:(b+1)*B]``."""

    def __init__(
        self, images: ImageSet, y: Tensor, order: np.ndarray, batch_size: int,
        key: tuple[int, int] | None, hflip: bool,
    ) -> None:  # fmt: skip
        self.images, self.y, self.order = images, y, order
        self.batch_size, self.key, self.hflip = batch_size, key, hflip

    def __len__(self) -> int:
        return -(-len(self.order) // self.batch_size)

    def _sample(self, index: int) -> Tensor:
        x = decode_rgb(self.images.path(index))
        if self.key is None:
            return eval_transform(x, self.images.spec)
        g = sample_generator(self.key[0], self.key[1], index)
        return train_transform(x, self.images.spec, self.hflip, g)

    def __getitem__(self, b: int) -> tuple[Tensor, Tensor] | _DecodeFailure:
        sel = self.order[b * self.batch_size : (b + 1) * self.batch_size]
        try:
            xb = torch.stack([self._sample(int(i)) for i in sel])
        except DatasetError as e:
            return _DecodeFailure(str(e))
        return xb, self.y[torch.from_numpy(sel)]


class DiskLoader(TensorLoader):
    """Iterate ``(xb, yb)`` batches of an :class:`ImageSet` (see the module doc).

    Parameters
    ----------
    images : ImageSet
        The training images (file paths and output size).
    y : Tensor
        int64 labels ``[N]``.
    batch_size, shuffle, seed, drop_last, rank, world_size
        As :class:`TensorLoader`.
    augment : bool
        Random-resized crop + flip (:func:`~poincare_resnet.data.images.train_transform`);
        otherwise the evaluation transform (resize + centre crop).
    hflip : bool
        Whether the augmentation flips.
    workers : int
        Decoding processes (0: decode in this process).
    """

    def __init__(
        self,
        images: ImageSet,
        y: Tensor,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        augment: bool = True,
        hflip: bool = True,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 0,
    ) -> None:
        if workers < 0:
            raise ValueError(f"--workers must be >= 0, got {workers}")
        super().__init__(images, y, batch_size, shuffle, seed, drop_last, None, rank, world_size)
        self.images, self.train_augment, self.hflip, self.workers = images, augment, hflip, workers
        self._digest: str | None = None

    def _epoch_batches(self) -> _EpochBatches:
        order = self.indices().numpy()
        end = len(self) * self.batch_size  # drop_last: the partial batch is not served
        key = (self.seed, self.epoch) if self.train_augment else None
        return _EpochBatches(self.images, self.y, order[:end], self.batch_size, key, self.hflip)

    def batch(self, batch_index: int, idx: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Batch ``batch_index`` of the current epoch, decoded in this process."""
        return _unwrap(self._epoch_batches()[batch_index])

    def iter_from(self, batch_index: int) -> Iterator[tuple[Tensor, Tensor]]:
        """Iterate the current epoch from ``batch_index``; earlier batches are not decoded."""
        if batch_index < 0:
            raise ValueError(f"batch_index must be >= 0, got {batch_index}")
        batches = self._epoch_batches()
        todo = range(min(batch_index, len(self)), len(self))
        self.position = todo.start
        if self.workers == 0:
            stream: Iterator = (batches[b] for b in todo)
        else:
            stream = iter(
                torch.utils.data.DataLoader(
                    batches, batch_size=None, sampler=todo, num_workers=self.workers
                )
            )
        try:
            for b, out in zip(todo, stream, strict=False):
                xb_yb = _unwrap(out)
                self.position = b + 1
                yield xb_yb
        finally:
            shutdown = getattr(stream, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    def state_dict(self) -> dict[str, int | str]:
        """Epoch, batches yielded, seed and a digest of the file list (checked on resume)."""
        return {**super().state_dict(), "seed": int(self.seed), "files": self.files_digest()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the position; :class:`DatasetError` if the seed or the file list changed."""
        if "seed" in state and int(state["seed"]) != self.seed:
            raise DatasetError(
                f"resume: the data order was seeded {state['seed']}, not {self.seed}"
            )
        if "files" in state and state["files"] != self.files_digest():
            raise DatasetError(
                f"resume: the training files differ from the checkpoint's ({len(self.images)} "
                f"files now, first {self.images.path(0) if len(self.images) else None}): the "
                "dataset changed, so the interrupted epoch cannot be reproduced"
            )
        super().load_state_dict(state)

    def files_digest(self) -> str:
        """SHA-256 (16 hex digits) of the training file paths and labels, in order."""
        if self._digest is None:
            h = hashlib.sha256()
            for f, label in zip(self.images.paths.tolist(), self.y.tolist(), strict=True):
                h.update(b"%s\0%d\n" % (f, label))
            self._digest = h.hexdigest()[:16]
        return self._digest


def _unwrap(out: tuple[Tensor, Tensor] | _DecodeFailure) -> tuple[Tensor, Tensor]:
    if isinstance(out, _DecodeFailure):
        raise DatasetError(out.message)
    return out


def make_loader(
    data: DatasetSplits,
    batch_size: int,
    seed: int,
    augment: bool,
    rank: int = 0,
    world_size: int = 1,
    workers: int | None = None,
) -> TensorLoader:
    """The shuffling training loader of ``data``: a :class:`DiskLoader` when its images are
    on disk (:class:`ImageSet`), else a :class:`TensorLoader` (``workers`` ignored).

    ``workers=None`` decodes in ``min(2, usable cores)`` processes."""
    if isinstance(data.train_x, ImageSet):
        if workers is None:
            workers = min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                          else os.cpu_count() or 1)  # fmt: skip
        return DiskLoader(
            data.train_x, data.train_y, batch_size, shuffle=True, seed=seed, augment=augment,
            hflip=data.hflip, rank=rank, world_size=world_size, workers=workers,
        )  # fmt: skip
    return TensorLoader(
        data.train_x, data.train_y, batch_size, shuffle=True, seed=seed,
        augment=(data.crop_padding, data.hflip) if augment else None,
        rank=rank, world_size=world_size,
    )  # fmt: skip
