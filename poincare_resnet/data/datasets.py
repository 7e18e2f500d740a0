"""Image datasets as in-memory tensors: digits, Fashion-MNIST, CIFAR-10/100, OOD image folders
(and the entry point :func:`load_dataset` of the on-disk sets of :mod:`.folders`).

Every loader returns float32 images ``[N, C, H, W]`` scaled to ``[-1, 1]`` and int64 labels.
Nothing is downloaded implicitly; missing files raise :class:`DatasetError` with instructions.
"""

from __future__ import annotations

import codecs
import difflib
import gzip
import hashlib
import os
import pickle
import struct
import tempfile
import urllib.request
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

try:  # numpy >= 2
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]

__all__ = [
    "trained_image_size",
    "DATASETS",
    "DISK_DATASETS",
    "DatasetError",
    "DatasetSplits",
    "download_fashion_mnist",
    "load_dataset",
    "load_images_dir",
]

DATASETS = ("digits", "fashion-mnist", "cifar10", "cifar100")
DISK_DATASETS = ("imagefolder", "tiny-imagenet", "imagenet")  # data/folders.py

CACHE_DIR = Path("~/.cache/poincare_resnet")
FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"
FASHION_MNIST_MD5 = {
    "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
}
FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
CIFAR10_CLASSES = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]  # fmt: skip
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049
_DIGITS_TEST_FRACTION = 0.2
_DIGITS_TEST_SEED = 0


class DatasetError(ValueError):
    """A dataset is missing, malformed, truncated or unsafe; the message names the file."""


@dataclass
class DatasetSplits:
    """Train / validation (carved from train) / official test split of one dataset."""

    name: str
    train_x: Tensor = field(repr=False)
    train_y: Tensor = field(repr=False)
    val_x: Tensor = field(repr=False)
    val_y: Tensor = field(repr=False)
    test_x: Tensor = field(repr=False)
    test_y: Tensor = field(repr=False)
    num_classes: int
    in_chans: int
    image_size: tuple[int, int]
    class_names: list[str] = field(repr=False)
    crop_padding: int
    hflip: bool

    def sizes(self) -> dict[str, int]:
        """Number of samples per split."""
        return {"train": len(self.train_y), "val": len(self.val_y), "test": len(self.test_y)}


# --------------------------------------------------------------------------- splitting


