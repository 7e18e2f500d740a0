"""Reliability: crash/resume (SIGKILL), corrupt checkpoints, bad input, the NaN guard, stress."""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import pickle
import random
import re
import signal
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli_helpers import ckpt_steps, launch_train, sigkill_when
from _helpers import assert_same_weights, checkpoint_weights, tiny_config

from poincare_resnet import cli
from poincare_resnet.models import create_model
from poincare_resnet.nn import PoincareBatchNorm2d
from poincare_resnet.training import rundir, trainer
from poincare_resnet.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)
from poincare_resnet.training.trainer import (
    NonFiniteError,
    TrainConfig,
    lr_factor,
    train,
)

TINY_ARGS = [
    "--dataset",
    "digits",
    "--limit-train",
    "96",
    "--batch-size",
    "32",
    "--epochs",
    "2",
    "--log-every",
    "1",
    "--no-progress",
]


def _quiet(_message: str) -> None:
    pass


def _snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` (relative path -> bytes)."""
    if not root.exists():
        return {}
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 2-epoch run every resumed run must reproduce bit for bit."""
    run = tmp_path_factory.mktemp("reliability") / "reference"
    summary = train(tiny_config(run, ckpt_every_steps=1), log=_quiet)
    return {"run": run, "summary": summary, "last": checkpoint_weights(run / "last.safetensors")}


def _patch_model(monkeypatch, on_build):
    """Let ``on_build(model)`` see (and hook) the model the trainer builds."""
    original = trainer.create_model

    def build(*args, **kwargs):
        model = original(*args, **kwargs)
        on_build(model)
        return model

    monkeypatch.setattr(trainer, "create_model", build)


# ------------------------------------------------------------------------ interrupt/resume


def test_repeated_interruptions_in_process_reproduce_the_uninterrupted_run(reference, tmp_path):
    run = tmp_path / "run"
    # stop mid-epoch 1, at the epoch boundary, and mid-epoch 2; each resume continues the last
    assert train(tiny_config(run, ckpt_every_steps=2, max_steps=2), log=_quiet) == {}
    for max_steps in (3, 5, None):
        messages: list[str] = []
        summary = train(
            TrainConfig(progress=False, log_every=1, max_steps=max_steps),
            resume=str(run),
            log=messages.append,
        )
        assert any(m.startswith(f"resumed {run}") for m in messages), messages
        assert ckpt_steps(run)[-1] == (max_steps or 6)
    assert summary["test_top1"] == reference["summary"]["test_top1"]
    assert_same_weights(reference["last"], checkpoint_weights(run / "last.safetensors"))


def test_sigkill_at_random_moments_then_resume_reproduces_the_run(
    reference, tmp_path, record_property
):
    """4 interpreter starts: ~20 s on a 2-core machine (each start imports torch)."""
    run = tmp_path / "killed"
    common = [*TINY_ARGS, "--ckpt-every-steps", "1", "--deterministic", "--threads", "1"]
    rng = random.Random(1234)
    kills = 0
    args = [*common, "--out", str(run)]
    for k in (2, 4, 5):  # kill once at least k step checkpoints exist
        proc = launch_train(args)
        sigkill_when(
            proc,
            lambda k=k: (steps := ckpt_steps(run)) != [] and steps[-1] >= k,
            timeout=120,
            poll=0.01,
            delay=lambda: rng.uniform(0.0, 0.25),  # a random moment after the k-th one
        )
        if proc.returncode == -signal.SIGKILL:
            kills += 1
        else:
            assert proc.returncode == 0, proc.stderr.read()
        args = [*common, "--resume", str(run)]
    record_property("sigkills", kills)
    assert kills >= 2, "the runs finished before they could be killed"
    if not (run / "summary.json").exists():
        proc = launch_train(args)
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        assert "test_top1" in out
    assert_same_weights(reference["last"], checkpoint_weights(run / "last.safetensors"))


def test_truncated_latest_checkpoint_falls_back_to_the_previous_one(reference, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run, ckpt_every_steps=1, max_steps=4), log=_quiet)
    assert ckpt_steps(run) == [2, 3, 4]  # keep_checkpoints=3
    latest = run / "checkpoints" / "ckpt-00000004.safetensors"
    data = latest.read_bytes()
    latest.write_bytes(data[: len(data) // 2])

    messages: list[str] = []
    summary = train(TrainConfig(progress=False, log_every=1), resume=str(run), log=messages.append)
    skipped = [m for m in messages if "skipping unusable checkpoint" in m]
    assert len(skipped) == 1 and str(latest) in skipped[0], messages
    assert "truncated/corrupt" in skipped[0]
    assert any(
        m.startswith(f"resumed {run} from ckpt-00000003.safetensors (epoch 1, step 3)")
        for m in messages
    ), messages
    # falling back one checkpoint loses a step of work, not determinism
    assert summary["test_top1"] == reference["summary"]["test_top1"]
    assert_same_weights(reference["last"], checkpoint_weights(run / "last.safetensors"))


def test_every_checkpoint_unusable_starts_from_scratch(reference, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run, ckpt_every_steps=1, max_steps=2), log=_quiet)
    for p in (run / "checkpoints").glob("*.safetensors"):
        p.write_bytes(b"garbage")
    messages: list[str] = []
    train(TrainConfig(progress=False, log_every=1), resume=str(run), log=messages.append)
    assert sum("skipping unusable checkpoint" in m for m in messages) == 2
    assert any("no usable checkpoint" in m and "starting from scratch" in m for m in messages)
    assert_same_weights(reference["last"], checkpoint_weights(run / "last.safetensors"))


# ------------------------------------------------------------------------------ bad input


def _gz_idx(path: Path, magic: int, dims: tuple[int, ...]) -> None:
    payload = struct.pack(f">I{len(dims)}I", magic, *dims) + bytes(int(np.prod(dims)))
    path.write_bytes(gzip.compress(payload))


def _fashion_dir(root: Path, mode: str) -> Path:
    d = root / "fmnist"
    d.mkdir()
    files = {
        "train-images-idx3-ubyte.gz": (2051, (4, 28, 28)),
        "train-labels-idx1-ubyte.gz": (2049, (4,)),
        "t10k-images-idx3-ubyte.gz": (2051, (4, 28, 28)),
        "t10k-labels-idx1-ubyte.gz": (2049, (4,)),
    }
    for name, (magic, dims) in files.items():
        if mode == "bad-gzip":
            (d / name).write_bytes(b"\x1f\x8b\x08\x00this is not deflate data")
        elif mode == "wrong-magic" and name.startswith("train-images"):
            _gz_idx(d / name, 2049, dims)  # a labels magic on an images file
        else:
            _gz_idx(d / name, magic, dims)
    return d


def _cifar_dir(root: Path) -> Path:
    d = root / "cifar" / "cifar-10-batches-py"
    d.mkdir(parents=True)
    batch = {b"data": np.zeros((10, 3072), dtype=np.uint8), b"labels": list(range(10))}
    blob = pickle.dumps(batch, protocol=2)
    (d / "data_batch_1").write_bytes(blob[: len(blob) // 2])
    return d.parent


def _bad_train_args(case: str, tmp: Path) -> tuple[list[str], str]:
    out = ["--out", str(tmp / "out")]
    if case == "fashion-missing":
        return [
            "--dataset",
            "fashion-mnist",
            "--data-dir",
            "/nonexistent",
            *out,
        ], "Fashion-MNIST not found in /nonexistent"
    if case == "fashion-bad-gzip":
        d = _fashion_dir(tmp, "bad-gzip")
        return ["--dataset", "fashion-mnist", "--data-dir", str(d), *out], re.escape(
            str(d / "train-images-idx3-ubyte.gz")
        ) + ": bad gzip data"
    if case == "fashion-wrong-magic":
        d = _fashion_dir(tmp, "wrong-magic")
        return (
            ["--dataset", "fashion-mnist", "--data-dir", str(d), *out],
            re.escape(str(d / "train-images-idx3-ubyte.gz")) + r": wrong magic number 2049 "
            r"\(expected 2051\)",
        )
    if case == "cifar-truncated":
        d = _cifar_dir(tmp)
        return ["--dataset", "cifar10", "--data-dir", str(d), *out], re.escape(
            str(d / "cifar-10-batches-py" / "data_batch_1")
        ) + ": corrupt or truncated"
    if case == "unknown-model":
        return [
            "--model",
            "poincare_resnet21",
            *out,
        ], "unknown model 'poincare_resnet21'; did you mean .*poincare_resnet20"
    if case == "unknown-dataset":
        return ["--dataset", "mnist", *out], "unknown dataset 'mnist'"
    if case == "negative-lr":
        return ["--lr", "-0.1", *out], r"--lr must be > 0, got -0.1"
    if case == "nan-lr":
        return ["--lr", "nan", *out], r"--lr must be > 0, got nan"
    if case == "batch-0":
        return ["--batch-size", "0", *out], "--batch-size must be >= 1, got 0"
    if case == "depth-21":
        return ["--model-kwargs", "depth=21", *out], r"depth must be 6n\+2 .*got 21"
    if case == "bad-model-kwargs":
        return ["--model-kwargs", "depth", *out], "--model-kwargs expects key=value"
    if case == "resume-missing":
        return ["--resume", str(tmp / "nowhere")], "no config.json there"
    raise AssertionError(case)


BAD_TRAIN_CASES = [
    "fashion-missing",
    "fashion-bad-gzip",
    "fashion-wrong-magic",
    "cifar-truncated",
    "unknown-model",
    "unknown-dataset",
    "negative-lr",
    "nan-lr",
    "batch-0",
    "depth-21",
    "bad-model-kwargs",
    "resume-missing",
]


@pytest.mark.parametrize("case", BAD_TRAIN_CASES)
def test_bad_train_input_exits_2_and_writes_nothing(case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a default --out (runs/...) would land here
    args, message = _bad_train_args(case, tmp_path)
    before = _snapshot(tmp_path)
    rc = cli.main(["train", "--limit-train", "32", "--epochs", "1", "--no-progress", *args])
    captured = capsys.readouterr()
    assert rc == cli.EXIT_BAD_INPUT, captured
    assert re.search(message, captured.err), captured.err
    assert captured.err.startswith("poincare-resnet: error: ")
    assert "Traceback" not in captured.err
    assert _snapshot(tmp_path) == before
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()


def _train_args(out: Path, *extra: str) -> list[str]:
    """A 1-step CLI run (64 images, batch 32: it stops mid-epoch after its first checkpoint)."""
    return [
        "train",
        "--limit-train",
        "64",
        "--batch-size",
        "32",
        "--epochs",
        "1",
        "--max-steps",
        "1",
        "--no-progress",
        "--model-kwargs",
        "depth=8",
        "widths=[2,2,2]",
        "--out",
        str(out),
        *extra,
    ]


def test_output_dir_holding_another_run_is_refused_even_with_overwrite(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"model": "euclidean_resnet20", "epochs": 99}\n')
    (out / "metrics.jsonl").write_text('{"epoch": 1, "val_top1": 0.5}\n')
    (out / "notes.txt").write_bytes(os.urandom(64))
    before = _snapshot(out)
    rc = cli.main(_train_args(out))
    captured = capsys.readouterr()
    assert rc == cli.EXIT_BAD_INPUT
    assert f"output directory {out} already holds files" in captured.err
    assert "--resume" in captured.err and "--overwrite" in captured.err
    assert _snapshot(out) == before

    # a config.json without this tool's marker: not a run of ours, so nothing is deleted
    rc = cli.main(_train_args(out, "--overwrite"))
    captured = capsys.readouterr()
    assert rc == cli.EXIT_BAD_INPUT, captured.err
    assert (
        f'refusing to --overwrite {out}: its config.json has no "tool": "poincare-resnet" marker'
        in captured.err
    )
    assert "nothing was deleted" in captured.err and "Traceback" not in captured.err
    assert _snapshot(out) == before


@pytest.mark.parametrize("kind", ["dataset", "home"])
def test_overwrite_of_a_directory_this_tool_did_not_create_deletes_nothing(kind, tmp_path, capsys):
    """``--out ~/data --overwrite`` and ``--out ~ --overwrite`` used to ``rmtree`` them."""
    out = tmp_path / kind
    out.mkdir()
    if kind == "dataset":
        (out / "train-images-idx3-ubyte.gz").write_bytes(os.urandom(256))
        (out / "metrics.jsonl").write_text("{}\n")  # a name the tool writes is not enough
    else:
        (out / ".bashrc").write_text("export PATH=$PATH\n")
        (out / "thesis").mkdir()
        (out / "thesis" / "main.tex").write_text("\\documentclass{article}\n")
    before = _snapshot(out)
    rc = cli.main(_train_args(out, "--overwrite"))
    err = capsys.readouterr().err
    assert rc == cli.EXIT_BAD_INPUT
    assert (
        f"refusing to --overwrite {out}: it holds no config.json written by poincare-resnet" in err
    )
    assert _snapshot(out) == before


def test_overwrite_replaces_a_run_of_this_tool_and_refuses_one_with_foreign_files(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(_train_args(out)) == 0
    capsys.readouterr()
    config = json.loads((out / "config.json").read_text())
    assert config["tool"] == "poincare-resnet" and config["format_version"] == 2
    first = _snapshot(out)

    # a foreign file anywhere (top level, inside checkpoints/, a link): refused, nothing deleted
    foreign = [
        out / "notes.txt",
        out / "checkpoints" / "my-weights.pt",
        out / "ood" / "paper-figure.pdf",
    ]
    for path in foreign:
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(os.urandom(16))
        before = _snapshot(out)
        rc = cli.main(_train_args(out, "--overwrite", "--seed", "1"))
        err = capsys.readouterr().err
        assert rc == cli.EXIT_BAD_INPUT, err
        assert f"refusing to --overwrite {out}: it holds files poincare-resnet did not write" in err
        assert str(path.relative_to(out)) in err
        assert _snapshot(out) == before
        path.unlink()
    (out / "ood").rmdir()
    (out / "link").symlink_to(tmp_path)
    rc = cli.main(_train_args(out, "--overwrite"))
    assert rc == cli.EXIT_BAD_INPUT and "(link)" in capsys.readouterr().err
    (out / "link").unlink()
    assert _snapshot(out) == first

    # only the tool's own files (and an atomic write's leftover): replaced
    (out / ".metrics.0123456789abcdef.tmp.jsonl").write_text("half a line")
    (out / "attack").mkdir()
    (out / "attack" / "attack.csv").write_text("a,b\n")
    rc = cli.main(_train_args(out, "--overwrite", "--seed", "1"))
    assert rc == 0, capsys.readouterr().err
    assert not (out / ".metrics.0123456789abcdef.tmp.jsonl").exists()
    assert not (out / "attack").exists()
    assert json.loads((out / "config.json").read_text())["seed"] == 1
    assert ckpt_steps(out) == [1]


def test_remove_run_files_deletes_only_known_files_and_keeps_the_directory(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "explain").mkdir()
    (run / "config.json").write_text('{"tool": "poincare-resnet", "format_version": 2}')
    for name in ["best.safetensors", "best.json", "summary.json", "checkpoints/ckpt-00000003.json",
                 "checkpoints/ckpt-00000003.safetensors", "explain/explanations.png"]:  # fmt: skip
        (run / name).write_bytes(b"x")
    trainer.remove_run_files(run)
    assert run.is_dir() and list(run.iterdir()) == []
    # a stranger among them: RunDirError before anything is deleted
    (run / "config.json").write_text('{"tool": "poincare-resnet", "format_version": 2}')
    (run / "best.safetensors").write_bytes(b"x")
    (run / "checkpoints").mkdir()
    (run / "checkpoints" / "ckpt-1.safetensors.bak").write_bytes(b"x")
    before = _snapshot(run)
    with pytest.raises(trainer.RunDirError, match=r"checkpoints/ckpt-1\.safetensors\.bak"):
        trainer.remove_run_files(run)
    assert _snapshot(run) == before


def test_run_config_and_checkpoints_carry_the_resolved_model_config(reference):
    import dataclasses
    import inspect

    from poincare_resnet.models.resnet import PoincareLayers, PoincareResNet

    run = reference["run"]
    config = json.loads((run / "config.json").read_text())
    assert config["tool"] == "poincare-resnet" and config["format_version"] == 2
    named = list(inspect.signature(PoincareResNet.__init__).parameters)[1:]
    assert named[-2:] == ["layers", "options"]  # the layer settings: a dataclass or flat options
    params = named[:-2] + [f.name for f in dataclasses.fields(PoincareLayers)]
    resolved = config["model_config"]
    assert list(resolved) == params  # every constructor argument and layer setting, in order
    assert resolved["depth"] == 20 and resolved["c"] == 0.1 and resolved["in_chans"] == 1
    for name in ("best.safetensors", "last.safetensors"):
        meta = load_checkpoint(run / name).meta
        assert meta["format_version"] == 2
        assert meta["model_config"] == resolved


def test_resume_rebuilds_the_stored_network_when_a_registry_default_changed(tmp_path, monkeypatch):
    from poincare_resnet.models import registry

    run = tmp_path / "run"
    train(tiny_config(run, max_steps=1, model_kwargs={"depth": 8, "widths": [2, 2, 2]}), log=_quiet)
    # a later version changes a default of the name; parameter shapes stay the same
    monkeypatch.setitem(registry._DEFAULTS, "poincare_resnet20", {"depth": 20, "c": 0.5})
    assert create_model("poincare_resnet20", depth=8).curvature.value == pytest.approx(0.5)
    train(TrainConfig(progress=False, log_every=1, max_steps=2), resume=str(run), log=_quiet)
    meta = load_checkpoint(run / "checkpoints" / "ckpt-00000002.safetensors").meta
    assert meta["model_config"]["c"] == 0.1


def _default_out_worker(rank: int, world: int, port: int, root: str) -> None:
    """One rank of a gloo run with the default --out; each rank's clock would name another
    directory (simulated by a rank suffix), so only rank 0's name may be used."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        WORLD_SIZE=str(world),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
    )
    os.chdir(root)
    torch.set_num_threads(1)
    real = rundir._default_out
    rundir._default_out = lambda cfg: f"{real(cfg)}-rank{rank}"
    cfg = TrainConfig(
        dataset="digits",
        limit_train=64,
        batch_size=32,
        epochs=1,
        max_steps=1,
        progress=False,
        device="cpu",
        threads=1,
        model_kwargs={"depth": 8, "widths": [2, 2, 2]},
    )
    train(cfg, log=_quiet)


def test_distributed_run_with_default_out_makes_one_run_directory(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_default_out_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    made = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert len(made) == 1 and made[0].endswith("-rank0"), made
    run = tmp_path / "runs" / made[0]
    assert (run / "config.json").is_file() and ckpt_steps(run) == [1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_resume_validates_runtime_options(tmp_path, capsys):
    run = tmp_path / "run"
    train(tiny_config(run, max_steps=1), log=_quiet)
    before = _snapshot(run)
    try:
        rc = cli.main(["train", "--resume", str(run), "--log-every", "0", "--no-progress"])
    except ZeroDivisionError:
        rc = None
    assert rc == cli.EXIT_BAD_INPUT
    assert "--log-every must be >= 1" in capsys.readouterr().err
    assert _snapshot(run) == before


def _other_model_checkpoint(tmp_path: Path) -> Path:
    """A checkpoint whose metadata names poincare_resnet20 but whose tensors are the w16 one."""
    model = create_model("poincare_resnet20_w16", num_classes=10, in_chans=1)
    meta = {
        "model_name": "poincare_resnet20",
        "model_kwargs": {"num_classes": 10, "in_chans": 1},
        "dataset": "digits",
        "dtype": "float32",
    }
    return save_checkpoint(
        tmp_path / "ckpts" / "other.safetensors", model_state=model.state_dict(), meta=meta
    )


def test_evaluate_checkpoint_of_another_model_names_the_mismatch(tmp_path, capsys):
    path = _other_model_checkpoint(tmp_path)
    out = tmp_path / "eval"
    rc = cli.main(["evaluate", str(path), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_BAD_INPUT
    assert f"{path} does not fit model PoincareResNet" in err
    assert "shape mismatch(es): stem.0.weight: " in err
    assert "(16, 1, 3, 3) vs model (8, 1, 3, 3)" in err
    assert not out.exists()


def test_evaluate_garbage_checkpoint_raises_checkpoint_error(tmp_path, capsys):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    out = tmp_path / "eval"
    rc = cli.main(["evaluate", str(path), "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_BAD_INPUT
    assert f"truncated/corrupt checkpoint {path}" in err
    assert not out.exists()
    with pytest.raises(CheckpointError, match="truncated/corrupt"):
        load_checkpoint(path)
    # a run directory without checkpoints, and a missing file
    rc = cli.main(["evaluate", str(tmp_path / "missing.safetensors")])
    assert rc == cli.EXIT_BAD_INPUT
    assert "does not exist" in capsys.readouterr().err
    rc = cli.main(["evaluate", str(tmp_path)])
    assert rc == cli.EXIT_BAD_INPUT
    assert "no best.safetensors or last.safetensors" in capsys.readouterr().err


# ------------------------------------------------------------------------------ NaN guard


class _Snapshots:
    """Training forward passes seen so far and the run directory's files before the latest."""

    def __init__(self) -> None:
        self.count = 0
        self.last: dict[str, bytes] = {}


def _snapshot_every_step(monkeypatch, run: Path) -> _Snapshots:
    """Before every training forward pass, record the run directory's files."""
    snaps = _Snapshots()

    def hook(model):
        def pre(module, _inputs):
            if module.training:
                snaps.count += 1
                snaps.last = _snapshot(run)

        model.register_forward_pre_hook(pre)

    _patch_model(monkeypatch, hook)
    return snaps


def test_absurd_lr_stops_with_nonfinite_error_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "run"
    snaps = _snapshot_every_step(monkeypatch, run)
    with pytest.raises(NonFiniteError) as info:
        train(tiny_config(run, lr=1e6, ckpt_every_steps=1), log=_quiet)
    message = str(info.value)
    step = int(re.search(r"non-finite loss or gradient at step (\d+)", message).group(1))
    assert step == snaps.count, message  # the step whose forward/backward went bad
    good = run / "checkpoints" / f"ckpt-{step - 1:08d}.safetensors"
    assert f"the last good checkpoint {good} is untouched" in message
    assert "--nan-policy skip" in message
    # nothing was written after the last good step: every file is byte-identical
    assert _snapshot(run) == snaps.last
    ck = load_checkpoint(good)
    assert all(torch.isfinite(t).all() for t in ck.model_state.values())
    assert not (run / "summary.json").exists()


def test_nonfinite_under_cli_exits_3(tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(
        ["train", *TINY_ARGS, "--lr", "1e6", "--ckpt-every-steps", "1", "--out", str(out)]
    )
    captured = capsys.readouterr()
    assert rc == cli.EXIT_NONFINITE
    assert "poincare-resnet: error: non-finite loss or gradient at step" in captured.err
    assert "Traceback" not in captured.err


def _inject_nan(monkeypatch, bad_calls: set[int], where: str = "output"):
    """Make training forward call number ``i`` (0-based) for ``i`` in ``bad_calls`` non-finite,
    either in the logits (``output``) or in the input image (``input``, so it flows through
    every layer, batch norm included). Returns the optimizer learning rate seen at each call."""
    calls = {"n": 0}
    lrs: list[float] = []
    optimizers = []
    original_opt = trainer.build_optimizer

    def build_optimizer(cfg, model):
        opt = original_opt(cfg, model)
        optimizers.append(opt)
        return opt

    def hook(model):
        def pre(module, inputs):
            if not module.training:
                return None
            lrs.append(optimizers[-1].param_groups[0]["lr"])
            if where == "input" and calls["n"] in bad_calls:
                return (inputs[0] * float("nan"),)
            return None

        def post(module, _inputs, output):
            if not module.training:
                return None
            i = calls["n"]
            calls["n"] += 1
            if where == "output" and i in bad_calls:
                return output * float("nan")
            return None

        model.register_forward_pre_hook(pre)
        model.register_forward_hook(post)

    monkeypatch.setattr(trainer, "build_optimizer", build_optimizer)
    _patch_model(monkeypatch, hook)
    return lrs


def test_injected_nan_under_stop_keeps_every_file_intact(tmp_path, monkeypatch):
    run = tmp_path / "run"
    _inject_nan(monkeypatch, {4})  # step 5, in epoch 2, after epoch 1's files exist
    snaps = _snapshot_every_step(monkeypatch, run)
    with pytest.raises(NonFiniteError, match=r"at step 5 \(epoch 2, step 5"):
        train(tiny_config(run, ckpt_every_steps=1), log=_quiet)
    assert "last.safetensors" in snaps.last
    assert "checkpoints/ckpt-00000004.safetensors" in snaps.last
    assert _snapshot(run) == snaps.last


def test_injected_nan_under_skip_is_logged_and_training_continues(reference, tmp_path, monkeypatch):
    run = tmp_path / "run"
    _inject_nan(monkeypatch, {1})
    messages: list[str] = []
    summary = train(tiny_config(run, nan_policy="skip"), log=messages.append)
    skipped = [m for m in messages if m.startswith("skipped step")]
    assert skipped and skipped[0].startswith("skipped step 1 (non-finite loss/gradient)")
    assert len(skipped) == 1
    assert "learning rate scaled by 0.5" in skipped[0]
    assert 0.0 <= summary["test_top1"] <= 1.0
    weights = checkpoint_weights(run / "last.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())
    # the skipped step changed the trajectory (no update at step 1)
    assert any(not torch.equal(weights[k], reference["last"][k]) for k in weights)


def test_skip_halves_the_learning_rate_of_the_next_step(tmp_path, monkeypatch):
    lrs = _inject_nan(monkeypatch, {1})
    cfg = tiny_config(tmp_path / "run", nan_policy="skip", epochs=1)
    train(cfg, log=_quiet)
    steps = len(lrs)
    expected = [cfg.lr * lr_factor(s, cfg, 3) * (0.5 if s >= 2 else 1.0) for s in range(steps)]
    assert lrs == pytest.approx(expected, rel=1e-12)


def test_skip_does_not_poison_batchnorm_running_stats(tmp_path, monkeypatch):
    _inject_nan(monkeypatch, {1}, where="input")
    run = tmp_path / "run"
    messages: list[str] = []
    train(tiny_config(run, nan_policy="skip", epochs=1), log=messages.append)
    assert any(m.startswith("skipped step 1") for m in messages)
    weights = checkpoint_weights(run / "last.safetensors")
    bad = [k for k, t in weights.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    assert not bad, f"non-finite tensors after a skipped step: {bad[:5]}"


# ------------------------------------------------------------------------------ stress


def _scaled_inputs(monkeypatch, factor: float) -> None:
    original = trainer.load_dataset

    def load(*args, **kwargs):
        d = original(*args, **kwargs)
        return dataclasses.replace(
            d, train_x=d.train_x * factor, val_x=d.val_x * factor, test_x=d.test_x * factor
        )

    monkeypatch.setattr(trainer, "load_dataset", load)


def _stress(tmp_path: Path, monkeypatch, steps: int, record_property) -> str:
    """``steps`` float32 steps of poincare_resnet20 on digits (batch 32) with inputs ×100 and
    10× the default learning rate. Returns which outcome happened, after checking it."""
    _scaled_inputs(monkeypatch, 100.0)
    run = tmp_path / "stress"
    snaps = _snapshot_every_step(monkeypatch, run)
    lr = TrainConfig().lr * 10
    cfg = TrainConfig(
        dataset="digits",
        batch_size=32,
        epochs=13,
        lr=lr,
        max_steps=steps,
        ckpt_every_steps=25,
        log_every=1,
        progress=False,
        out=str(run),
    )
    assert cfg.dtype == "float32"
    try:
        train(cfg, log=_quiet)
    except NonFiniteError as exc:
        # the guard stopped cleanly: it names the step, nothing was written after it, and the
        # last good checkpoint is intact and finite
        step = int(re.search(r"non-finite loss or gradient at step (\d+)", str(exc)).group(1))
        assert step == snaps.count <= steps
        assert _snapshot(run) == snaps.last
        last = ckpt_steps(run)
        if last:
            assert "is untouched" in str(exc)
            ck = load_checkpoint(run / "checkpoints" / f"ckpt-{last[-1]:08d}.safetensors")
            assert all(torch.isfinite(t).all() for t in ck.model_state.values())
        outcome = f"guard stopped at step {step}"
    else:
        assert snaps.count == steps  # every step ran
        assert ckpt_steps(run)[-1] == steps
        ck = load_checkpoint(run / "checkpoints" / f"ckpt-{steps:08d}.safetensors")
        assert all(torch.isfinite(t).all() for t in ck.model_state.values())
        losses = [
            json.loads(line)["train_loss"]
            for line in (run / "metrics.jsonl").read_text().splitlines()
        ]
        assert all(math.isfinite(v) for v in losses)
        outcome = "no NaN"
    record_property("stress_outcome", outcome)
    print(f"stress {steps} steps: {outcome}")
    return outcome


def test_batchnorm_on_a_collapsed_batch_near_the_boundary_is_finite():
    bn = PoincareBatchNorm2d(4, c=0.1).train()
    with torch.no_grad():
        bn.bias.copy_(torch.tensor([0.3, 0.0, 0.0, 0.0]))
    reference = PoincareBatchNorm2d(4, c=0.1).train()
    reference.load_state_dict(bn.state_dict())
    u = torch.zeros(4, 4, 2, 2)
    u[:, 0] = 9.8  # every position the same point, √c‖u‖ = 3.1 (tanh = 0.996)
    assert torch.isfinite(reference._forward_reference(u)).all()
    out = bn(u)
    assert torch.isfinite(out).all()


def test_stress_50_steps_large_inputs_high_lr(tmp_path, monkeypatch, record_property):
    assert _stress(tmp_path, monkeypatch, 50, record_property) == "no NaN"


@pytest.mark.slow  # ~60-120 s on a loaded 2-core machine
def test_stress_500_steps_large_inputs_high_lr(tmp_path, monkeypatch, record_property):
    _stress(tmp_path, monkeypatch, 500, record_property)


@pytest.mark.parametrize("split", ["train", "Test", "", "validation"])
def test_evaluate_checkpoint_rejects_a_split_it_does_not_know(split, tmp_path):
    from poincare_resnet.api import evaluate_checkpoint

    # checked first: the checkpoint is never opened, nothing is written
    with pytest.raises(ValueError, match=rf"unknown split {split!r}; choose one of val, test"):
        evaluate_checkpoint(tmp_path / "missing.safetensors", split=split, out=tmp_path / "ev")
    assert list(tmp_path.iterdir()) == []
