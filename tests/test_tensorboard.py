"""``train --log tensorboard``: the event files, read back with TensorBoard's own reader, hold
the metrics.jsonl scalars at the right global steps, the learnable curvature and per-stage
tangent-norm histograms; JSONL stays the default."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from poincare_resnet import cli
from poincare_resnet.models import create_model
from poincare_resnet.training.tb_logger import SCALAR_TAGS, stage_tangent_norms

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)

FLAGS = [
    "--dataset", "digits", "--limit-train", "96", "--batch-size", "32", "--epochs", "2",
    "--no-progress", "--device", "cpu", "--model-kwargs", "depth=8", "widths=[4,4,4]",
    "learnable_c=true",
]  # fmt: skip


def _accumulator(run: Path) -> EventAccumulator:
    ea = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "histograms": 0})
    ea.Reload()
    return ea


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("tb") / "run"
    assert cli.main(["train", *FLAGS, "--log", "tensorboard", "--out", str(run)]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return run, rows


def test_scalars_match_metrics_jsonl_at_the_epoch_steps(tb_run):
    run, rows = tb_run
    assert [r["step"] for r in rows] == [3, 6]
    ea = _accumulator(run)
    tags = set(ea.Tags()["scalars"])
    assert set(SCALAR_TAGS.values()) <= tags
    for key, tag in SCALAR_TAGS.items():
        events = ea.Scalars(tag)
        assert [e.step for e in events] == [r["step"] for r in rows], tag
        # TensorBoard stores float32
        want = torch.tensor([r[key] for r in rows], dtype=torch.float32)
        got = torch.tensor([e.value for e in events], dtype=torch.float32)
        assert torch.equal(got, want), (tag, got, want)


def test_learnable_curvature_is_logged(tb_run):
    run, rows = tb_run
    ea = _accumulator(run)
    events = ea.Scalars("curvature")
    assert [e.step for e in events] == [r["step"] for r in rows]
    from poincare_resnet.training.checkpoint import load_checkpoint

    # the last epoch's value is the curvature of last.safetensors
    state = load_checkpoint(run / "last.safetensors").model_state
    raws = [v for k, v in state.items() if k.endswith("curvature.raw")]
    assert raws, list(state)
    raw = raws[0]
    c = float(torch.nn.functional.softplus(raw.float()))
    assert events[-1].value == pytest.approx(c, rel=1e-6)
    assert events[-1].value != pytest.approx(0.1, rel=1e-6)  # it did learn


def test_histograms_of_every_stage_per_epoch(tb_run):
    run, rows = tb_run
    ea = _accumulator(run)
    tags = set(ea.Tags()["histograms"])
    want = {f"tangent_norm/{s}" for s in ("stem", "layer1", "layer2", "layer3", "pool")}
    assert want <= tags
    for tag in want:
        hists = ea.Histograms(tag)
        assert [h.step for h in hists] == [r["step"] for r in rows]
        assert all(h.histogram_value.min >= 0 for h in hists)


def test_stage_tangent_norms_are_channel_norms_of_the_stage_outputs():
    torch.manual_seed(0)
    model = create_model("poincare_resnet20", num_classes=10, in_chans=1, depth=8, widths=(4, 4, 4))
    model.train()
    x = torch.randn(5, 1, 8, 8) * 0.5
    norms = stage_tangent_norms(model, x)
    assert model.training  # restored
    model.eval()
    with torch.no_grad():
        s = model.stem(x)
        l3 = model.layer3(model.layer2(model.layer1(s)))
        pooled = model.pool(l3)
    torch.testing.assert_close(norms["stem"], s.double().norm(dim=1).flatten())
    torch.testing.assert_close(norms["layer3"], l3.double().norm(dim=1).flatten())
    torch.testing.assert_close(norms["pool"], pooled.double().norm(dim=1))
    assert norms["stem"].numel() == 5 * 8 * 8


def test_jsonl_is_the_default_and_writes_no_event_files(tmp_path, capsys):
    run = tmp_path / "run"
    flags = [f for f in FLAGS if f != "learnable_c=true"]
    assert cli.main(["train", *flags, "--epochs", "1", "--out", str(run)]) == 0
    capsys.readouterr()
    assert (run / "metrics.jsonl").is_file()
    assert not (run / "tensorboard").exists()
    assert json.loads((run / "config.json").read_text())["log"] == "jsonl"


def test_unknown_logger_is_refused(capsys):
    assert cli.main(["train", "--log", "wandb"]) == 2  # argparse's error, as one line
    assert "--log" in capsys.readouterr().err
