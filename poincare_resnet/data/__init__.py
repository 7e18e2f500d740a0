"""Datasets as in-memory tensors, augmentation and a deterministic resumable batch loader."""

from .augment import augment
from .datasets import DATASETS, DatasetError, DatasetSplits, load_dataset, load_images_dir
from .loader import TensorLoader

__all__ = [
    "DATASETS",
    "DatasetError",
    "DatasetSplits",
    "TensorLoader",
    "augment",
    "load_dataset",
    "load_images_dir",
]