def stratified_split(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into ``(keep, held)`` with ``round(fraction * N)`` held, stratified by label.

    Per-class quotas use the largest-remainder rule, so the total is exact. Both index arrays
    are sorted; the result depends only on ``(y, fraction, seed)``.
    """
    n = len(y)
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"split fraction must be in [0, 1), got {fraction}")
    classes, counts = np.unique(y, return_counts=True)
    total = int(round(fraction * n))
    exact = counts * fraction
    quota = np.floor(exact).astype(np.int64)
    remainder = total - int(quota.sum())
    if remainder > 0:
        order = np.argsort(-(exact - quota), kind="stable")
        quota[order[:remainder]] += 1
    rng = np.random.default_rng(seed)
    held = [
        rng.permutation(np.flatnonzero(y == c))[:q] for c, q in zip(classes, quota, strict=True)
    ]
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    mask = np.ones(n, dtype=bool)
    mask[held_idx] = False
    return np.flatnonzero(mask), held_idx


def _make_splits(
    name: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    to_tensor: Callable[[np.ndarray], Tensor],
    val_fraction: float,
    seed: int,
    limit: int | None,
    class_names: list[str],
    crop_padding: int,
    hflip: bool,
) -> DatasetSplits:
    """Carve validation from train, apply ``limit`` and convert the uint8/int arrays to tensors."""
    x, y = train
    keep, val = stratified_split(y, val_fraction, seed)
    if limit is not None and limit < len(keep):
        rng = np.random.default_rng(seed)
        keep = np.sort(rng.permutation(keep)[:limit])

    def labels(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))

    train_x = to_tensor(x[keep])
    return DatasetSplits(
        name=name,
        train_x=train_x,
        train_y=labels(y[keep]),
        val_x=to_tensor(x[val]),
        val_y=labels(y[val]),
        test_x=to_tensor(test[0]),
        test_y=labels(test[1]),
        num_classes=len(class_names),
        in_chans=int(train_x.shape[1]),
        image_size=(int(train_x.shape[2]), int(train_x.shape[3])),
        class_names=list(class_names),
        crop_padding=crop_padding,
        hflip=hflip,
    )


def _uint8_to_tensor(a: np.ndarray) -> Tensor:
    """uint8 pixels -> float32 in [-1, 1] (``x / 127.5 - 1``)."""
    return torch.from_numpy(a.astype(np.float32)).div_(127.5).sub_(1.0)


# --------------------------------------------------------------------------- public entry


def load_dataset(
    name: str,
    data_dir: str | Path | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    limit: int | None = None,
    image_size: int | None = None,
) -> DatasetSplits:
    """Load ``name`` (one of :data:`DATASETS` or :data:`DISK_DATASETS`) with a deterministic
    validation split.

    ``val_fraction`` of the training set (stratified, seeded by ``seed``) becomes validation;
    ``limit`` caps the number of training samples (a seeded random subset). The on-disk sets
    (``imagefolder``, ``tiny-imagenet``, ``imagenet``) need ``data_dir``; their ``*_x`` are
    :class:`~poincare_resnet.data.images.ImageSet` (decoded when indexed) resized to
    ``image_size`` (default 64 for Tiny-ImageNet, 224 otherwise); the in-memory sets ignore it.
    """
    key = name.strip().lower().replace("_", "-")
    key = {
        "fashionmnist": "fashion-mnist", "cifar-10": "cifar10", "cifar-100": "cifar100",
        "tinyimagenet": "tiny-imagenet", "image-folder": "imagefolder",
    }.get(key, key)  # fmt: skip
    known = (*DATASETS, *DISK_DATASETS)
    if key not in known:
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown dataset {name!r}: known datasets are {', '.join(known)}{hint}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of samples, got {limit}")
    root = Path(data_dir).expanduser() if data_dir is not None else None
    if key in DISK_DATASETS:
        from .folders import load_disk_dataset

        return load_disk_dataset(key, root, val_fraction, seed, limit, image_size)
    if image_size is not None:
        raise ValueError(f"--image-size applies to the on-disk datasets, not to {key}")
    if key == "digits":
        return _load_digits(val_fraction, seed, limit)
    if key == "fashion-mnist":
        return _load_fashion_mnist(root, val_fraction, seed, limit)
    return _load_cifar(key, root, val_fraction, seed, limit)


# --------------------------------------------------------------------------- digits


def _load_digits(val_fraction: float, seed: int, limit: int | None) -> DatasetSplits:
    """scikit-learn's 8x8 digits; fixed stratified 20% test split (seed 0), val from the rest."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.asarray(bunch.images, dtype=np.float32)[:, None]  # [N, 1, 8, 8], values 0..16
    y = np.asarray(bunch.target, dtype=np.int64)
    train_idx, test_idx = stratified_split(y, _DIGITS_TEST_FRACTION, _DIGITS_TEST_SEED)

    def to_tensor(a: np.ndarray) -> Tensor:
        return torch.from_numpy(np.ascontiguousarray(a) / 8.0 - 1.0).float()

    return _make_splits(
        "digits", (x[train_idx], y[train_idx]), (x[test_idx], y[test_idx]), to_tensor,
        val_fraction, seed, limit, [str(i) for i in range(10)], crop_padding=1, hflip=False,
    )  # fmt: skip


# --------------------------------------------------------------------------- Fashion-MNIST

_FMNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def read_idx(path: str | Path, magic: int, ndim: int) -> np.ndarray:
    """Read an IDX file (optionally gzipped) of unsigned bytes with the given magic and rank."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DatasetError(f"{path}: cannot read file ({e})") from e
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DatasetError(f"{path}: bad gzip data, corrupt or truncated ({e})") from e
    header = 4 * (1 + ndim)
    if len(raw) < header:
        raise DatasetError(
            f"{path}: truncated file: {len(raw)} bytes, shorter than the {header}-byte IDX header"
        )
    (got,) = struct.unpack(">I", raw[:4])
    if got != magic:
        raise DatasetError(
            f"{path}: wrong magic number {got} (expected {magic}); not this IDX type"
        )
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) < expected:
        raise DatasetError(
            f"{path}: truncated file: {len(raw)} bytes, header dims {list(dims)} need {expected}"
        )
    if len(raw) > expected:
        raise DatasetError(f"{path}: {len(raw) - expected} unexpected trailing bytes after data")
    return np.frombuffer(raw, dtype=np.uint8, count=expected - header, offset=header).reshape(dims)


def _fashion_dirs(root: Path | None) -> list[Path]:
    if root is not None:
        return [root, root / "fashion-mnist"]
    return [FASHION_MNIST_SYSTEM_DIR, CACHE_DIR.expanduser() / "fashion-mnist"]


def _find_fashion_files(root: Path | None) -> dict[str, Path]:
    """Locate the four IDX files (``.gz`` or plain) in the first directory holding all of them."""
    dirs = _fashion_dirs(root)
    for d in dirs:
        found: dict[str, Path] = {}
        for key, stem in _FMNIST_FILES.items():
            for fname in (stem + ".gz", stem):
                if (d / fname).is_file():
                    found[key] = d / fname
                    break
        if len(found) == len(_FMNIST_FILES):
            return found
    names = ", ".join(s + ".gz" for s in _FMNIST_FILES.values())
    raise DatasetError(
        f"Fashion-MNIST not found in {' or '.join(str(d) for d in dirs)}. Put {names} "
        "(gzipped or not) into one directory and pass --data-dir DIR, or run "
        f"`apt-get install dataset-fashion-mnist` (installs them into {FASHION_MNIST_SYSTEM_DIR}),"
        " or call poincare_resnet.data.datasets.download_fashion_mnist(DIR)."
    )


def _read_fashion_pair(images: Path, labels: Path) -> tuple[np.ndarray, np.ndarray]:
    x = read_idx(images, _IDX_IMAGES_MAGIC, 3)
    y = read_idx(labels, _IDX_LABELS_MAGIC, 1)
    if x.shape[1] == 0 or x.shape[2] == 0:
        raise DatasetError(f"{images}: empty image dimensions {x.shape[1:]}")
    if len(x) != len(y):
        raise DatasetError(
            f"{images} has {len(x)} images but {labels} has {len(y)} labels (count mismatch)"
        )
    if len(y) and int(y.max()) >= len(FASHION_MNIST_CLASSES):
        raise DatasetError(f"{labels}: label {int(y.max())} out of range 0..9")
    return x[:, None], y.astype(np.int64)


def _load_fashion_mnist(
    root: Path | None, val_fraction: float, seed: int, limit: int | None
) -> DatasetSplits:
    f = _find_fashion_files(root)
    train = _read_fashion_pair(f["train_images"], f["train_labels"])
    test = _read_fashion_pair(f["test_images"], f["test_labels"])
    if train[0].shape[2:] != test[0].shape[2:]:
        raise DatasetError(
            f"{f['test_images']}: image size {test[0].shape[2:]} differs from train "
            f"{train[0].shape[2:]}"
        )
    return _make_splits(
        "fashion-mnist", train, test, _uint8_to_tensor, val_fraction, seed, limit,
        FASHION_MNIST_CLASSES, crop_padding=2, hflip=True,
    )  # fmt: skip


def download_fashion_mnist(dest: str | Path | None = None, timeout: float = 60.0) -> Path:
    """Download the four Fashion-MNIST files into ``dest``, verifying MD5, writing atomically."""
    dest = Path(dest).expanduser() if dest is not None else CACHE_DIR.expanduser() / "fashion-mnist"
    dest.mkdir(parents=True, exist_ok=True)
    for fname, md5 in FASHION_MNIST_MD5.items():
        target = dest / fname
        if target.is_file() and hashlib.md5(target.read_bytes()).hexdigest() == md5:
            continue
        url = FASHION_MNIST_URL + fname
        with urllib.request.urlopen(url, timeout=timeout) as response:
            payload = response.read()
        got = hashlib.md5(payload).hexdigest()
        if got != md5:
            raise DatasetError(f"{url}: MD5 mismatch (got {got}, expected {md5}); not saved")
        fd, tmp = tempfile.mkstemp(prefix=f".{fname}.", dir=dest)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(payload)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return dest


# --------------------------------------------------------------------------- CIFAR (pickles)

_SAFE_GLOBALS: dict[tuple[str, str], object] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): codecs.encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that only resolves the numpy array constructors (no arbitrary code)."""

    def find_class(self, module: str, name: str) -> object:
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise DatasetError(f"refusing to unpickle global {module}.{name} (unsafe)") from None


def safe_unpickle(path: str | Path) -> object:
    """Load a (Python 2 or 3) pickle allowing only numpy arrays; errors name the file."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            return _RestrictedUnpickler(fh, encoding="bytes").load()
    except DatasetError as e:
        raise DatasetError(f"{path}: {e}") from None
    except OSError as e:
        raise DatasetError(f"{path}: cannot read file ({e})") from e
    except Exception as e:  # corrupt pickles raise many different exception types
        raise DatasetError(f"{path}: corrupt or truncated pickle ({type(e).__name__}: {e})") from e


def _get(d: dict, key: str, path: Path) -> object:
    """``d[key]`` accepting bytes or str keys."""
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise DatasetError(f"{path}: missing key {key!r} (have {sorted(map(repr, d))})")


def _cifar_data(obj: dict, path: Path) -> np.ndarray:
    """The validated ``data`` entry of a CIFAR batch dict as uint8 ``[N, 3, 32, 32]``."""
    data = _get(obj, "data", path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2:
        raise DatasetError(f"{path}: 'data' must be a uint8 array of shape [N, 3072]")
    if data.shape[1] != 3 * 32 * 32:
        raise DatasetError(f"{path}: 'data' rows have {data.shape[1]} values, expected 3072")
    return data.reshape(-1, 3, 32, 32)


def _read_cifar_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, ...]:
    obj = safe_unpickle(path)
    if not isinstance(obj, dict):
        raise DatasetError(f"{path}: expected a dict, got {type(obj).__name__}")
    data = _cifar_data(obj, path)
    try:
        labels = np.asarray(_get(obj, label_key, path), dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DatasetError(f"{path}: {label_key!r} is not a list of integers") from e
    if labels.shape != (len(data),):
        raise DatasetError(f"{path}: {len(data)} images but {labels.size} labels (count mismatch)")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise DatasetError(f"{path}: labels out of range 0..{num_classes - 1}")
    return data, labels


_CIFAR_LAYOUT = {
    "cifar10": {
        "subdir": "cifar-10-batches-py",
        "archive": "cifar-10-python.tar.gz",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": "test_batch",
        "meta": "batches.meta",
        "names": "label_names",
        "labels": "labels",
        "classes": 10,
    },
    "cifar100": {
        "subdir": "cifar-100-python",
        "archive": "cifar-100-python.tar.gz",
        "train": ["train"],
        "test": "test",
        "meta": "meta",
        "names": "fine_label_names",
        "labels": "fine_labels",
        "classes": 100,
    },
}


def _load_cifar(
    key: str, root: Path | None, val_fraction: float, seed: int, limit: int | None
) -> DatasetSplits:
    spec = _CIFAR_LAYOUT[key]
    base = root if root is not None else CACHE_DIR.expanduser()
    subdir, first = str(spec["subdir"]), spec["train"][0]
    candidates = [base / subdir, base]
    found = next((d for d in candidates if (d / first).is_file()), None)
    if found is None:
        files = ", ".join([*spec["train"], str(spec["test"]), str(spec["meta"])])
        raise DatasetError(
            f"{key} not found: no {first} in {' or '.join(map(str, candidates))}. Extract "
            f"{spec['archive']} so that DIR/{subdir}/{first} exists ({files}); "
            "pass --data-dir DIR."
        )
    n_cls = int(spec["classes"])
    parts = [_read_cifar_batch(found / f, str(spec["labels"]), n_cls) for f in spec["train"]]
    train = (np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))
    test = _read_cifar_batch(found / str(spec["test"]), str(spec["labels"]), n_cls)
    names = _cifar_names(found / str(spec["meta"]), str(spec["names"]), key, n_cls)
    return _make_splits(
        key, train, (test[0], test[1]), _uint8_to_tensor, val_fraction, seed, limit, names,
        crop_padding=4, hflip=True,
    )  # fmt: skip


def _cifar_names(meta: Path, names_key: str, key: str, num_classes: int) -> list[str]:
    """Class names from the meta pickle (fallback: built-in names / indices if it is absent)."""
    if not meta.is_file():
        return list(CIFAR10_CLASSES) if key == "cifar10" else [str(i) for i in range(num_classes)]
    obj = safe_unpickle(meta)
    if not isinstance(obj, dict):
        raise DatasetError(f"{meta}: expected a dict, got {type(obj).__name__}")
    raw = _get(obj, names_key, meta)
    if not isinstance(raw, Sequence) or len(raw) != num_classes:
        raise DatasetError(f"{meta}: {names_key!r} must list {num_classes} class names")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in raw]


# --------------------------------------------------------------------------- OOD image sets

_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def _convert_channels(x: Tensor, in_chans: int) -> Tensor:
    """Convert ``[N, C, H, W]`` between grayscale (ITU-R 601 luma) and RGB."""
    if x.shape[1] == in_chans:
        return x
    if x.shape[1] == 3 and in_chans == 1:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)
    if x.shape[1] == 1 and in_chans == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    raise ValueError(f"cannot convert {x.shape[1]} channels to {in_chans}")


def load_images_dir(path: str | Path, size: int | tuple[int, int], in_chans: int) -> Tensor:
    """Load an OOD image set as float32 ``[N, in_chans, H, W]`` in ``[-1, 1]``.

    ``path`` is a directory of PNG/JPEG images (searched recursively, sorted by path) or a
    CIFAR-format pickle file; images are resized (bilinear) to ``size`` = ``(H, W)``.
    """
    path = Path(path).expanduser()
    hw = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if in_chans not in (1, 3):
        raise ValueError(f"in_chans must be 1 or 3, got {in_chans}")
    if path.is_file():
        obj = safe_unpickle(path)
        if not isinstance(obj, dict):
            raise DatasetError(f"{path}: expected a CIFAR-format dict, got {type(obj).__name__}")
        x = _uint8_to_tensor(_cifar_data(obj, path))
        if tuple(x.shape[2:]) != hw and len(x):
            x = torch.nn.functional.interpolate(
                x, size=hw, mode="bilinear", align_corners=False, antialias=True
            )
        return _convert_channels(x, in_chans).clamp_(-1.0, 1.0)
    if not path.is_dir():
        raise DatasetError(f"{path}: no such image directory or CIFAR-format pickle file")
    from PIL import Image, UnidentifiedImageError

    files = sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in _IMAGE_SUFFIXES
    )
    if not files:
        raise DatasetError(f"{path}: no PNG/JPEG images found")
    mode = "L" if in_chans == 1 else "RGB"
    out = np.empty((len(files), hw[0], hw[1], in_chans), dtype=np.uint8)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as img:
                img = img.convert(mode).resize((hw[1], hw[0]), Image.Resampling.BILINEAR)
                out[i] = np.asarray(img).reshape(hw[0], hw[1], in_chans)
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise DatasetError(f"{f}: cannot read image ({e})") from e
    return _uint8_to_tensor(np.ascontiguousarray(out.transpose(0, 3, 1, 2)))


def trained_image_size(name: str, meta: dict) -> int | None:
    """The image size a checkpoint's model was trained at, for re-reading ``name`` from disk.

    Parameters
    ----------
    name : str
        The dataset to evaluate on.
    meta : dict
        The checkpoint's metadata (``dataset``, ``image_size`` as ``[H, W]``).

    Returns
    -------
    int or None
        ``H`` when ``name`` is an on-disk dataset (one of :data:`DISK_DATASETS`) and the one the
        model was trained on, so that evaluation decodes the images at the training size rather
        than the dataset's default; ``None`` (the default size) otherwise.
    """
    size = meta.get("image_size")
    if name not in DISK_DATASETS or name != meta.get("dataset") or not size:
        return None
    return int(size[0])
