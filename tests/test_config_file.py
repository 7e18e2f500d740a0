"""``train --config FILE``: TOML / YAML / JSON files, flags override them, a run's own
``config.json`` repeats it exactly, bad keys and types are refused with exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from poincare_resnet import cli
from poincare_resnet.training import trainer
from poincare_resnet.training.config_file import (
    ConfigFileError,
    check_config_dict,
    explicit_train_fields,
    load_config_file,
)
from poincare_resnet.training.trainer import TrainConfig

TIMING_KEYS = ("epoch_time_s", "images_per_s")
# 96 digits images, batch 32: 3 steps per epoch, 2 epochs; a depth-8 model of width 4
TINY_FLAGS = [
    "--dataset", "digits", "--limit-train", "96", "--batch-size", "32", "--epochs", "2",
    "--no-progress", "--deterministic", "--device", "cpu", "--max-steps", "6",
    "--model-kwargs", "depth=8", "widths=[4,4,4]",
]  # fmt: skip


@pytest.fixture
def captured(monkeypatch):
    """Replace the training loop by a recorder of the config the CLI built."""
    seen: list[TrainConfig] = []

    def fake_train(cfg, resume=None, log=print):
        seen.append(cfg)
        return {}

    monkeypatch.setattr(trainer, "train", fake_train)
    return seen


def _strip_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_run_repeated_from_its_config_json_reproduces_metrics_exactly(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    assert cli.main(["train", *TINY_FLAGS, "--lr", "3e-3", "--out", str(a)]) == 0
    # the repeat names only the file and a new --out (and the same step budget, so that a
    # config that was not applied fails fast instead of training the 40-epoch default)
    assert cli.main(["train", "--config", str(a / "config.json"), "--out", str(b)]) == 0
    capsys.readouterr()
    rows_a, rows_b = _rows(a), _rows(b)
    assert len(rows_a) == 2
    # timing fields (seconds, images/s) measure the machine, not the run: left out
    assert _strip_timing(rows_a) == _strip_timing(rows_b)
    cfg_a = json.loads((a / "config.json").read_text())
    cfg_b = json.loads((b / "config.json").read_text())
    assert cfg_b.pop("out") == str(b) and cfg_a.pop("out") == str(a)
    assert cfg_a == cfg_b
    assert cfg_b["lr"] == 3e-3 and cfg_b["model_kwargs"] == {"depth": 8, "widths": [4, 4, 4]}
    sa = json.loads((a / "summary.json").read_text())
    sb = json.loads((b / "summary.json").read_text())
    assert (sa["test_top1"], sa["test_loss"]) == (sb["test_top1"], sb["test_loss"])


def test_flags_override_the_file_and_unset_fields_keep_defaults(tmp_path, captured):
    f = tmp_path / "c.toml"
    f.write_text('model = "euclidean_resnet20"\nepochs = 7\nlr = 0.01\nbatch-size = 16\n')
    assert cli.main(["train", "--config", str(f), "--epochs", "3", "--no-progress"]) == 0
    cfg = captured[-1]
    assert cfg.epochs == 3  # the flag wins
    assert (cfg.model, cfg.lr, cfg.batch_size) == ("euclidean_resnet20", 0.01, 16)  # the file
    assert cfg.progress is False
    assert cfg.weight_decay == TrainConfig().weight_decay  # neither: the default


def test_a_flag_equal_to_its_default_still_overrides_the_file(tmp_path, captured):
    f = tmp_path / "c.json"
    f.write_text(json.dumps({"epochs": 7, "augment": False}))
    default = TrainConfig().epochs
    assert cli.main(["train", "--config", str(f), "--epochs", str(default)]) == 0
    assert captured[-1].epochs == default
    assert captured[-1].augment is False


def test_toml_yaml_and_json_give_the_same_config(tmp_path):
    pytest.importorskip("yaml")
    (tmp_path / "c.toml").write_text(
        'dataset = "fashion-mnist"\nlr = 1\nmodel_kwargs = { init = "center" }\ndata_dir = "d"\n'
    )
    (tmp_path / "c.yaml").write_text(
        "dataset: fashion-mnist\nlr: 1\nmodel_kwargs:\n  init: center\ndata_dir: d\n"
    )
    (tmp_path / "c.json").write_text(
        json.dumps({"dataset": "fashion-mnist", "lr": 1, "model_kwargs": {"init": "center"},
                    "data_dir": "d"})
    )  # fmt: skip
    loaded = [load_config_file(tmp_path / f"c.{s}") for s in ("toml", "yaml", "json")]
    assert loaded[0] == loaded[1] == loaded[2]
    assert loaded[0]["lr"] == 1 and loaded[0]["model_kwargs"] == {"init": "center"}


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("epoch = 5\n", "epoch"),  # unknown key (typo of epochs)
        ('epochs = "5"\n', "epochs"),  # str for int
        ("epochs = 2.5\n", "epochs"),  # float for int
        ("lr = true\n", "lr"),  # bool for float
        ("augment = 1\n", "augment"),  # int for bool
        ("model_kwargs = 3\n", "model_kwargs"),  # int for dict
        ("dataset = 3\n", "dataset"),  # int for str
    ],
)
def test_unknown_key_or_wrong_type_exits_2_naming_the_key(tmp_path, capsys, captured, text, key):
    f = tmp_path / "bad.toml"
    f.write_text(text)
    assert cli.main(["train", "--config", str(f)]) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert f"'{key}'" in err, err
    assert not captured  # nothing was trained


def test_unknown_key_suggests_the_field(tmp_path):
    with pytest.raises(ConfigFileError, match="did you mean epochs"):
        check_config_dict({"epoch": 3})


def test_null_only_for_optional_fields():
    assert check_config_dict({"data_dir": None, "limit_train": None}) == {
        "data_dir": None,
        "limit_train": None,
    }
    with pytest.raises(ConfigFileError, match="'epochs'"):
        check_config_dict({"epochs": None})


def test_unreadable_files_are_refused_clearly(tmp_path, capsys, captured):
    bad = tmp_path / "c.toml"
    bad.write_text("epochs = = 3\n")
    missing = tmp_path / "none.yaml"
    other = tmp_path / "c.ini"
    other.write_text("x")
    listed = tmp_path / "c.json"
    listed.write_text("[1, 2]")
    for f, msg in ((bad, "not valid TOML"), (missing, "no such file"), (other, "unknown format"),
                   (listed, "table of options")):  # fmt: skip
        assert cli.main(["train", "--config", str(f)]) == cli.EXIT_BAD_INPUT
        assert msg in capsys.readouterr().err
    assert not captured


def test_explicit_train_fields_sees_only_written_options():
    given = explicit_train_fields(
        ["train", "--config", "x.toml", "--epochs", "40", "--no-progress", "--no-augment"]
    )
    assert given == {"epochs", "progress", "augment"}
    assert explicit_train_fields(["train"]) == set()
