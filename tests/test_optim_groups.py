"""Weight decay's parameter groups (``--no-decay``): curvatures never decay, norm weights and
biases not by default, and an old run (whose config predates the option) resumes as it ran."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from _helpers import tiny_config
from torch import nn

from poincare_resnet.models import create_model
from poincare_resnet.training import TrainConfig, train
from poincare_resnet.training import trainer as trainer_mod
from poincare_resnet.training.config_file import check_config_dict
from poincare_resnet.training.optim import (
    build_optimizer,
    no_decay_parameter_names,
    parameter_groups,
)
from poincare_resnet.training.rundir import load_run_config

TINY = {"depth": 8, "widths": (4, 4, 8), "in_chans": 1, "num_classes": 3}


def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {
        "hybrid": create_model("hybrid_resnet20", **TINY),
        "poincare": create_model("poincare_resnet20", learnable_c=True, **TINY),
        "euclidean": create_model("euclidean_resnet20", **TINY),
    }


@pytest.mark.parametrize("name", ["hybrid", "poincare", "euclidean"])
def test_groups_cover_every_parameter_once_and_spare_exactly_the_vectors(name):
    """In these models (no learnable residual scale) the standard exemptions are exactly the
    parameters of at most one axis: curvature (0-d), norm weights and biases (1-d), the
    'ndim <= 1' rule of timm, an independent formulation."""
    model = _models()[name]
    groups = parameter_groups(model, 0.5, "standard")
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert set(ids) == {id(p) for p in model.parameters()}
    exempt = no_decay_parameter_names(model)
    assert exempt == [k for k, p in model.named_parameters() if p.dim() <= 1]
    assert [g["weight_decay"] for g in groups] == [0.5, 0.0]
    assert {id(p) for p in groups[1]["params"]} == {
        id(p) for k, p in model.named_parameters() if k in exempt
    }
    curvatures = [k for k in exempt if "curvature" in k]
    assert len(curvatures) == (name != "euclidean")  # one shared module, one parameter
    assert no_decay_parameter_names(model, "curvature") == curvatures
    assert no_decay_parameter_names(model, "none") == []
    assert len(parameter_groups(model, 0.5, "none")) == 1


def test_a_learnable_residual_scale_decays():
    model = create_model("poincare_resnet20", norm="none", residual_scale="learnable", **TINY)
    exempt = set(no_decay_parameter_names(model))
    alphas = [k for k, _ in model.named_parameters() if k.endswith("alpha")]
    assert alphas and not exempt & set(alphas)
    with pytest.raises(ValueError, match="unknown no-decay rule 'all'"):
        no_decay_parameter_names(model, "all")


def _zero_grad_step(model: nn.Module, optimizer: str, rule: str) -> dict[str, torch.Tensor]:
    """One step with weight decay 0.5 and every gradient 0: the parameters before it."""
    cfg = TrainConfig(optimizer=optimizer, lr=0.1, momentum=0.0, weight_decay=0.5, no_decay=rule)
    opt = build_optimizer(cfg, model)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    return before


@pytest.mark.parametrize("optimizer", ["sgd", "adam", "adamw"])
def test_with_zero_gradients_decay_moves_weights_but_never_a_curvature(optimizer):
    model = _models()["poincare"]
    before = _zero_grad_step(model, optimizer, "standard")
    now = dict(model.named_parameters())
    assert torch.equal(now["curvature.raw"], before["curvature.raw"])
    assert torch.equal(now["stem.1.weight"], before["stem.1.weight"])  # a batch norm's scale
    conv = "layer1.0.conv1.weight"
    assert now[conv].norm() < 0.999 * before[conv].norm()
    if optimizer == "sgd":  # w ← w − lr·wd·w
        torch.testing.assert_close(now[conv], before[conv] * (1 - 0.1 * 0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_old_rule_decays_the_curvature_and_curvature_rule_the_norm_weights(dtype):
    """``"none"`` is the behaviour before the option (c pulled toward ln 2 by decay);
    ``"curvature"`` spares only the curvature."""
    model = _models()["hybrid"].to(dtype)
    before = _zero_grad_step(model, "sgd", "none")
    now = dict(model.named_parameters())
    raw = "fc.curvature.raw"  # the head's, also model.curvature
    torch.testing.assert_close(now[raw], before[raw] * 0.95)
    before = _zero_grad_step(model, "sgd", "curvature")
    torch.testing.assert_close(now["stem.1.weight"], before["stem.1.weight"] * 0.95)
    assert torch.equal(now[raw], before[raw])


def test_an_old_run_resumes_with_its_single_decayed_group(tmp_path, monkeypatch):
    """A run whose ``config.json`` predates ``no_decay`` (one optimizer group, everything
    decayed) resumes with that layout: its optimizer state loads and the run finishes. The
    standard groups could not load it."""
    run = tmp_path / "old"
    old = tiny_config(run, epochs=1, max_steps=2, ckpt_every_steps=2, no_decay="none")
    train(old, log=lambda _m: None)
    record = json.loads((run / "config.json").read_text())
    del record["no_decay"]
    (run / "config.json").write_text(json.dumps(record))
    stored = load_run_config(run)
    assert stored.no_decay == "none"
    built = []
    original = trainer_mod.build_optimizer
    monkeypatch.setattr(
        trainer_mod, "build_optimizer", lambda c, m: built.append(original(c, m)) or built[-1]
    )
    messages: list[str] = []
    summary = train(dataclasses.replace(stored, max_steps=None), str(run), messages.append)
    assert any("resumed" in m and "step 2" in m for m in messages)
    assert summary["epochs"] == 1 and len(built[0].param_groups) == 1
    standard = build_optimizer(dataclasses.replace(stored, no_decay="standard"), _tiny_model())
    with pytest.raises(ValueError, match="parameter group"):
        standard.load_state_dict(built[0].state_dict())


def _tiny_model() -> nn.Module:
    return create_model("poincare_resnet20", num_classes=10, in_chans=1)


def test_no_decay_option_is_checked_in_configs_and_files():
    with pytest.raises(ValueError, match="--no-decay must be one of"):
        TrainConfig(no_decay="bias").validate()
    assert check_config_dict({"no-decay": "curvature"}) == {"no_decay": "curvature"}
    assert TrainConfig().no_decay == "standard"
