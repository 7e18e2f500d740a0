"""Tests for poincare_resnet.data: dataset parsing, safety, augmentation and the batch loader."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from poincare_resnet.data import (
    DATASETS,
    DatasetError,
    TensorLoader,
    augment,
    load_dataset,
    load_images_dir,
)
from poincare_resnet.data import datasets as ds
from poincare_resnet.data.augment import random_crop, random_hflip

# --------------------------------------------------------------------------- helpers


def _idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    header = struct.pack(f">I{arr.ndim}I", magic, *arr.shape)
    return header + arr.astype(np.uint8).tobytes()


def _write_fashion(
    root: Path, n_train: int = 20, n_test: int = 10, gz: bool = True, seed: int = 0
) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": np.arange(n_train, dtype=np.uint8) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": np.arange(n_test, dtype=np.uint8) % 10,
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, arr in arrays.items():
        data = _idx_bytes(arr, 2051 if arr.ndim == 3 else 2049)
        if gz:
            (root / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (root / name).write_bytes(data)
    return arrays


def _cifar_batch(n: int, num_classes: int, label_key: bytes, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {
        b"batch_label": b"test batch",
        b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        label_key: [int(v) for v in np.arange(n) % num_classes],
    }


def _dump(path: Path, obj: object) -> None:
    path.write_bytes(pickle.dumps(obj, protocol=2))


def _write_cifar10(root: Path, per_batch: int = 6, n_test: int = 5) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True)
    for i in range(1, 6):
        _dump(d / f"data_batch_{i}", _cifar_batch(per_batch, 10, b"labels", i))
    _dump(d / "test_batch", _cifar_batch(n_test, 10, b"labels", 99))
    names = [n.encode() for n in ds.CIFAR10_CLASSES]
    _dump(d / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    return d


def _write_cifar100(root: Path, n_train: int = 30, n_test: int = 7) -> Path:
    d = root / "cifar-100-python"
    d.mkdir(parents=True)
    for name, n, seed in (("train", n_train, 1), ("test", n_test, 2)):
        batch = _cifar_batch(n, 100, b"fine_labels", seed)
        batch[b"coarse_labels"] = [0] * n
        _dump(d / name, batch)
    names = [f"class{i}".encode() for i in range(100)]
    _dump(d / "meta", {b"fine_label_names": names, b"coarse_label_names": [b"x"] * 20})
    return d


def _check_splits(s: ds.DatasetSplits) -> None:
    for x, y in ((s.train_x, s.train_y), (s.val_x, s.val_y), (s.test_x, s.test_y)):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (s.in_chans, *s.image_size) and len(x) == len(y)
        if len(x):
            assert x.min() >= -1.0 and x.max() <= 1.0
            assert 0 <= int(y.min()) and int(y.max()) < s.num_classes
    assert len(s.class_names) == s.num_classes


# --------------------------------------------------------------------------- digits & splits


def test_digits_shapes_range_disjoint_deterministic() -> None:
    s = load_dataset("digits", val_fraction=0.1, seed=3)
    _check_splits(s)
    assert (s.in_chans, s.image_size, s.crop_padding, s.hflip) == (1, (8, 8), 1, False)
    sizes = s.sizes()
    assert sum(sizes.values()) == 1797 and sizes["test"] == round(0.2 * 1797)
    assert s.train_x.min() == -1.0 and s.train_x.max() == 1.0
    # the three splits partition the dataset (as a multiset of images: digits has duplicates)
    from sklearn.datasets import load_digits

    parts = torch.cat([s.train_x, s.val_x, s.test_x]).flatten(1)
    full = torch.from_numpy(load_digits().images.reshape(1797, -1) / 8.0 - 1.0).float()
    assert sorted(map(tuple, parts.tolist())) == sorted(map(tuple, full.tolist()))
    again = load_dataset("digits", val_fraction=0.1, seed=3)
    assert torch.equal(s.train_x, again.train_x) and torch.equal(s.val_y, again.val_y)
    other = load_dataset("digits", val_fraction=0.1, seed=4)
    assert torch.equal(s.test_x, other.test_x)  # test split independent of seed
    assert not torch.equal(s.val_x, other.val_x)


def test_stratified_split_exact_disjoint() -> None:
    y = np.repeat(np.arange(5), [10, 20, 30, 7, 3])
    keep, held = ds.stratified_split(y, 0.25, seed=1)
    assert len(held) == round(0.25 * len(y))
    assert np.intersect1d(keep, held).size == 0
    assert np.array_equal(np.sort(np.concatenate([keep, held])), np.arange(len(y)))
    assert np.array_equal(held, ds.stratified_split(y, 0.25, seed=1)[1])
    keep0, held0 = ds.stratified_split(y, 0.0, seed=1)
    assert len(held0) == 0 and len(keep0) == len(y)


def test_limit_and_unknown_name() -> None:
    s = load_dataset("digits", limit=50, seed=1)
    assert len(s.train_y) == 50
    assert torch.equal(s.train_x, load_dataset("digits", limit=50, seed=1).train_x)
    with pytest.raises(ValueError, match="fashion-mnist") as exc:
        load_dataset("fashon-mnist")
    assert "cifar10" in str(exc.value)
    assert set(DATASETS) == {"digits", "fashion-mnist", "cifar10", "cifar100"}


# --------------------------------------------------------------------------- Fashion-MNIST


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_small_files(tmp_path: Path, gz: bool) -> None:
    arrays = _write_fashion(tmp_path, gz=gz)
    s = load_dataset("fashion-mnist", data_dir=tmp_path, val_fraction=0.1)
    _check_splits(s)
    assert s.sizes() == {"train": 18, "val": 2, "test": 10}
    assert (s.crop_padding, s.hflip, s.class_names[0]) == (2, True, "T-shirt/top")
    expected = torch.from_numpy(arrays["t10k-images-idx3-ubyte"].astype(np.float32)) / 127.5 - 1
    assert torch.allclose(s.test_x[:, 0], expected)
    assert s.test_y.tolist() == list(range(10))


def _corrupt(tmp_path: Path, fname: str, payload: bytes) -> str:
    _write_fashion(tmp_path)
    (tmp_path / fname).write_bytes(payload)
    with pytest.raises(DatasetError) as exc:
        load_dataset("fashion-mnist", data_dir=tmp_path)
    assert fname in str(exc.value)
    return str(exc.value)


def test_fashion_bad_gzip(tmp_path: Path) -> None:
    assert "gzip" in _corrupt(tmp_path, "train-images-idx3-ubyte.gz", b"this is not gzip data")


def test_fashion_truncated_gzip_stream(tmp_path: Path) -> None:
    good = gzip.compress(_idx_bytes(np.zeros((20, 28, 28), np.uint8), 2051))
    _corrupt(tmp_path, "train-images-idx3-ubyte.gz", good[: len(good) // 2])


def test_fashion_wrong_magic(tmp_path: Path) -> None:
    data = _idx_bytes(np.zeros((20, 28, 28), np.uint8), 2049)
    assert "magic" in _corrupt(tmp_path, "train-images-idx3-ubyte.gz", gzip.compress(data))


def test_fashion_truncated_content(tmp_path: Path) -> None:
    data = _idx_bytes(np.zeros((20, 28, 28), np.uint8), 2051)[:-100]
    assert "truncated" in _corrupt(tmp_path, "t10k-images-idx3-ubyte.gz", gzip.compress(data))


def test_fashion_count_mismatch(tmp_path: Path) -> None:
    labels = _idx_bytes(np.zeros(19, np.uint8), 2049)
    msg = _corrupt(tmp_path, "train-labels-idx1-ubyte.gz", gzip.compress(labels))
    assert "mismatch" in msg


def test_fashion_missing_dir_message(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as exc:
        load_dataset("fashion-mnist", data_dir=tmp_path / "nowhere")
    msg = str(exc.value)
    assert "--data-dir" in msg and "apt-get install dataset-fashion-mnist" in msg
    assert "train-images-idx3-ubyte.gz" in msg and "t10k-labels-idx1-ubyte.gz" in msg


def test_download_fashion_mnist_monkeypatched(tmp_path: Path, monkeypatch) -> None:
    payloads = {name: f"payload {name}".encode() for name in ds.FASHION_MNIST_MD5}
    md5 = {name: hashlib.md5(p).hexdigest() for name, p in payloads.items()}
    monkeypatch.setattr(ds, "FASHION_MNIST_MD5", md5)
    monkeypatch.setattr(
        ds.urllib.request,
        "urlopen",
        lambda url, timeout=None: io.BytesIO(payloads[url.rsplit("/", 1)[1]]),
    )
    out = ds.download_fashion_mnist(tmp_path / "fm")
    assert sorted(os.listdir(out)) == sorted(payloads)
    assert (out / "t10k-labels-idx1-ubyte.gz").read_bytes() == payloads["t10k-labels-idx1-ubyte.gz"]
    md5["train-images-idx3-ubyte.gz"] = "0" * 32
    with pytest.raises(DatasetError, match="MD5"):
        ds.download_fashion_mnist(tmp_path / "bad")
    assert not any((tmp_path / "bad").iterdir())  # nothing half-written


@pytest.mark.skipif(
    not ds.FASHION_MNIST_SYSTEM_DIR.is_dir(), reason="dataset-fashion-mnist not installed"
)
def test_fashion_real_files() -> None:
    s = load_dataset("fashion-mnist", val_fraction=0.1)
    assert s.sizes() == {"train": 54000, "val": 6000, "test": 10000}
    assert s.image_size == (28, 28) and s.in_chans == 1
    assert torch.bincount(s.val_y, minlength=10).tolist() == [600] * 10


# --------------------------------------------------------------------------- CIFAR


def test_cifar10_small(tmp_path: Path) -> None:
    d = _write_cifar10(tmp_path)
    s = load_dataset("cifar10", data_dir=tmp_path, val_fraction=0.2)
    _check_splits(s)
    assert s.sizes() == {"train": 24, "val": 6, "test": 5}
    assert (s.in_chans, s.image_size, s.crop_padding, s.hflip) == (3, (32, 32), 4, True)
    assert s.class_names == ds.CIFAR10_CLASSES
    raw = pickle.loads((d / "test_batch").read_bytes())[b"data"]
    expected = torch.from_numpy(raw.reshape(-1, 3, 32, 32).astype(np.float32)) / 127.5 - 1
    assert torch.allclose(s.test_x, expected)
    # the batch directory itself is accepted as data_dir too
    assert load_dataset("cifar10", data_dir=d, val_fraction=0.2).sizes() == s.sizes()


def test_cifar100_small_str_keys(tmp_path: Path) -> None:
    d = _write_cifar100(tmp_path)
    # str keys (Python 3 pickles) are accepted as well as bytes keys
    batch = pickle.loads((d / "test").read_bytes())
    _dump(d / "test", {k.decode(): v for k, v in batch.items()})
    s = load_dataset("cifar100", data_dir=tmp_path, val_fraction=0.1)
    _check_splits(s)
    assert s.num_classes == 100 and s.class_names[7] == "class7"
    assert s.sizes() == {"train": 27, "val": 3, "test": 7}


def test_cifar_malicious_pickle_refused(tmp_path: Path) -> None:
    d = _write_cifar10(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    _dump(d / "data_batch_3", {b"data": Evil(), b"labels": [0]})
    with pytest.raises(DatasetError, match="data_batch_3") as exc:
        load_dataset("cifar10", data_dir=tmp_path)
    assert "system" in str(exc.value)
    assert not marker.exists()


def test_cifar_truncated_pickle(tmp_path: Path) -> None:
    d = _write_cifar10(tmp_path)
    raw = (d / "test_batch").read_bytes()
    (d / "test_batch").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DatasetError, match="test_batch"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_cifar_missing_dir_message(tmp_path: Path) -> None:
    with pytest.raises(DatasetError) as exc:
        load_dataset("cifar10", data_dir=tmp_path)
    msg = str(exc.value)
    assert "cifar-10-python.tar.gz" in msg and "cifar-10-batches-py/data_batch_1" in msg
    assert "--data-dir" in msg
    with pytest.raises(DatasetError, match="cifar-100-python/train"):
        load_dataset("cifar100", data_dir=tmp_path)


# --------------------------------------------------------------------------- OOD images


def test_load_images_dir_png_and_pickle(tmp_path: Path) -> None:
    from PIL import Image

    img_dir = tmp_path / "imgs"
    (img_dir / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, sub in enumerate(["", "sub"]):
        arr = rng.integers(0, 256, (20, 12, 3), dtype=np.uint8)
        Image.fromarray(arr).save(img_dir / sub / f"im{i}.png")
    (img_dir / "notes.txt").write_text("ignored")
    x = load_images_dir(img_dir, 8, in_chans=1)
    assert x.shape == (2, 1, 8, 8) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert load_images_dir(img_dir, (6, 10), in_chans=3).shape == (2, 3, 6, 10)

    pkl = tmp_path / "ood_batch"
    _dump(pkl, _cifar_batch(4, 10, b"labels", 5))
    assert load_images_dir(pkl, 32, in_chans=3).shape == (4, 3, 32, 32)
    g = load_images_dir(pkl, 28, in_chans=1)
    assert g.shape == (4, 1, 28, 28) and g.min() >= -1 and g.max() <= 1
    with pytest.raises(DatasetError):
        load_images_dir(tmp_path / "missing", 8, 1)


# --------------------------------------------------------------------------- augmentation


def test_random_crop_shape_identity_determinism() -> None:
    x = torch.randn(6, 3, 5, 7)
    assert torch.equal(random_crop(x, 0, torch.Generator().manual_seed(0)), x)
    a = random_crop(x, 2, torch.Generator().manual_seed(1))
    b = random_crop(x, 2, torch.Generator().manual_seed(1))
    assert a.shape == x.shape and torch.equal(a, b)
    # each output is a shifted window of the zero-padded input
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(len(x)):
        windows = [padded[i, :, r : r + 5, c : c + 7] for r in range(5) for c in range(5)]
        assert any(torch.equal(a[i], w) for w in windows)


def test_random_hflip_twice_identity() -> None:
    x = torch.randn(16, 2, 4, 4)
    y = random_hflip(x, torch.Generator().manual_seed(3))
    assert torch.equal(random_hflip(y, torch.Generator().manual_seed(3)), x)
    flipped = [not torch.equal(y[i], x[i]) for i in range(len(x))]
    assert 0 < sum(flipped) < len(x)
    for i in range(len(x)):
        assert torch.equal(y[i], x[i].flip(-1) if flipped[i] else x[i])
    z1 = augment(x, 1, True, torch.Generator().manual_seed(5))
    z2 = augment(x, 1, True, torch.Generator().manual_seed(5))
    assert torch.equal(z1, z2) and z1.shape == x.shape


# --------------------------------------------------------------------------- TensorLoader


def _loader_data(n: int = 23) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 1, 4, 4).contiguous()
    return x, torch.arange(n)


def test_loader_covers_all_once_and_deterministic() -> None:
    x, y = _loader_data()
    loader = TensorLoader(x, y, batch_size=5, shuffle=True, seed=7)
    assert len(loader) == 5
    loader.set_epoch(0)
    e0 = torch.cat([yb for _, yb in loader])
    assert sorted(e0.tolist()) == list(range(23))
    loader.set_epoch(1)
    e1 = torch.cat([yb for _, yb in loader])
    assert sorted(e1.tolist()) == list(range(23)) and not torch.equal(e0, e1)
    other = TensorLoader(x, y, batch_size=5, shuffle=True, seed=7)
    other.set_epoch(1)
    assert torch.equal(torch.cat([yb for _, yb in other]), e1)
    for xb, yb in other:
        assert torch.equal(xb[:, 0, 0, 0].long(), yb)
    dl = TensorLoader(x, y, batch_size=5, drop_last=True)
    assert len(dl) == 4 and sum(len(yb) for _, yb in dl) == 20


def test_loader_resume_mid_epoch_identical() -> None:
    x, y = _loader_data()
    x = torch.randn(23, 1, 6, 6)
    kw = dict(batch_size=4, shuffle=True, seed=3, augment=(2, True))
    ref = TensorLoader(x, y, **kw)
    ref.set_epoch(2)
    full = list(ref)
    run = TensorLoader(x, y, **kw)
    run.set_epoch(2)
    it = iter(run)
    for _ in range(3):
        next(it)
    state = run.state_dict()
    assert state == {"epoch": 2, "position": 3}
    resumed = TensorLoader(x, y, **kw)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # same epoch: the resume position is kept
    rest = list(resumed)
    assert len(rest) == len(full) - 3
    for (xa, ya), (xb, yb) in zip(full[3:], rest, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert len(list(resumed)) == len(full)  # the next pass starts from the beginning
    assert [b[1].tolist() for b in ref.iter_from(4)] == [b[1].tolist() for b in full[4:]]


def test_loader_two_ranks_partition() -> None:
    x, y = _loader_data(22)
    loaders = [
        TensorLoader(x, y, batch_size=4, seed=1, rank=r, world_size=2, augment=(1, False))
        for r in range(2)
    ]
    parts = []
    for ld in loaders:
        ld.set_epoch(5)
        parts.append(torch.cat([yb for _, yb in ld]))
    assert len(loaders[0]) == len(loaders[1]) == 3
    assert len(set(parts[0].tolist()) & set(parts[1].tolist())) == 0
    assert sorted(parts[0].tolist() + parts[1].tolist()) == list(range(22))
    # odd size: padded by wrap-around so both ranks see the same number of samples
    x, y = _loader_data(21)
    odd = [TensorLoader(x, y, batch_size=4, seed=1, rank=r, world_size=2) for r in range(2)]
    seen = [torch.cat([yb for _, yb in ld]) for ld in odd]
    assert len(seen[0]) == len(seen[1]) == 11
    assert set(seen[0].tolist()) | set(seen[1].tolist()) == set(range(21))
