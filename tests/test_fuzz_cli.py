"""Fuzzed bad invocations of ``train``, ``evaluate``, ``ood``, ``attack`` and ``explain``.

Every generated invocation is wrong in one way: a bad option value, a missing / empty /
truncated / corrupt / wrong-shape data file, a checkpoint of another model, a truncated or
tampered checkpoint, an occupied or unwritable output directory, ``--overwrite`` on a
directory holding foreign files, a broken run to ``--resume``. Each must exit 2 with one line
on stderr naming the problem and no traceback, and a digest of the whole tree around the run
(the inputs, ``--out``, its parent and the working directory) must be unchanged: nothing
created, nothing deleted, no checkpoint altered.

The CLI runs in-process (``cli.main(argv)``) on copies of one tiny trained run prepared once
per module, so the 200+ cases take seconds.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import pickle
import re
import shutil
import struct
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli_helpers import one_epoch_digits
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from poincare_resnet import cli
from poincare_resnet.models.registry import create_model
from poincare_resnet.training.checkpoint import load_checkpoint, save_checkpoint
from poincare_resnet.training.trainer import TrainConfig, train

N_CASES = int(os.environ.get("FUZZ_CASES", "240"))  # 240 in CI; fewer only for local runs
TINY_MODEL = ["depth=8", "widths=[2,2,2]"]
TRAIN_BASE = [
    "--dataset",
    "digits",
    "--limit-train",
    "32",
    "--batch-size",
    "32",
    "--epochs",
    "1",
    "--no-progress",
    "--threads",
    "1",
    "--model-kwargs",
    *TINY_MODEL,
]
FASHION = {
    "train-images-idx3-ubyte.gz": (2051, (4, 28, 28)),
    "train-labels-idx1-ubyte.gz": (2049, (4,)),
    "t10k-images-idx3-ubyte.gz": (2051, (4, 28, 28)),
    "t10k-labels-idx1-ubyte.gz": (2049, (4,)),
}
A_FASHION_FILE = r"(train|t10k)-(images|labels)-idx[13]-ubyte\.gz"


# ------------------------------------------------------------------------------ the tree


def tree_digest(root: Path) -> dict[str, tuple]:
    """Every entry under ``root`` (links not followed): kind, permission bits, content hash."""
    out: dict[str, tuple] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in [*dirnames, *filenames]:
            p = Path(dirpath) / name
            rel = str(p.relative_to(root))
            st_ = p.lstat()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", st_.st_mode & 0o7777)
            else:
                out[rel] = (
                    "file",
                    st_.st_mode & 0o7777,
                    hashlib.sha256(p.read_bytes()).hexdigest(),
                )
    return out


# ------------------------------------------------------------------------------ prepared run


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """One tiny trained run (1 epoch, 32 images, depth 8, widths 2-2-2) and a sandbox root."""
    root = tmp_path_factory.mktemp("fuzz")
    cfg = TrainConfig(
        **one_epoch_digits(
            limit_train=32,
            log_every=1,
            out=str(root / "run"),
            model_kwargs={"depth": 8, "widths": [2, 2, 2]},
        )
    )
    train(cfg, log=lambda _m: None)
    return root


def _idx(path: Path, magic: int, dims: tuple[int, ...], compress: bool = True) -> bytes:
    payload = struct.pack(f">I{len(dims)}I", magic, *dims) + bytes(int(np.prod(dims)))
    data = gzip.compress(payload, mtime=0) if compress else payload
    path.write_bytes(data)
    return data


def fashion_dir(sb: Path, mode: str, which: int) -> tuple[Path, str]:
    """A Fashion-MNIST directory broken as ``mode`` (in file number ``which``)."""
    d = sb / "fmnist"
    d.mkdir()
    names = list(FASHION)
    bad = names[which % 4]
    for name, (magic, dims) in FASHION.items():
        target = d / name
        if mode == "missing" and name == bad:
            continue
        if name != bad or mode in ("count-mismatch", "empty-dims", "label-range"):
            if mode == "count-mismatch" and name.startswith("train-labels"):
                dims = (5,)
            if mode == "empty-dims" and name.startswith("train-images"):
                dims = (4, 0, 28)
            _idx(target, magic, dims)
            if mode == "label-range" and name.startswith("train-labels"):
                target.write_bytes(
                    gzip.compress(struct.pack(">II", 2049, 4) + bytes([0, 1, 2, 77]))
                )
            continue
        if mode == "empty":
            target.write_bytes(b"")
        elif mode == "truncated":
            data = _idx(target, magic, dims)
            target.write_bytes(data[: len(data) // 2])
        elif mode == "corrupt":
            target.write_bytes(b"\x1f\x8b\x08\x00this is not deflate data")
        elif mode == "wrong-magic":
            _idx(target, 2049 if magic == 2051 else 2051, dims)
        elif mode == "trailing":
            target.write_bytes(gzip.compress(struct.pack(">II", magic, dims[0]) + b"\0" * 999))
    expected = {
        "missing": "Fashion-MNIST not found in",
        "empty": A_FASHION_FILE + ": (truncated file|bad gzip)",
        "truncated": A_FASHION_FILE + ": bad gzip data, corrupt or truncated",
        "corrupt": A_FASHION_FILE + ": bad gzip data",
        "wrong-magic": A_FASHION_FILE + ": wrong magic number",
        "trailing": A_FASHION_FILE + ": (truncated file|.*unexpected trailing bytes)",
        "count-mismatch": "count mismatch",
        "empty-dims": "empty image dimensions",
        "label-range": "label 77 out of range",
    }[mode]
    return d, expected


def cifar_dir(sb: Path, mode: str, n: int = 4) -> tuple[Path, str]:
    """A CIFAR-10 directory: ``valid`` (a 3-channel dataset), or broken as ``mode``."""
    d = sb / "cifar" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rows = 3000 if mode == "wrong-shape" else 3072
    batch = {b"data": np.zeros((n, rows), dtype=np.uint8), b"labels": list(range(n))}
    blob = pickle.dumps(batch, protocol=2)
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        (d / name).write_bytes(blob)
    first = d / "data_batch_1"
    if mode == "truncated":
        first.write_bytes(blob[: len(blob) // 2])
    elif mode == "empty":
        first.write_bytes(b"")
    elif mode == "corrupt":
        first.write_bytes(os.urandom(64))
    elif mode == "not-a-dict":
        first.write_bytes(pickle.dumps([1, 2, 3]))
    elif mode == "unsafe":
        first.write_bytes(pickle.dumps(print))
    elif mode == "labels-mismatch":
        first.write_bytes(pickle.dumps({b"data": batch[b"data"], b"labels": [0]}, protocol=2))
    elif mode == "missing":
        for p in d.iterdir():
            p.unlink()
    expected = {
        "valid": "dataset cifar10 has 3 (channels|classes)|3 channels",
        "truncated": "data_batch_1: corrupt or truncated",
        "empty": "data_batch_1: corrupt or truncated",
        "corrupt": "data_batch_1: (corrupt or truncated|refusing to unpickle)",
        "not-a-dict": "data_batch_1: expected a dict",
        "unsafe": "refusing to unpickle",
        "labels-mismatch": "count mismatch",
        "wrong-shape": "rows have 3000 values, expected 3072",
        "missing": "cifar10 not found",
    }[mode]
    return d.parent, expected


# ------------------------------------------------------------------------------ checkpoints

CKPT_KINDS = [
    "missing",
    "empty",
    "truncated",
    "tampered",
    "other-model",
    "other-model-legacy",
    "config-unknown-arg",
    "config-bad-value",
    "empty-run-dir",
    "text-file",
    "future-format",
]


def _header_end(data: bytes) -> int:
    """End of the JSON object in a safetensors header (after it: padding spaces)."""
    n = int.from_bytes(data[:8], "little")
    return 8 + len(data[8 : 8 + n].rstrip(b" "))


def _resave(src: Path, dst: Path, meta_edit: Callable[[dict], None], state=None) -> Path:
    ck = load_checkpoint(src)
    meta = {k: v for k, v in ck.meta.items() if k not in ("format_version", "sha256")}
    meta_edit(meta)
    return save_checkpoint(dst, model_state=ck.model_state if state is None else state, meta=meta)


def bad_checkpoint(sb: Path, kind: str, draw) -> tuple[str, str]:
    """A checkpoint argument broken as ``kind``, and the message that must name it."""
    best = sb / "run" / "best.safetensors"
    target = sb / "inputs" / "ck.safetensors"
    target.parent.mkdir(exist_ok=True)
    data = best.read_bytes()
    corrupt = "truncated/corrupt checkpoint"
    if kind == "missing":
        return str(sb / "inputs" / "nope.safetensors"), "does not exist"
    if kind == "empty":
        target.write_bytes(b"")
        return str(target), corrupt
    if kind == "truncated":
        cut = draw(st.integers(0, len(data) - 1))
        target.write_bytes(data[:cut])
        return str(target), corrupt
    if kind == "tampered":
        end = _header_end(data)
        # any byte but the header's padding spaces (a space for a tab there changes nothing)
        pos = draw(
            st.one_of(
                st.integers(0, end - 1),
                st.integers(8 + int.from_bytes(data[:8], "little"), len(data) - 1),
            )
        )
        flip = draw(st.integers(1, 255))
        blob = bytearray(data)
        blob[pos] ^= flip
        target.write_bytes(bytes(blob))
        return str(target), corrupt + "|unsupported format_version"
    if kind == "other-model":
        other = create_model("euclidean_resnet20", num_classes=10, in_chans=1, depth=8)
        _resave(best, target, lambda m: None, state=other.state_dict())
        return str(target), r"does not fit model PoincareResNet"
    if kind == "other-model-legacy":
        other = create_model("poincare_resnet20", num_classes=10, in_chans=1, depth=8)

        def legacy(m: dict) -> None:
            m.pop("model_config")
            m["model_kwargs"] = {"depth": 8, "widths": [4, 4, 4], "num_classes": 10, "in_chans": 1}

        _resave(best, target, legacy, state=other.state_dict())
        return str(target), r"does not fit model PoincareResNet.*shape mismatch"
    if kind == "config-unknown-arg":
        _resave(best, target, lambda m: m["model_config"].update(bogus_arg=1))
        return str(target), r"'bogus_arg' that PoincareResNet does not take"
    if kind == "config-bad-value":
        _resave(best, target, lambda m: m["model_config"].update(depth=21))
        return str(target), r"depth must be 6n\+2"
    if kind == "empty-run-dir":
        d = sb / "inputs" / "emptyrun"
        d.mkdir()
        (d / "config.json").write_text("{}")
        return str(d), "no best.safetensors or last.safetensors"
    if kind == "text-file":
        target.write_text("not a checkpoint at all, just text\n")
        return str(target), corrupt
    if kind == "future-format":
        blob = data.replace(b'\\"format_version\\": 2', b'\\"format_version\\": 9', 1)
        assert blob != data
        target.write_bytes(blob)
        return str(target), corrupt + "|unsupported format_version"
    raise AssertionError(kind)


# ------------------------------------------------------------------------------ the cases

BAD_TRAIN_OPTIONS: dict[str, list[str]] = {
    "--epochs": ["0", "-1", "x", "", "1.5"],
    "--batch-size": ["0", "-4", "x"],
    "--lr": ["0", "-0.1", "nan", "inf", "x", ""],
    "--momentum": ["1", "-0.5", "nan", "inf"],
    "--weight-decay": ["-1", "nan", "inf"],
    "--warmup-epochs": ["-1", "inf", "nan"],
    "--val-fraction": ["0", "1", "-0.2", "nan"],
    "--label-smoothing": ["1", "-0.1", "nan"],
    "--grad-clip": ["-1", "nan"],
    "--step-size": ["0", "-3"],
    "--gamma": ["0", "-0.5", "nan", "inf"],
    "--seed": ["-1", str(2**64), "x"],
    "--optimizer": ["bogus", ""],
    "--schedule": ["bogus"],
    "--precision": ["fp8"],
    "--dtype": ["float16"],
    "--nan-policy": ["ignore"],
    "--device": [
        "foo",
        "tpu",
        "",
        "cuda:x",
        "meta",
        *([] if torch.cuda.is_available() else ["cuda"]),
    ],
    "--limit-train": ["0", "-5"],
    "--max-steps": ["0", "-1"],
    "--keep-checkpoints": ["0"],
    "--log-every": ["0"],
    "--ckpt-every-steps": ["-1"],
    "--threads": ["0", "-2"],
    "--model": ["bogus", "poincare_resnet21", ""],
    "--dataset": ["mnist", ""],
    "--out": [""],
}
BAD_MODEL_KWARGS = [
    (["bogus=1"], r"unknown model option\(s\) 'bogus'.*valid options: depth, widths"),
    (["depth"], "--model-kwargs expects key=value"),
    (["=1"], "empty key"),
    (["depth=21"], r"depth must be 6n\+2"),
    (["widths=5"], "invalid options for model"),
    (["widths=[0,1,2]"], "widths must be three positive"),
    (["num_classes=3"], "come from the dataset"),
    (["in_chans=3"], "come from the dataset"),
    (["init=bogus"], "unknown init 'bogus'"),
    (["norm=bogus"], "unknown norm 'bogus'"),
    (["c=-1"], "curvature c must be finite and > 0"),
    (['c="abc"'], "curvature c must be a float"),
    (["residual_scale=x"], "residual_scale must be"),
    (["depth=8", "depth=14"], "gives 'depth' twice"),
]
BAD_EVAL_OPTIONS: dict[str, list[tuple[str, str]]] = {
    "--split": [("train", "invalid choice"), ("", "invalid choice"), ("TEST", "invalid choice")],
    "--device": [("foo", "not a device"), ("tpu", "not a device|only auto"), ("", "not a device")],
    "--dataset": [("mnist", "unknown dataset 'mnist'")],
}
BAD_OOD_OPTIONS: dict[str, list[tuple[str, str]]] = {
    "--repeats": [("0", "--repeats: must be >= 1"), ("x", "--repeats: expected an integer")],
    "--subsample": [("0", "--subsample"), ("-3", "--subsample"), ("1.5", "--subsample")],
    "--batch-size": [("0", "--batch-size"), ("x", "--batch-size")],
    "--threads": [("0", "--threads"), ("-1", "--threads")],
    "--seed": [("-1", "--seed"), ("x", "--seed")],
    "--scores": [
        ("bogus", "unknown OOD score 'bogus'"),
        ("", "expected at least one value"),
        ("energy,bogus", "unknown OOD score 'bogus'"),
    ],
    "--ood-sets": [("", "expected at least one value"), ("bogus", "neither a builtin set")],
    "--device": [("foo", "not a device")],
    "--dataset": [("mnist", "unknown dataset")],
}
BAD_ATTACK_OPTIONS: dict[str, list[tuple[str, str]]] = {
    "--attack": [
        ("bogus", "unknown attack 'bogus'"),
        ("", "expected at least one value"),
        ("fgsm,cw", "unknown attack 'cw'"),
    ],
    "--eps": [
        ("x", "cannot read 'x' as a list"),
        ("-1", "finite and >= 0"),
        ("nan", "finite and >= 0"),
        ("inf", "finite and >= 0"),
        ("", "at least one value"),
        ("1,,y", "cannot read"),
    ],
    "--steps": [("0", "--steps"), ("x", "--steps")],
    "--step-size": [
        ("0", "--step-size"),
        ("-1", "--step-size"),
        ("nan", "--step-size"),
        ("inf", "--step-size"),
        ("x", "--step-size"),
    ],
    "--limit": [("0", "--limit"), ("-2", "--limit"), ("x", "--limit")],
    "--batch-size": [("0", "--batch-size")],
    "--threads": [("0", "--threads")],
    "--seed": [("-1", "--seed")],
    "--device": [("foo", "not a device")],
}
BAD_EXPLAIN_OPTIONS: dict[str, list[tuple[str, str]]] = {
    "--images": [
        ("x", "cannot read 'x' as a list"),
        ("", "at least one value"),
        ("-1", "out of range"),
        ("100000", "out of range"),
        ("0,,a", "cannot read"),
        ("1.5", "cannot read"),
    ],
    "--threads": [("0", "--threads"), ("x", "--threads")],
    "--device": [("foo", "not a device")],
    "--dataset": [("mnist", "unknown dataset")],
}
COMMAND_OPTIONS = {
    "evaluate": BAD_EVAL_OPTIONS,
    "ood": BAD_OOD_OPTIONS,
    "attack": BAD_ATTACK_OPTIONS,
    "explain": BAD_EXPLAIN_OPTIONS,
}
FASHION_MODES = ["missing", "empty", "truncated", "corrupt", "wrong-magic", "trailing",
                 "count-mismatch", "empty-dims", "label-range"]  # fmt: skip
CIFAR_MODES = ["truncated", "empty", "corrupt", "not-a-dict", "unsafe", "labels-mismatch",
               "wrong-shape", "missing"]  # fmt: skip
FOREIGN_DIRS = [
    "data-files",  # --out ~/data --overwrite
    "home-like",  # --out ~ --overwrite
    "config-no-marker",
    "config-corrupt",
    "run-plus-foreign-file",
    "run-plus-foreign-in-checkpoints",
    "run-plus-foreign-subdir",
    "run-plus-symlink",
]


def occupied(sb: Path, kind: str) -> tuple[Path, str]:
    """An output directory that ``--overwrite`` must refuse to replace."""
    out = sb / "parent" / "out"
    refuse = f"refusing to --overwrite {re.escape(str(out))}: "
    if kind.startswith("run-plus"):
        shutil.copytree(sb / "run", out)
        if kind == "run-plus-foreign-file":
            (out / "notes.txt").write_bytes(os.urandom(32))
            return out, refuse + r"it holds files poincare-resnet did not write \(notes\.txt\)"
        if kind == "run-plus-foreign-in-checkpoints":
            (out / "checkpoints" / "mine.pt").write_bytes(os.urandom(32))
            return out, refuse + r".*\(checkpoints/mine\.pt\)"
        if kind == "run-plus-foreign-subdir":
            (out / "data").mkdir()
            (out / "data" / "x.bin").write_bytes(b"1")
            return out, refuse + r".*\(data/\)"
        (out / "link").symlink_to(sb / "inputs")
        return out, refuse + r".*\(link\)"
    out.mkdir(parents=True)
    if kind == "data-files":
        for i in range(3):
            (out / f"part-{i}.npy").write_bytes(os.urandom(16))
        return out, refuse + "it holds no config.json written by poincare-resnet"
    if kind == "home-like":
        (out / ".bashrc").write_text("export X=1\n")
        (out / "Documents").mkdir()
        (out / "Documents" / "thesis.tex").write_text("\\begin{document}\n")
        return out, refuse + "it holds no config.json"
    if kind == "config-no-marker":
        (out / "config.json").write_text('{"model": "euclidean_resnet20", "epochs": 99}\n')
        (out / "metrics.jsonl").write_text('{"epoch": 1}\n')
        return out, refuse + 'its config.json has no "tool": "poincare-resnet" marker'
    (out / "config.json").write_text('{"tool": "poincare-resnet", ')
    return out, refuse + "its config.json is unreadable"


@st.composite
def train_case(draw, sb: Path, note: list[str]) -> tuple[list[str], str]:
    out = sb / "parent" / "out"
    base = ["train", *TRAIN_BASE, "--out", str(out)]
    kind = draw(st.sampled_from(["option", "model-kwargs", "fashion", "cifar", "out", "resume",
                                 "overwrite", "combo"]))  # fmt: skip
    note.append(kind)
    if kind == "option":
        option = draw(st.sampled_from(sorted(BAD_TRAIN_OPTIONS)))
        note.append(str(option))
        value = draw(st.sampled_from(BAD_TRAIN_OPTIONS[option]))
        note.append(str(value))
        message = {
            "--model": f"unknown model {value!r}",
            "--dataset": f"unknown dataset {value!r}",
            "--out": "--out must not be empty",
        }.get(option, re.escape(option))
        return [*base, f"{option}={value}"], message
    if kind == "model-kwargs":
        kwargs, message = draw(st.sampled_from(BAD_MODEL_KWARGS))
        note.append(" ".join(kwargs))
        return [*base, "--model-kwargs", *kwargs], message
    if kind == "fashion":
        mode = draw(st.sampled_from(FASHION_MODES))
        note.append(str(mode))
        d, message = fashion_dir(sb / "inputs", mode, draw(st.integers(0, 3)))
        return [*base, "--dataset", "fashion-mnist", "--data-dir", str(d)], message
    if kind == "cifar":
        mode = draw(st.sampled_from(CIFAR_MODES))
        note.append(str(mode))
        d, message = cifar_dir(sb / "inputs", mode)
        return [*base, "--dataset", "cifar10", "--data-dir", str(d)], message
    if kind == "out":
        which = draw(st.sampled_from(["file", "under-file", "occupied", "tool-run"]))
        note.append(str(which))
        if which == "file":
            out.parent.mkdir(parents=True)
            out.write_text("a file, not a directory\n")
            return [*base, "--overwrite"], "exists and is not a directory"
        if which == "under-file":
            (sb / "parent").mkdir()
            (sb / "parent" / "afile").write_text("x")
            bad = sb / "parent" / "afile" / "run"
            return [*base, "--out", str(bad)], "is not a directory"
        if which == "occupied":
            foreign = draw(st.sampled_from(FOREIGN_DIRS))
            note.append(foreign)
            occupied(sb, foreign)
            return base, "already holds files"
        shutil.copytree(sb / "run", out)
        return base, "already holds files.*--resume.*--overwrite"
    if kind == "overwrite":
        which = draw(st.sampled_from(FOREIGN_DIRS))
        note.append(which)
        _, message = occupied(sb, which)
        return [*base, "--overwrite"], message
    if kind == "resume":
        run = sb / "run"
        which = draw(st.sampled_from(["missing", "no-config", "corrupt", "not-object", "bad-type",
                                      "bad-value", "runtime"]))  # fmt: skip
        note.append(which)
        if which == "missing":
            return ["train", "--resume", str(sb / "nowhere")], "no config.json there"
        config = run / "config.json"
        stored = json.loads(config.read_text())
        if which == "no-config":
            config.unlink()
            return ["train", "--resume", str(run)], "no config.json there"
        if which == "corrupt":
            config.write_text(config.read_text()[: draw(st.integers(1, 40))])
            return ["train", "--resume", str(run)], "config.json is unreadable"
        if which == "not-object":
            config.write_text("[1, 2, 3]")
            return ["train", "--resume", str(run)], "does not hold a JSON object"
        if which == "bad-type":
            key = draw(st.sampled_from(["epochs", "lr", "model", "model_kwargs", "augment"]))
            stored[key] = "x" if key != "model" else 5
            config.write_text(json.dumps(stored))
            return ["train", "--resume", str(run)], f"--{key.replace('_', '-')} must be of type"
        if which == "bad-value":
            stored["epochs"] = -3
            config.write_text(json.dumps(stored))
            return ["train", "--resume", str(run)], "--epochs must be >= 1"
        return ["train", "--resume", str(run), "--log-every", "0"], "--log-every must be >= 1"
    # an invalid combination or an unknown option
    which = draw(st.sampled_from(["precision-dtype", "unknown-flag", "positional"]))
    note.append(str(which))
    if which == "precision-dtype":
        return [*base, "--precision", "bf16", "--dtype", "float64"], "needs --dtype float32"
    if which == "unknown-flag":
        return [*base, "--bogus-flag", "1"], "unrecognized arguments: --bogus-flag"
    return [*base, "extra-positional"], "unrecognized arguments: extra-positional"


@st.composite
def checkpoint_case(draw, sb: Path, command: str, note: list[str]) -> tuple[list[str], str]:
    run = str(sb / "run")
    out = sb / "parent" / "out"
    kinds = ["checkpoint", "option", "fashion", "cifar", "out", "argv"]
    kind = draw(st.sampled_from([*kinds, "ood-set"] if command == "ood" else kinds))
    note.append(kind)
    tail: list[str] = ["--out", str(out)] if draw(st.booleans()) else []
    if command == "attack":
        tail += ["--limit", "4", "--steps", "1"]
    if command == "ood":
        tail += ["--repeats", "1"]
    if kind == "checkpoint":
        ck_kind = draw(st.sampled_from(CKPT_KINDS))
        note.append(ck_kind)
        arg, message = bad_checkpoint(sb, ck_kind, draw)
        args = [arg] if command != "explain" or draw(st.booleans()) else [run, arg]
        return [command, *args, *tail], message
    if kind == "option":
        options = COMMAND_OPTIONS[command]
        option = draw(st.sampled_from(sorted(options)))
        note.append(str(option))
        value, message = draw(st.sampled_from(options[option]))
        note.append(value)
        return [command, run, *tail, f"{option}={value}"], message
    if kind == "fashion":
        mode = draw(st.sampled_from(FASHION_MODES))
        note.append(str(mode))
        d, message = fashion_dir(sb / "inputs", mode, draw(st.integers(0, 3)))
        return [command, run, *tail, "--dataset", "fashion-mnist", "--data-dir", str(d)], message
    if kind == "cifar":
        mode = draw(st.sampled_from(["valid", *CIFAR_MODES]))
        note.append(str(mode))
        d, message = cifar_dir(sb / "inputs", mode)
        return [command, run, *tail, "--dataset", "cifar10", "--data-dir", str(d)], message
    if kind == "out":
        (sb / "parent").mkdir()
        as_file = draw(st.booleans())
        note.append("file" if as_file else "under-file")
        if as_file:
            out.write_text("occupied by a file\n")
            return [command, run, "--out", str(out)], "exists and is not a directory"
        (sb / "parent" / "afile").write_text("x")
        return [command, run, "--out", str(sb / "parent" / "afile" / "sub")], "is not a directory"
    if kind == "ood-set":
        which = draw(st.sampled_from(["missing", "empty-dir", "broken-png", "corrupt-pickle",
                                      "not-a-dict", "wrong-shape"]))  # fmt: skip
        note.append(which)
        p = sb / "inputs" / "oodset"
        p.parent.mkdir(exist_ok=True)
        message = {
            "missing": "neither a builtin set",
            "empty-dir": "no PNG/JPEG images found",
            "broken-png": "cannot read image",
            "corrupt-pickle": "corrupt or truncated pickle|refusing to unpickle",
            "not-a-dict": "expected a CIFAR-format dict",
            "wrong-shape": "rows have 3000 values",
        }[which]
        if which == "empty-dir":
            p.mkdir()
        elif which == "broken-png":
            p.mkdir()
            (p / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(draw(st.integers(0, 64))))
        elif which == "corrupt-pickle":
            blob = pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}, protocol=2)
            p.write_bytes(blob[: draw(st.integers(0, len(blob) - 1))])
        elif which == "not-a-dict":
            p.write_bytes(pickle.dumps([1, 2]))
        elif which == "wrong-shape":
            p.write_bytes(pickle.dumps({b"data": np.zeros((2, 3000), np.uint8)}, protocol=2))
        return [command, run, *tail, "--ood-sets", f"gaussian,{p}"], message
    which = draw(st.sampled_from(["no-checkpoint", "unknown-flag", "empty-checkpoint"]))
    note.append(str(which))
    if which == "no-checkpoint":
        return [command], "the following arguments are required"
    if which == "unknown-flag":
        return [command, run, "--bogus"], "unrecognized arguments: --bogus"
    return [command, ""], "does not exist|no best.safetensors"


@st.composite
def invocation(draw, sb: Path) -> tuple[list[str], str, str]:
    """``(argv, regex the error must match, label of the kind of case)``."""
    command = draw(st.sampled_from(["train", "train", "evaluate", "ood", "attack", "explain"]))
    note: list[str] = []
    if command == "train":
        argv, message = draw(train_case(sb, note))
    else:
        argv, message = draw(checkpoint_case(sb, command, note))
    return argv, message, " ".join(note)


def run_cli(argv: list[str], cwd: Path) -> tuple[int, str, str]:
    """``cli.main(argv)`` in ``cwd`` with stdout/stderr captured and warnings silenced."""
    err, out = io.StringIO(), io.StringIO()
    previous = Path.cwd()
    os.chdir(cwd)
    try:
        with (
            contextlib.redirect_stderr(err),
            contextlib.redirect_stdout(out),
            warnings.catch_warnings(),
        ):
            warnings.simplefilter("ignore")
            try:
                rc = cli.main(argv)
            except SystemExit as e:  # argparse
                rc = e.code
    finally:
        os.chdir(previous)
    return rc, out.getvalue(), err.getvalue()


def test_fuzzed_bad_invocations_exit_2_and_change_nothing(prepared, record_property):
    seen: list[str] = []
    labels: set[str] = set()
    torch.set_num_threads(1)

    @settings(
        max_examples=N_CASES,
        deadline=None,
        derandomize=True,
        database=None,
        # no shrinking: a failing case is reported as generated (its argv is in the message)
        phases=[Phase.explicit, Phase.reuse, Phase.generate],
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(st.data())
    def case(data) -> None:
        sb = Path(tempfile.mkdtemp(dir=prepared, prefix="case-"))
        try:
            shutil.copytree(prepared / "run", sb / "run")
            (sb / "inputs").mkdir()
            argv, message, label = data.draw(invocation(sb))
            before = tree_digest(sb)
            rc, stdout, stderr = run_cli(argv, sb)
            context = f"argv={argv}\nstdout={stdout[-2000:]}\nstderr={stderr[-3000:]}"
            assert rc == cli.EXIT_BAD_INPUT, context
            assert "Traceback" not in stderr, context
            lines = stderr.strip().splitlines()
            assert len(lines) == 1, context
            assert re.match(r"poincare-resnet( \w+)?: error: ", lines[0]), context
            assert re.search(message, lines[0]), f"expected /{message}/\n{context}"
            assert tree_digest(sb) == before, context
            seen.append(argv[0])
            labels.add(f"{argv[0]} {label}")
        finally:
            shutil.rmtree(sb, ignore_errors=True)

    case()
    counts = {c: seen.count(c) for c in sorted(set(seen))}
    record_property("fuzz_cases", len(seen))
    record_property("fuzz_cases_per_command", json.dumps(counts))
    record_property("fuzz_distinct_kinds", len(labels))
    print(f"fuzzed bad invocations: {len(seen)} {counts}, {len(labels)} distinct kinds")
    if os.environ.get("FUZZ_LIST_KINDS"):
        print("\n".join(sorted(labels)))
    assert len(seen) >= min(200, N_CASES)
    assert set(counts) == {"train", "evaluate", "ood", "attack", "explain"}
