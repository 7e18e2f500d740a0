"""Tests for the ``ood`` / ``attack`` / ``explain`` commands (Python API and CLI)."""

from __future__ import annotations

import csv
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from poincare_resnet import create_model
from poincare_resnet.cli import main
from poincare_resnet.evaluation.commands import (
    resolve_ood_sets,
    run_attack,
    run_explain,
    run_ood,
)
from poincare_resnet.training.checkpoint import save_checkpoint

DIGIT_CLASSES = [str(i) for i in range(10)]


def _save(model: torch.nn.Module, path: Path) -> Path:
    """A checkpoint with the metadata the trainer writes (``model_meta`` in trainer.py)."""
    meta = {
        "model_name": model.model_name,
        "model_kwargs": model.model_kwargs,
        "dataset": "digits",
        "num_classes": 10,
        "in_chans": 1,
        "image_size": [8, 8],
        "class_names": DIGIT_CLASSES,
        "dtype": "float32",
    }
    return save_checkpoint(path, model_state=model.state_dict(), meta=meta)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpts")
    torch.manual_seed(0)
    out = {}
    for name in ("poincare_resnet20", "euclidean_resnet20"):
        model = create_model(name, num_classes=10, in_chans=1)
        out[name] = _save(model, root / name / "best.safetensors")
    return out


def _read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_run_ood_builtin_sets_and_image_dir(checkpoints, tmp_path):
    from PIL import Image

    img_dir = tmp_path / "imgs"
    img_dir.mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(
            img_dir / f"{i}.png"
        )
    out = tmp_path / "ood"
    rows = run_ood(
        checkpoints["poincare_resnet20"].parent,  # a run directory
        ["gaussian", str(img_dir)],
        out=out,
        scores=("energy", "feature_norm"),
        repeats=2,
        subsample=10,
    )
    assert len(rows) == 4
    assert {r["ood_set"] for r in rows} == {"gaussian", "imgs"}
    for r in rows:
        assert 0.0 <= r["auroc"] <= 1.0 and 0.0 <= r["fpr95"] <= 1.0
        assert r["repeats"] == 2 and r["n_in"] == 10 and r["n_out"] == 10
        assert r["model"] == "poincare_resnet20" and r["dataset"] == "digits"
    for name in ("ood.csv", "ood.md", "roc_energy.png", "hist_feature_norm.png"):
        assert (out / name).is_file(), name
    assert len(_read_csv(out / "ood.csv")) == 4


def test_resolve_ood_sets_cifar_file_and_errors(tmp_path):
    path = tmp_path / "batch"
    data = np.random.default_rng(0).integers(0, 255, (5, 3072), dtype=np.uint8)
    with open(path, "wb") as fh:
        pickle.dump({"data": data, "labels": [0] * 5}, fh)
    in_x = torch.zeros(7, 1, 8, 8)
    sets = resolve_ood_sets(["uniform", str(path)], in_x)
    assert sets["uniform"].shape == (7, 1, 8, 8)
    assert sets["batch"].shape == (5, 1, 8, 8)
    assert float(sets["batch"].abs().max()) <= 1.0
    with pytest.raises(ValueError, match="neither a builtin"):
        resolve_ood_sets(["no-such-set"], in_x)


def test_run_attack_eps_zero_is_clean(checkpoints, tmp_path):
    rows = run_attack(
        checkpoints["euclidean_resnet20"],
        attacks=("fgsm", "pgd"),
        eps=(0.0, 3.2 / 255),
        steps=2,
        limit=12,
        out=tmp_path,
    )
    assert [(r["attack"], r["eps_255"]) for r in rows] == [
        ("fgsm", 0.0),
        ("fgsm", pytest.approx(3.2)),
        ("pgd", 0.0),
        ("pgd", pytest.approx(3.2)),
        ("worst", 0.0),  # per sample, correct under every attack (tests/test_attacks.py)
        ("worst", pytest.approx(3.2)),
    ]
    for r in rows:
        assert r["n"] == 12 and 0.0 <= r["accuracy"] <= 1.0
        if r["eps"] == 0:
            assert r["accuracy"] == r["clean_accuracy"]
    assert (tmp_path / "attack.csv").is_file() and (tmp_path / "accuracy_vs_eps.png").is_file()


def test_run_explain_two_models(checkpoints, tmp_path):
    rows = run_explain(list(checkpoints.values()), images=[0, 5], out=tmp_path)
    assert len(rows) == 4
    assert {r["model"] for r in rows} == set(checkpoints)
    assert all(r["label"] in DIGIT_CLASSES and 0.0 <= r["confidence"] <= 1.0 for r in rows)
    assert (tmp_path / "explanations.png").stat().st_size > 0
    with pytest.raises(ValueError, match="out of range"):
        run_explain([checkpoints["euclidean_resnet20"]], images=[10_000])


def test_cli_ood_attack_explain(checkpoints, tmp_path, capsys):
    ck = str(checkpoints["poincare_resnet20"])
    ck2 = str(checkpoints["euclidean_resnet20"])
    out = tmp_path / "o"
    args = ["--ood-sets", "uniform,digits", "--repeats", "1", "--scores", "energy"]
    assert main(["ood", ck, *args, "--out", str(out), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "| model | dataset | ood_set | score |" in printed and "uniform" in printed
    assert (out / "roc_energy.png").is_file() and (out / "hist_energy.png").is_file()

    out = tmp_path / "a"
    argv = ["attack", ck2, "--attack", "fgsm", "--eps", "0.8,3.2", "--limit", "8", "--out"]
    assert main([*argv, str(out)]) == 0
    rows = _read_csv(out / "attack.csv")
    assert [float(r["eps_255"]) for r in rows] == pytest.approx([0.8, 3.2])
    assert "fgsm" in capsys.readouterr().out

    out = tmp_path / "e"
    assert main(["explain", ck, ck2, "--images", "0,1", "--out", str(out)]) == 0
    assert (out / "explanations.png").is_file() and len(_read_csv(out / "explanations.csv")) == 4


@pytest.mark.parametrize(
    "argv, message",
    [
        (["ood", "{missing}"], "does not exist"),
        (["attack", "{missing}"], "does not exist"),
        (["explain", "{missing}"], "does not exist"),
        (["ood", "{ck}", "--ood-sets", "nope"], "neither a builtin"),
        (["attack", "{ck}", "--attack", "cw"], "unknown attack"),
        (["explain", "{ck}", "--images", "999"], "out of range"),
    ],
)
def test_cli_bad_input_exit_code_2(checkpoints, tmp_path, capsys, argv, message):
    subs = {
        "missing": str(tmp_path / "nope.safetensors"),
        "ck": str(checkpoints["euclidean_resnet20"]),
    }
    argv = [a.format(**subs) for a in argv] + ["--out", str(tmp_path / "out")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "poincare-resnet: error:" in err and message in err
