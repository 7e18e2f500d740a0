"""Helpers several test files share: a small Poincaré residual block, the tiny training run,
comparisons of checkpoint weights."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from poincare_resnet.nn import PoincareBatchNorm2d, PoincareConv2d, PoincareResidual, TangentReLU
from poincare_resnet.training.checkpoint import load_checkpoint
from poincare_resnet.training.trainer import TrainConfig

# 96 images, batch 32: 3 steps per epoch, 6 steps in all
TINY = dict(dataset="digits", limit_train=96, batch_size=32, epochs=2, progress=False, log_every=1)


class PoincareBlock(nn.Module):
    """conv → BN → ReLU → conv → BN, Poincaré residual, ReLU."""

    def __init__(self, ch: int = 4, c: float = 0.1) -> None:
        super().__init__()
        self.conv1 = PoincareConv2d(ch, ch, 3, padding=1, c=c, init="hnn")
        self.bn1 = PoincareBatchNorm2d(ch, c=c)
        self.relu1 = TangentReLU()
        self.conv2 = PoincareConv2d(ch, ch, 3, padding=1, c=c, init="hnn")
        self.bn2 = PoincareBatchNorm2d(ch, c=c)
        self.res = PoincareResidual(c=c)
        self.relu2 = TangentReLU()

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        f = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(u)))))
        return self.relu2(self.res(f, u))


def tiny_config(out: Path, **overrides) -> TrainConfig:
    """The tiny run (:data:`TINY`) into directory ``out``, with ``overrides``."""
    return TrainConfig(**{**TINY, "out": str(out), **overrides})


def checkpoint_weights(path: Path) -> dict[str, torch.Tensor]:
    """The model state of a checkpoint file."""
    return load_checkpoint(path).model_state


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    """Both states hold the same keys and bit-identical tensors."""
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:5]}"
