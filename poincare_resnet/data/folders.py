"""Datasets of image files on disk: an image folder, Tiny-ImageNet and ImageNet's folder layout.

* ``imagefolder``: ``root/<class>/**/<image>``; the classes are the sorted folder names and a
  fixed stratified 10 % of the images (seed 0) is the test split.
* ``tiny-imagenet``: ``root/wnids.txt``, ``root/train/<wnid>/images/*``,
  ``root/val/val_annotations.txt`` (``file<TAB>wnid<TAB>...``) with ``root/val/images/*``; the
  official val split is the test split; optional ``root/words.txt`` names the classes.
* ``imagenet``: ``root/train/<wnid>/**/*`` and ``root/val/<wnid>/**/*`` with the same classes;
  val is the test split; optional ``root/words.txt`` names the classes.

The classes are always sorted (wnids or folder names), so label ``k`` is the ``k``-th name.
As for the in-memory sets, the trainer's validation split is carved from train (stratified,
seeded). Only the file lists are read here; images are decoded when used
(:class:`~poincare_resnet.data.images.ImageSet`). Nothing is ever written under ``root``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .datasets import DatasetError, DatasetSplits, _make_splits, stratified_split
from .images import ImageSet, ImageSpec

__all__ = [
    "IMAGE_SUFFIXES",
    "load_disk_dataset",
    "scan_class_folders",
    "scan_imagenet",
    "scan_tiny_imagenet",
]

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
# dataset (one of datasets.DISK_DATASETS) -> (default image size, evaluation crop fraction)
_DEFAULTS = {"imagefolder": (224, 0.875), "tiny-imagenet": (64, 1.0), "imagenet": (224, 0.875)}
_IMAGEFOLDER_TEST_FRACTION = 0.1
_IMAGEFOLDER_TEST_SEED = 0

Files = tuple[list[str], np.ndarray]  # (paths, int64 labels)


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        state = "does not exist" if not path.exists() else "is not a directory"
        raise DatasetError(f"{path}: {what} {state}")
    return path


def _visible(p: Path) -> bool:
    return not p.name.startswith(".")


def _images_in(folder: Path, recursive: bool) -> list[Path]:
    """Image files (by suffix, case-insensitive, not hidden) under ``folder``, sorted."""
    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(
        p
        for p in found
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and _visible(p)
        and all(_visible(q) for q in p.relative_to(folder).parents)
    )  # fmt: skip


def _class_dirs(root: Path) -> list[str]:
    """The sorted names of the non-hidden sub-directories of ``root``."""
    return sorted(p.name for p in root.iterdir() if p.is_dir() and _visible(p))


def _empty_class(folder: Path, name: str) -> DatasetError:
    kinds = ", ".join(sorted(IMAGE_SUFFIXES))
    return DatasetError(f"{folder}: class {name!r} has no images ({kinds})")


def scan_class_folders(root: Path, classes: list[str] | None = None) -> tuple[list[str], Files]:
    """``(classes, (files, labels))`` of ``root/<class>/**/<image>``.

    ``classes`` (default: the sorted folder names) fixes the label order; each needs at least
    one image.
    """
    _require_dir(root, "image folder")
    names = _class_dirs(root) if classes is None else classes
    if not names:
        raise DatasetError(f"{root}: no class folders (expected {root}/<class>/<image>)")
    files: list[str] = []
    labels: list[int] = []
    for label, name in enumerate(names):
        images = _images_in(root / name, recursive=True)
        if not images:
            raise _empty_class(root / name, name)
        files += map(str, images)
        labels += [label] * len(images)
    return list(names), (files, np.asarray(labels, dtype=np.int64))


def _read_lines(path: Path, what: str) -> list[str]:
    if not path.is_file():
        raise DatasetError(f"{path}: missing ({what})")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DatasetError(f"{path}: cannot read ({e})") from e
    return [line.rstrip("\r") for line in text.split("\n")]


def _read_wnids(root: Path) -> list[str]:
    """The sorted, distinct wnids of ``root/wnids.txt``."""
    path = root / "wnids.txt"
    wnids = [w.strip() for w in _read_lines(path, "the Tiny-ImageNet class list") if w.strip()]
    if not wnids:
        raise DatasetError(f"{path}: lists no classes")
    dup = sorted({w for w in wnids if wnids.count(w) > 1})
    if dup:
        raise DatasetError(f"{path}: lists {dup[0]!r} more than once")
    return sorted(wnids)


def _class_names(root: Path, wnids: list[str]) -> list[str]:
    """Names from the optional ``root/words.txt`` (``wnid<TAB>words``), else the wnids."""
    path = root / "words.txt"
    if not path.is_file():
        return list(wnids)
    words = {}
    for line in _read_lines(path, "class names"):
        wnid, _, text = line.partition("\t")
        if wnid.strip():
            words[wnid.strip()] = text.strip() or wnid.strip()
    return [words.get(w, w) for w in wnids]


def _check_same_classes(train: Path, train_cls: list[str], other: Path, other_cls: list[str]):
    """:class:`DatasetError` naming the classes found in only one of the two lists."""
    missing = sorted(set(train_cls) - set(other_cls))
    extra = sorted(set(other_cls) - set(train_cls))
    if missing or extra:
        parts = [
            f"missing {missing[:5]}" if missing else "",
            f"unknown {extra[:5]}" if extra else "",
        ]
        raise DatasetError(
            f"{other}: class list differs from {train} ({'; '.join(p for p in parts if p)})"
        )


def _tiny_val(root: Path, wnids: list[str]) -> Files:
    """The labelled val images of ``root/val/val_annotations.txt``, sorted by file name."""
    ann = root / "val" / "val_annotations.txt"
    lines = _read_lines(ann, "the Tiny-ImageNet val labels")
    label_of = {w: i for i, w in enumerate(wnids)}
    rows: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or not fields[0].strip():
            raise DatasetError(f"{ann}:{number}: expected 'file<TAB>wnid', got {line!r}")
        name, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in label_of:
            raise DatasetError(f"{ann}:{number}: class {wnid!r} is not in {root / 'wnids.txt'}")
        if name in rows:
            raise DatasetError(f"{ann}:{number}: {name!r} is annotated twice")
        rows[name] = label_of[wnid]
    images = root / "val" / "images"
    for name in sorted(rows):
        if not (images / name).is_file():
            raise DatasetError(f"{images / name}: missing (listed in {ann})")
    seen = {wnids[k] for k in rows.values()}
    _check_same_classes(root / "wnids.txt", wnids, ann, sorted(seen))
    names = sorted(rows)
    labels = np.asarray([rows[n] for n in names], dtype=np.int64)
    return [str(images / n) for n in names], labels


def scan_tiny_imagenet(root: Path) -> tuple[list[str], list[str], Files, Files]:
    """``(wnids, class names, train, test)`` of a Tiny-ImageNet tree (see the module doc)."""
    _require_dir(root, "Tiny-ImageNet root")
    wnids = _read_wnids(root)
    train_dir = _require_dir(root / "train", "Tiny-ImageNet train folder")
    _check_same_classes(root / "wnids.txt", wnids, train_dir, _class_dirs(train_dir))
    files: list[str] = []
    labels: list[int] = []
    for label, wnid in enumerate(wnids):
        folder = _require_dir(train_dir / wnid / "images", f"image folder of class {wnid!r}")
        images = _images_in(folder, recursive=False)
        if not images:
            raise _empty_class(folder, wnid)
        files += map(str, images)
        labels += [label] * len(images)
    train = (files, np.asarray(labels, dtype=np.int64))
    return wnids, _class_names(root, wnids), train, _tiny_val(root, wnids)


def scan_imagenet(root: Path) -> tuple[list[str], list[str], Files, Files]:
    """``(wnids, class names, train, test)`` of ``root/{train,val}/<wnid>/**/<image>``."""
    _require_dir(root, "ImageNet root")
    train_dir = _require_dir(root / "train", "ImageNet train folder")
    val_dir = _require_dir(root / "val", "ImageNet val folder")
    wnids, train = scan_class_folders(train_dir)
    val_classes = _class_dirs(val_dir)
    if not val_classes and _images_in(val_dir, recursive=False):
        raise DatasetError(f"{val_dir}: images must be sorted into {val_dir}/<wnid>/ folders")
    _check_same_classes(train_dir, wnids, val_dir, val_classes)
    _, test = scan_class_folders(val_dir, wnids)
    return wnids, _class_names(root, wnids), train, test


def _scan_imagefolder(root: Path) -> tuple[list[str], list[str], Files, Files]:
    classes, (files, labels) = scan_class_folders(root)
    if set(classes) <= {"train", "val", "test"}:
        raise DatasetError(
            f"{root}: its folders are {classes}, split folders, not classes; for "
            "train/<class>/ and val/<class>/ use --dataset imagenet"
        )
    keep, held = stratified_split(labels, _IMAGEFOLDER_TEST_FRACTION, _IMAGEFOLDER_TEST_SEED)
    arr = np.asarray(files, dtype=object)
    return classes, classes, (list(arr[keep]), labels[keep]), (list(arr[held]), labels[held])


_SCANNERS = {
    "imagefolder": _scan_imagefolder,
    "tiny-imagenet": scan_tiny_imagenet,
    "imagenet": scan_imagenet,
}


def load_disk_dataset(
    key: str,
    root: Path | None,
    val_fraction: float,
    seed: int,
    limit: int | None,
    image_size: int | None = None,
) -> DatasetSplits:
    """The :class:`DatasetSplits` of an on-disk dataset; its ``*_x`` are :class:`ImageSet`.

    ``image_size`` defaults to 64 for Tiny-ImageNet and 224 otherwise.
    """
    if root is None:
        raise DatasetError(f"dataset {key} needs --data-dir DIR (the folder holding it)")
    default_size, crop_fraction = _DEFAULTS[key]
    spec = ImageSpec(default_size if image_size is None else int(image_size), crop_fraction)
    _, names, train, test = _SCANNERS[key](root)

    def to_images(files: np.ndarray) -> ImageSet:
        return ImageSet(files, spec)

    train_files = np.asarray(train[0], dtype=object)
    return _make_splits(
        key, (train_files, train[1]), (np.asarray(test[0], dtype=object), test[1]), to_images,
        val_fraction, seed, limit, names, crop_padding=0, hflip=True,
    )  # fmt: skip
