"""Training: the loop, checkpoints, distributed plumbing."""

from .checkpoint import CheckpointError, CheckpointManager, load_checkpoint, save_checkpoint
from .trainer import NonFiniteError, RunDirError, TrainConfig, evaluate_split, train

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "load_checkpoint",
    "save_checkpoint",
    "NonFiniteError",
    "RunDirError",
    "TrainConfig",
    "evaluate_split",
    "train",
]
