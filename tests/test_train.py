"""End-to-end training on a tiny digits subset: run directory, checkpoints, resume, CLI."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _helpers import assert_same_weights, checkpoint_weights, tiny_config

from poincare_resnet import cli
from poincare_resnet.api import load_model
from poincare_resnet.data import load_dataset
from poincare_resnet.models import create_model, list_models
from poincare_resnet.training import trainer
from poincare_resnet.training.checkpoint import load_checkpoint, load_model_state
from poincare_resnet.training.trainer import TrainConfig, evaluate_split, load_run_config, train

REPO = Path(__file__).resolve().parents[1]
TIMING_KEYS = ("epoch_time_s", "images_per_s")


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _stdout_json(text: str) -> dict:
    """The JSON object the CLI prints last (after the log lines)."""
    start = text.rindex("\n{") + 1 if "\n{" in text else text.index("{")
    return json.loads(text[start:])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One uninterrupted 2-epoch run (run A); keeps the in-memory model the trainer built."""
    run = tmp_path_factory.mktemp("train") / "run-a"
    built = []
    original = trainer.create_model

    def keep(*args, **kwargs):
        model = original(*args, **kwargs)
        built.append(model)
        return model

    messages: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer, "create_model", keep)
        summary = train(tiny_config(run), log=messages.append)
    assert len(built) == 1
    return {"run": run, "summary": summary, "model": built[0], "messages": messages}


