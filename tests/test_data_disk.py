"""On-disk datasets: the three layouts, their errors, seeded augmentation and exact resume."""

from __future__ import annotations

import signal
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli_helpers import ckpt_steps, launch_train, sigkill_when
from PIL import Image

from poincare_resnet import _cpp, cli
from poincare_resnet.data import (
    DatasetError,
    DiskLoader,
    ImageSet,
    ImageSpec,
    load_dataset,
    trained_image_size,
)
from poincare_resnet.data import disk_loader as dl
from poincare_resnet.data.images import crop_box, eval_transform, sample_generator
from poincare_resnet.training.checkpoint import load_checkpoint
from poincare_resnet.training.trainer import TrainConfig, train

WNIDS = ["n03", "n01", "n02", "n00"]  # wnids.txt order; the labels follow the sorted order
SIZE = 16


def _pixels(seed: int, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _image(path: Path, seed: int, size: int = SIZE) -> np.ndarray:
    """Write a seeded random RGB image (format from the suffix); return its pixels."""
    pixels = _pixels(seed, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return pixels


def _tiny_tree(root: Path, per_class: int = 40, val_per_class: int = 3, words: bool = True):
    """A Tiny-ImageNet tree of JPEGs (one PNG in val: ``val_0.png`` of class n03)."""
    (root / "wnids.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("\n".join(WNIDS) + "\n")
    if words:
        (root / "words.txt").write_text("".join(f"{w}\tthing {w[-1]}\n" for w in WNIDS))
    rows = []
    for c, wnid in enumerate(WNIDS):
        for i in range(per_class):
            _image(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", 1000 * c + i)
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("ignored\n")
        for i in range(val_per_class):
            name = f"val_{c * val_per_class + i}" + (".png" if c == i == 0 else ".JPEG")
            _image(root / "val" / "images" / name, 10**6 + 100 * c + i)
            rows.append(f"{name}\t{wnid}\t0\t0\t8\t8")
    (root / "val" / "val_annotations.txt").write_text("\n".join(rows) + "\n")
    return root


def _folder_tree(root: Path, counts: dict[str, int], suffix: str = ".png") -> Path:
    for c, (name, n) in enumerate(counts.items()):
        for i in range(n):
            sub = "nested/" if i % 2 else ""
            _image(root / name / f"{sub}{i}{suffix}", 500 * c + i)
    return root


@pytest.fixture(autouse=True, scope="module")
def _pytorch_path():
    """The PyTorch path of the layers: these tests are about the data, and they must not wait
    for (or on another process's lock of) a native-kernel build."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_cpp, "_enabled", False)
        mp.setenv("POINCARE_RESNET_NATIVE", "0")
        yield


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return _tiny_tree(tmp_path_factory.mktemp("disk") / "tiny")


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


# ------------------------------------------------------------------------------ layouts


def test_tiny_imagenet_layout_classes_labels_counts_and_pixels(tiny):
    data = load_dataset("tiny-imagenet", tiny, val_fraction=0.25, seed=0, image_size=SIZE)
    assert data.class_names == [f"thing {w[-1]}" for w in sorted(WNIDS)]  # words.txt, sorted
    assert data.num_classes == 4 and data.in_chans == 3 and data.image_size == (SIZE, SIZE)
    assert data.sizes() == {"train": 120, "val": 40, "test": 12}
    assert torch.bincount(data.val_y).tolist() == [10, 10, 10, 10]  # stratified
    # train labels follow the sorted wnids: n00 -> 0 ... n03 -> 3
    for split_x, split_y in ((data.train_x, data.train_y), (data.val_x, data.val_y)):
        for f, y in zip(split_x.files, split_y.tolist(), strict=True):
            assert Path(f).parts[-3] == sorted(WNIDS)[y]
    # the test split is val/, sorted by file name; val_0.png (lossless) is class n03 = label 3
    assert [Path(f).name for f in data.test_x.files][:2] == ["val_0.png", "val_1.JPEG"]
    assert data.test_y[0] == 3
    want = _pixels(10**6)  # the seeded pixels of val_0.png
    got = data.test_x[0]
    torch.testing.assert_close(got, torch.from_numpy(want).permute(2, 0, 1).float() / 127.5 - 1)
    assert data.test_x[0:3].shape == (3, 3, SIZE, SIZE) and data.test_x.shape == (12, 3, 16, 16)


def test_imagenet_layout_and_imagefolder_layout(tmp_path):
    counts = {"n2": 3, "n1": 2}
    _folder_tree(tmp_path / "inet" / "train", counts, ".JPEG")
    _folder_tree(tmp_path / "inet" / "val", {"n2": 1, "n1": 2}, ".JPEG")
    data = load_dataset("imagenet", tmp_path / "inet", val_fraction=0.2, image_size=8)
    assert data.class_names == ["n1", "n2"] and data.image_size == (8, 8)
    assert data.sizes() == {"train": 4, "val": 1, "test": 3}
    assert data.test_y.tolist() == [0, 0, 1]  # val/n1 (2 images), then val/n2
    assert data.test_x[:].shape == (3, 3, 8, 8)

    root = _folder_tree(tmp_path / "folder", {"cat": 10, "ant": 10, "bee": 20})
    (root / "cat" / "notes.txt").write_text("not an image")
    _image(root / "cat" / ".hidden.png", 1)
    data = load_dataset("imagefolder", root, val_fraction=0.25, image_size=SIZE)
    assert data.class_names == ["ant", "bee", "cat"]
    assert data.sizes() == {"train": 27, "val": 9, "test": 4}  # 10 % test, then 25 % val
    assert torch.bincount(data.test_y).tolist() == [1, 2, 1]
    files = [*data.train_x.files, *data.val_x.files, *data.test_x.files]
    assert len(set(files)) == 40 and not any(".hidden" in f or "notes" in f for f in files)
    for f, y in zip(data.test_x.files, data.test_y.tolist(), strict=True):
        assert Path(f).relative_to(root).parts[0] == data.class_names[y]


def test_eval_transform_resizes_the_shorter_side_and_centre_crops():
    x = torch.arange(3 * 4 * 8, dtype=torch.float32).view(3, 4, 8) % 256
    out = eval_transform(x, ImageSpec(4))  # 4 x 8: already the short side, central 4 columns
    torch.testing.assert_close(out, x[:, :, 2:6] / 127.5 - 1)
    wide = eval_transform(torch.full((3, 20, 40), 255.0), ImageSpec(8, crop_fraction=0.5))
    assert wide.shape == (3, 8, 8) and bool((wide == 1).all())


# ------------------------------------------------------------------------------ errors


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:200])


def _bad_tree(case: str, root: Path) -> tuple[Path, str, str]:
    """``(data dir, dataset, text the error must contain)`` for one bad input."""
    if case == "not-a-directory":
        root.mkdir(parents=True)
        (root / "file").write_text("x")
        return root / "file", "imagefolder", str(root / "file")
    if case == "empty-class":
        _folder_tree(root, {"a": 2})
        (root / "b").mkdir()
        (root / "b" / "readme.txt").write_text("no images here")
        return root, "imagefolder", f"{root / 'b'}: class 'b' has no images"
    tree = _tiny_tree(root, per_class=2, val_per_class=1, words=False)
    ann = tree / "val" / "val_annotations.txt"
    if case == "missing-wnids":
        (tree / "wnids.txt").unlink()
        return tree, "tiny-imagenet", f"{tree / 'wnids.txt'}: missing"
    if case == "missing-val-annotations":
        ann.unlink()
        return tree, "tiny-imagenet", f"{ann}: missing"
    if case == "val-class-not-in-wnids":
        ann.write_text(ann.read_text().replace("\tn02\t", "\tn99\t"))
        return tree, "tiny-imagenet", f"{ann}:3: class 'n99' is not in"
    if case == "train-classes-differ":
        (tree / "train" / "n07" / "images").mkdir(parents=True)
        return tree, "tiny-imagenet", f"{tree / 'train'}: class list differs"
    if case == "truncated-image":
        _truncate(tree / "train" / "n01" / "images" / "n01_1.JPEG")
        return tree, "tiny-imagenet", f"{tree / 'train' / 'n01' / 'images' / 'n01_1.JPEG'}: "
    if case == "not-an-image":
        (tree / "train" / "n02" / "images" / "n02_0.JPEG").write_text("plain text")
        return tree, "tiny-imagenet", f"{tree / 'train' / 'n02' / 'images' / 'n02_0.JPEG'}: "
    raise AssertionError(case)


BAD_CASES = [
    "not-a-directory", "empty-class", "missing-wnids", "missing-val-annotations",
    "val-class-not-in-wnids", "train-classes-differ", "truncated-image", "not-an-image",
]  # fmt: skip


@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_on_disk_input_exits_2_with_one_line_naming_the_file(case, tmp_path, capsys):
    data_dir, dataset, needle = _bad_tree(case, tmp_path / "data")
    before = _snapshot(tmp_path / "data")
    args = ["train", "--dataset", dataset, "--data-dir", str(data_dir), "--image-size", "8",
            "--model", "poincare_resnet20", "--model-kwargs", "depth=8", "--epochs", "1",
            "--batch-size", "4", "--workers", "0", "--no-progress", "--val-fraction", "0.25",
            "--out", str(tmp_path / "run")]  # fmt: skip
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and needle in err, err
    assert _snapshot(tmp_path / "data") == before  # nothing written into the data dir


def test_mismatched_imagenet_class_lists_and_flat_val_are_named(tmp_path):
    _folder_tree(tmp_path / "train", {"n1": 1, "n2": 1})
    _folder_tree(tmp_path / "val", {"n1": 1, "n3": 1})
    with pytest.raises(DatasetError, match=r"val: class list differs .*missing \['n2'\].*n3"):
        load_dataset("imagenet", tmp_path)
    flat = tmp_path / "flat"
    _folder_tree(flat / "train", {"n1": 1})
    _image(flat / "val" / "x.JPEG", 0)
    with pytest.raises(DatasetError, match="must be sorted into"):
        load_dataset("imagenet", flat)
    with pytest.raises(DatasetError, match="split folders, not classes; .* --dataset imagenet"):
        load_dataset("imagefolder", flat)


def test_a_decoding_error_in_a_worker_reaches_the_main_process_as_one_line(tiny, tmp_path):
    bad = tmp_path / "bad.JPEG"
    _image(bad, 0)
    _truncate(bad)
    images = ImageSet(
        [str(tiny / "train" / "n00" / "images" / "n00_0.JPEG"), str(bad)], ImageSpec(8)
    )
    loader = DiskLoader(images, torch.tensor([0, 1]), batch_size=1, shuffle=False, workers=1)
    with pytest.raises(DatasetError) as info:
        list(loader)
    message = str(info.value)
    assert message.startswith(f"{bad}: cannot decode image") and "\n" not in message
    assert "Traceback" not in message and loader.position == 1  # the good batch was served


# ------------------------------------------------------------------------------ augmentation


def test_crop_boxes_fit_and_follow_the_scale_and_aspect_ranges():
    for seed in range(200):
        g = sample_generator(seed, 0, 0)
        top, left, h, w = crop_box(40, 60, (0.08, 1.0), g)
        assert 0 <= top <= 40 - h and 0 <= left <= 60 - w and h >= 1 and w >= 1
        area = h * w / (40 * 60)
        assert 0.08 * 0.8 <= area <= 1.0  # rounding of the side lengths
        assert 3 / 4 - 0.15 <= w / h <= 4 / 3 + 0.15 or area > 0.5  # fallback: central crop
    # a scale that cannot fit (the whole 1 x 100 strip at aspect <= 4/3): central fallback
    assert crop_box(1, 100, (0.9, 1.0), sample_generator(0, 0, 0)) == (0, 49, 1, 1)


def _train_images(tiny: Path, size: int = 8) -> tuple[ImageSet, torch.Tensor]:
    data = load_dataset("tiny-imagenet", tiny, val_fraction=0.25, image_size=size)
    return data.train_x, data.train_y


def _batches(loader: DiskLoader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b, strict=True)
    )


def test_augmentation_is_a_function_of_seed_epoch_and_sample(tiny):
    images, y = _train_images(tiny)
    first = _batches(DiskLoader(images, y, 16, seed=3))
    assert _same(first, _batches(DiskLoader(images, y, 16, seed=3)))
    other_epoch = DiskLoader(images, y, 16, seed=3)
    other_epoch.set_epoch(1)
    assert not _same(first, _batches(other_epoch))
    # a sample's crop does not depend on its batch: same sample, different batch sizes
    a, b = DiskLoader(images, y, 16, seed=3), DiskLoader(images, y, 40, seed=3)
    order = a.indices().tolist()
    xa = torch.cat([x for x, _ in first])
    xb = torch.cat([x for x, _ in _batches(b)])
    assert torch.equal(xa, xb) and len(order) == 120
    # the augmentation does something: unaugmented decoding differs, flips happen
    plain = torch.cat([x for x, _ in _batches(DiskLoader(images, y, 16, seed=3, augment=False))])
    assert not torch.equal(xa, plain)
    ref = images[torch.tensor(order)]
    assert torch.equal(plain, ref)  # augment=False is the evaluation transform


def test_worker_count_does_not_change_the_batches(tiny):
    images, y = _train_images(tiny)
    serial = _batches(DiskLoader(images, y, 32, seed=5, workers=0))
    assert _same(serial, _batches(DiskLoader(images, y, 32, seed=5, workers=2)))


def test_resume_skips_without_decoding_and_yields_the_remaining_batches(tiny, monkeypatch):
    images, y = _train_images(tiny)
    full = DiskLoader(images, y, 16, seed=7)
    full.set_epoch(2)
    reference = _batches(full)
    it = iter(full)
    next(it), next(it), next(it)
    state = full.state_dict()
    assert state["epoch"] == 2 and state["position"] == 3 and state["seed"] == 7
    decoded: list[str] = []
    real = dl.decode_rgb
    monkeypatch.setattr(dl, "decode_rgb", lambda f: decoded.append(f) or real(f))
    resumed = DiskLoader(images, y, 16, seed=7)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)  # the trainer's call: same epoch keeps the position
    rest = _batches(resumed)
    assert _same(rest, reference[3:])
    assert len(decoded) == 120 - 3 * 16  # the skipped 48 images were never decoded
    with pytest.raises(DatasetError, match="seeded 7, not 8"):
        DiskLoader(images, y, 16, seed=8).load_state_dict(state)
    with pytest.raises(DatasetError, match="training files differ"):
        DiskLoader(images.subset(np.arange(119)), y[:119], 16, seed=7).load_state_dict(state)


# ------------------------------------------------------------------------------ end to end

TINY_RUN = ["--dataset", "tiny-imagenet", "--image-size", str(SIZE), "--model",
            "poincare_resnet20", "--model-kwargs", "depth=8", "--epochs", "2", "--batch-size",
            "32", "--val-fraction", "0.2", "--no-progress", "--log-every", "1",
            "--threads", "1"]  # fmt: skip
# 160 train images, 20 % val: 128 train, batch 32: 4 steps per epoch, 8 in all


def _cfg(tiny: Path, out: Path, **kw) -> TrainConfig:
    base = dict(
        dataset="tiny-imagenet", data_dir=str(tiny), image_size=SIZE, model="poincare_resnet20",
        model_kwargs={"depth": 8}, epochs=2, batch_size=32, val_fraction=0.2, progress=False,
        log_every=1, workers=0, out=str(out),
    )  # fmt: skip
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def reference_dir(tiny, tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("disk_ref") / "ref"
    train(_cfg(tiny, run), log=lambda _m: None)
    return run


@pytest.fixture(scope="module")
def reference_run(reference_dir) -> dict[str, torch.Tensor]:
    return load_checkpoint(reference_dir / "last.safetensors").model_state


def test_evaluation_reads_the_images_at_the_size_the_model_was_trained_at(
    tiny, reference_dir, monkeypatch
):
    import poincare_resnet.api as api

    sizes = []

    def spy(*args, **kwargs):
        sizes.append(kwargs.get("image_size"))
        return load_dataset(*args, **kwargs)

    monkeypatch.setattr(api, "load_dataset", spy)
    result = api.evaluate_checkpoint(reference_dir / "best.safetensors", data_dir=str(tiny))
    assert sizes == [SIZE] and SIZE != 64  # 64: tiny-imagenet's default size
    assert result["n"] == 4 * 3  # the val images (the test split), decoded at SIZE
    meta = {"dataset": "tiny-imagenet", "image_size": [SIZE, SIZE]}
    assert trained_image_size("tiny-imagenet", meta) == SIZE
    assert trained_image_size("imagenet", meta) is None  # another dataset: its default
    assert trained_image_size("digits", {"dataset": "digits", "image_size": [8, 8]}) is None


def _assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


def test_interrupted_mid_epoch_run_resumes_to_the_same_weights(tiny, reference_run, tmp_path):
    run = tmp_path / "run"
    before = _snapshot(tiny)
    assert train(_cfg(tiny, run, max_steps=2, ckpt_every_steps=1), log=lambda _m: None) == {}
    messages: list[str] = []
    for max_steps in (6, None):  # resume mid-epoch 1, stop mid-epoch 2, resume to the end
        summary = train(
            TrainConfig(progress=False, log_every=1, max_steps=max_steps, workers=0),
            resume=str(run), log=messages.append,
        )  # fmt: skip
    assert sum(m.startswith(f"resumed {run}") for m in messages) == 2
    assert summary["sizes"] == {"train": 128, "val": 32, "test": 12}
    _assert_same_weights(reference_run, load_checkpoint(run / "last.safetensors").model_state)
    assert _snapshot(tiny) == before


@pytest.mark.slow  # 2 interpreter starts: 44 s here; the in-process resume test covers it fast
@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_mid_epoch_then_resume_reproduces_the_run(tiny, reference_run, tmp_path, workers):
    """Killed (SIGKILL) mid-epoch 1 of 2, resumed with ``--resume``: the same final weights."""
    run = tmp_path / "killed"
    common = [*TINY_RUN, "--data-dir", str(tiny), "--workers", str(workers)]
    proc = launch_train([*common, "--out", str(run), "--ckpt-every-steps", "1"])
    # mid-epoch 1 (4 steps per epoch)
    sigkill_when(proc, lambda: any(s >= 2 for s in ckpt_steps(run)), timeout=300, poll=0.005)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read()
    steps = ckpt_steps(run)
    assert steps and max(steps) % 4 != 0, steps  # the resume point is inside an epoch
    proc = launch_train([*common, "--resume", str(run)])
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "resumed" in out and '"test_top1"' in out
    _assert_same_weights(reference_run, load_checkpoint(run / "last.safetensors").model_state)
