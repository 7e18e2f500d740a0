"""Datasets as in-memory tensors or image files on disk, augmentation and deterministic
resumable batch loaders."""

from .augment import augment
from .datasets import (
    DATASETS,
    DISK_DATASETS,
    DatasetError,
    DatasetSplits,
    load_dataset,
    load_images_dir,
    trained_image_size,
)
from .disk_loader import DiskLoader, make_loader
from .images import ImageSet, ImageSpec
from .loader import TensorLoader

__all__ = [
    "DATASETS",
    "DISK_DATASETS",
    "DatasetError",
    "DatasetSplits",
    "DiskLoader",
    "ImageSet",
    "ImageSpec",
    "TensorLoader",
    "augment",
    "load_dataset",
    "load_images_dir",
    "make_loader",
    "trained_image_size",
]