def test_run_directory_holds_every_artifact(trained):
    run, summary = trained["run"], trained["summary"]
    for name in (
        "config.json",
        "metrics.jsonl",
        "best.safetensors",
        "best.json",
        "last.safetensors",
        "last.json",
        "training_curves.png",
        "summary.json",
        "report.md",
    ):
        assert (run / name).is_file(), name
        assert (run / name).stat().st_size > 0, name
    assert (run / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    config = json.loads((run / "config.json").read_text())
    assert config["model"] == "poincare_resnet20"
    assert config["limit_train"] == 96 and config["epochs"] == 2

    rows = _metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        for key in (
            "epoch",
            "step",
            "lr",
            "train_loss",
            "train_top1",
            "val_loss",
            "val_top1",
            "val_top5",
        ):
            assert key in r, key
        assert 0.0 <= r["val_top1"] <= 1.0 and 0.0 <= r["train_top1"] <= 1.0
        assert r["train_loss"] > 0
    assert rows[-1]["step"] == 6

    on_disk = json.loads((run / "summary.json").read_text())
    assert on_disk["test_top1"] == summary["test_top1"]
    assert 0.0 <= on_disk["test_top1"] <= 1.0
    assert on_disk["epochs"] == 2 and on_disk["sizes"]["train"] == 96
    assert on_disk["best_epoch"] in (1, 2)
    assert on_disk["best_val_top1"] == max(r["val_top1"] for r in rows)

    sidecar = json.loads((run / "best.json").read_text())
    assert sidecar["model_name"] == "poincare_resnet20"
    assert sidecar["epoch"] == on_disk["best_epoch"]
    assert sidecar["sha256"] == load_checkpoint(run / "best.safetensors").meta["sha256"]
    assert json.loads((run / "last.json").read_text())["epoch"] == 2

    report = (run / "report.md").read_text()
    assert "poincare_resnet20 on digits" in report and "training_curves.png" in report
    assert any(m.startswith("epoch 2/2") for m in trained["messages"])
    assert any(m.startswith("test top-1") for m in trained["messages"])
    assert list((run / "checkpoints").glob("ckpt-*.safetensors"))


def test_load_model_reproduces_the_trained_logits(trained):
    run = trained["run"]
    x = load_dataset("digits").test_x[:64]

    model, meta = load_model(run)  # the run directory means its best checkpoint
    assert not model.training
    assert meta["model_name"] == "poincare_resnet20" and meta["dataset"] == "digits"
    with torch.no_grad():
        logits = model(x)

    # the trainer's own model (best weights were loaded into it before the test evaluation)
    original = trained["model"].eval()
    with torch.no_grad():
        assert torch.equal(original(x), logits)

    # a model rebuilt by hand from the same stored state
    ck = load_checkpoint(run / "best.safetensors")
    kwargs = dict(ck.meta["model_kwargs"])
    rebuilt = create_model(
        ck.meta["model_name"], kwargs.pop("num_classes"), kwargs.pop("in_chans"), **kwargs
    )
    load_model_state(rebuilt, ck.model_state)
    rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(rebuilt(x), logits)

    # and the summary's test accuracy is what the checkpoint scores
    data = load_dataset("digits")
    res = evaluate_split(model, data.test_x, data.test_y)
    assert res["top1"] == trained["summary"]["test_top1"]

    last, _ = load_model(run / "last.safetensors")
    with torch.no_grad():
        assert torch.isfinite(last(x)).all()


def test_resume_after_interruption_matches_uninterrupted_run(trained, tmp_path):
    run_b = tmp_path / "run-b"
    # interrupted mid-epoch 2 (step 4 of 6), with step checkpoints
    out = train(tiny_config(run_b, max_steps=4, ckpt_every_steps=2), log=lambda _m: None)
    assert out == {}
    assert not (run_b / "summary.json").exists()
    ckpts = sorted(p.name for p in (run_b / "checkpoints").glob("ckpt-*.safetensors"))
    assert ckpts[-1] == "ckpt-00000004.safetensors"
    assert [r["epoch"] for r in _metrics(run_b)] == [1]

    stored = load_run_config(run_b)
    assert stored.max_steps == 4  # persisted, but a runtime option: the caller's value wins
    messages: list[str] = []
    summary = train(
        dataclasses.replace(stored, max_steps=None), resume=str(run_b), log=messages.append
    )
    assert any("resumed" in m and "ckpt-00000004" in m and "step 4" in m for m in messages)
    assert summary["test_top1"] == trained["summary"]["test_top1"]

    run_a = trained["run"]
    assert_same_weights(
        checkpoint_weights(run_a / "last.safetensors"),
        checkpoint_weights(run_b / "last.safetensors"),
    )
    assert_same_weights(
        checkpoint_weights(run_a / "best.safetensors"),
        checkpoint_weights(run_b / "best.safetensors"),
    )
    rows_a, rows_b = _metrics(run_a), _metrics(run_b)
    assert len(rows_a) == len(rows_b) == 2
    for ra, rb in zip(rows_a, rows_b, strict=True):
        for key in ra:
            if key not in TIMING_KEYS:
                assert ra[key] == rb[key], (ra["epoch"], key)

    # the final resume checkpoint holds the same optimizer state as run A's
    opt_a = load_checkpoint(sorted((run_a / "checkpoints").glob("*.safetensors"))[-1])
    opt_b = load_checkpoint(sorted((run_b / "checkpoints").glob("*.safetensors"))[-1])
    for (k, sa), sb in zip(
        opt_a.optimizer_state["state"].items(), opt_b.optimizer_state["state"].values(), strict=True
    ):
        for name in sa:
            assert torch.equal(sa[name], sb[name]), (k, name)


def test_resume_of_a_finished_run_does_not_train_again(trained, tmp_path):
    run = tmp_path / "copy"
    run.mkdir()
    for p in trained["run"].rglob("*"):
        if p.is_file():
            target = run / p.relative_to(trained["run"])
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(p.read_bytes())
    before = (run / "last.safetensors").read_bytes()
    summary = train(TrainConfig(progress=False), resume=str(run), log=lambda _m: None)
    assert summary["test_top1"] == trained["summary"]["test_top1"]
    assert (run / "last.safetensors").read_bytes() == before
    assert len(_metrics(run)) == 2


def test_resume_with_reached_max_steps_takes_no_step(tmp_path):
    run = tmp_path / "run"
    train(tiny_config(run, max_steps=4, ckpt_every_steps=2), log=lambda _m: None)
    stored = load_run_config(run)  # max_steps=4, already reached
    train(stored, resume=str(run), log=lambda _m: None)
    latest = sorted((run / "checkpoints").glob("ckpt-*.safetensors"))[-1]
    assert latest.name == "ckpt-00000004.safetensors"


def test_model_kwargs_override_survives_the_checkpoint(tmp_path):
    run = tmp_path / "run"
    train(
        tiny_config(run, epochs=1, limit_train=64, model_kwargs={"depth": 8}), log=lambda _m: None
    )
    model, meta = load_model(run)
    assert model.depth == 8


# ------------------------------------------------------------------------------ CLI


def test_cli_train_prints_test_accuracy_json(tmp_path, capsys):
    out = tmp_path / "cli-run"
    rc = cli.main(
        [
            "train",
            "--epochs",
            "1",
            "--limit-train",
            "64",
            "--batch-size",
            "32",
            "--out",
            str(out),
            "--no-progress",
            "--log-every",
            "1",
            "--model-kwargs",
            "init=identity",
        ]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    result = _stdout_json(captured.out)
    assert set(result) == {"test_top1", "test_top5", "best_val_top1", "run_dir"}
    assert 0.0 <= result["test_top1"] <= result["test_top5"] <= 1.0
    assert Path(result["run_dir"]) == out
    assert "epoch 1/1" in captured.out
    config = json.loads((out / "config.json").read_text())
    assert config["model_kwargs"] == {"init": "identity"} and config["progress"] is False
    assert json.loads((out / "summary.json").read_text())["test_top1"] == result["test_top1"]


def test_cli_models_lists_names(capsys):
    assert cli.main(["models"]) == 0
    names = capsys.readouterr().out.split()
    assert names == list_models()
    assert cli.main(["models", "*20*"]) == 0
    names = capsys.readouterr().out.split()
    assert names and all("20" in n for n in names)


def test_cli_without_command_prints_help(capsys):
    assert cli.main([]) == cli.EXIT_BAD_INPUT
    assert "train" in capsys.readouterr().out


def test_cli_evaluate_writes_json_and_confusion_matrix(trained, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = cli.main(["evaluate", str(trained["run"]), "--out", str(out)])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    printed = json.loads(captured.out)
    written = json.loads((out / "evaluation.json").read_text())
    assert printed == written
    assert written["dataset"] == "digits" and written["split"] == "test"
    assert written["test_top1"] == pytest.approx(trained["summary"]["test_top1"])
    assert len(written["per_class_accuracy"]) == 10
    assert (out / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    rc = cli.main(["evaluate", str(trained["run"] / "last.safetensors"), "--split", "val"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "val_top1" in json.loads(captured.out)


def test_python_dash_m_entry_point_lists_models():
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "poincare_resnet", "models", "*resnet20*"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    names = proc.stdout.split()
    assert "poincare_resnet20" in names and "hybrid_resnet20_w16" in names
    assert all("resnet20" in n for n in names)
