"""Tests for crash-safe safetensors checkpoints."""

from __future__ import annotations

import json
import os
import random
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from _helpers import model_meta
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from poincare_resnet.training import checkpoint as ckpt_mod
from poincare_resnet.training.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    CheckpointManager,
    atomic_write_bytes,
    atomic_write_text,
    capture_rng_state,
    flatten_state,
    load_checkpoint,
    load_model_state,
    restore_rng_state,
    save_checkpoint,
    unflatten_state,
    verify_checkpoint,
)


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))


def _train_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(6, 4, generator=gen)
    loss = model(x).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def _setup() -> tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.StepLR]:
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=(0.8, 0.99))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    return model, opt, sched


def _save_small(path: Path, value: float = 1.0) -> Path:
    return save_checkpoint(
        path, model_state={"w": torch.full((3, 2), value)}, meta={"value": value}
    )


def test_full_round_trip(tmp_path: Path) -> None:
    model, opt, sched = _setup()
    for seed in range(2):
        _train_step(model, opt, seed)
        sched.step()
    random.seed(5)
    np.random.seed(5)  # noqa: NPY002
    torch.manual_seed(5)
    rng = capture_rng_state()
    path = save_checkpoint(
        tmp_path / "run.safetensors",
        model_state=model.state_dict(),
        meta={"epoch": 2, "name": "tiny"},
        optimizer_state=opt.state_dict(),
        scheduler_state=sched.state_dict(),
        rng_state=rng,
        extra_tensors={"ema": torch.arange(3.0)},
    )
    expected_draws = (torch.rand(5), random.random(), np.random.rand(3))  # noqa: NPY002

    sidecar = json.loads((tmp_path / "run.json").read_text())
    ck = load_checkpoint(path)
    assert ck.meta["epoch"] == 2 and ck.meta["name"] == "tiny"
    assert ck.meta["format_version"] == FORMAT_VERSION
    assert sidecar["sha256"] == ck.meta["sha256"] and sidecar["epoch"] == 2
    assert torch.equal(ck.extra_tensors["ema"], torch.arange(3.0))

    # model outputs are bit-identical
    model2, opt2, sched2 = _setup()
    load_model_state(model2, ck.model_state)
    opt2.load_state_dict(ck.optimizer_state)
    sched2.load_state_dict(ck.scheduler_state)
    x = torch.randn(5, 4)
    model.eval()
    model2.eval()
    assert torch.equal(model(x), model2(x))
    model.train()
    model2.train()
    assert sched2.get_last_lr() == sched.get_last_lr()
    assert opt2.param_groups[0]["betas"] == (0.8, 0.99)

    # optimizer continues identically
    _train_step(model, opt, 99)
    _train_step(model2, opt2, 99)
    for p, q in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(p, q)

    # RNG restored gives the same draws
    restore_rng_state(ck.rng_state)
    assert torch.equal(torch.rand(5), expected_draws[0])
    assert random.random() == expected_draws[1]
    np.testing.assert_array_equal(np.random.rand(3), expected_draws[2])  # noqa: NPY002


def test_flatten_int_keys_and_nested() -> None:
    t = torch.arange(4)
    obj = {
        "state": {0: {"step": torch.tensor(3.0), "buf": t}, 7: {}},
        "groups": [{"params": [0, 7], "betas": (0.9, 0.999), "flag": True, "x": None}],
        (1, "a"): [[1.5, "s"], False],
        "__tensor__": "not a tensor",
    }
    tensors, structure = flatten_state(obj, "opt")
    assert all(k.startswith("opt/") for k in tensors)
    json.dumps(structure)  # JSON-able
    back = unflatten_state(json.loads(json.dumps(structure)), tensors)
    assert set(back["state"]) == {0, 7}
    assert torch.equal(back["state"][0]["buf"], t)
    assert back["groups"] == obj["groups"]
    assert back[(1, "a")] == [[1.5, "s"], False]
    assert back["__tensor__"] == "not a tensor"


def test_flatten_rejects_unknown_types() -> None:
    with pytest.raises(TypeError, match="opt/f"):
        flatten_state({"f": object()}, "opt")


_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**40), 2**40),
    st.floats(allow_nan=False),
    st.text(max_size=5),
)
_key = st.one_of(st.integers(-5, 50), st.text(max_size=4))
_tree = st.recursive(
    _leaf,
    lambda kids: st.one_of(
        st.lists(kids, max_size=3),
        st.tuples(kids, kids),
        st.dictionaries(_key, kids, max_size=3),
    ),
    max_leaves=12,
)


@given(_tree)
def test_flatten_round_trip_property(obj: object) -> None:
    tensors, structure = flatten_state(obj, "p")
    assert tensors == {}
    assert unflatten_state(json.loads(json.dumps(structure)), tensors) == obj


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage", "missing", "empty"])
def test_corruption_detected(tmp_path: Path, damage: str) -> None:
    path = _save_small(tmp_path / "c.safetensors")
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        broken = bytearray(data)
        broken[-3] ^= 0xFF  # inside the tensor payload
        path.write_bytes(bytes(broken))
    elif damage == "garbage":
        path.write_bytes(b"this is not a checkpoint at all, just garbage text")
    elif damage == "missing":
        path.unlink()
    else:
        path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        verify_checkpoint(path)
    with pytest.raises(CheckpointError, match=re.escape(str(path))):
        load_checkpoint(path)


def test_checksum_message(tmp_path: Path) -> None:
    path = _save_small(tmp_path / "c.safetensors")
    broken = bytearray(path.read_bytes())
    broken[-1] ^= 0x01
    path.write_bytes(bytes(broken))
    with pytest.raises(CheckpointError, match="sha256 mismatch"):
        verify_checkpoint(path)


def test_manager_falls_back_and_prunes(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path / "ckpts", keep=2)
    for step in (1, 2, 3):
        mgr.save(step, model_state={"w": torch.full((2,), float(step))}, meta={"step": step})
    names = [p.name for p in mgr.paths()]
    assert names == ["ckpt-00000002.safetensors", "ckpt-00000003.safetensors"]
    assert not (tmp_path / "ckpts" / "ckpt-00000001.json").exists()

    newest = mgr.paths()[-1]
    newest.write_bytes(newest.read_bytes()[:-7])
    messages: list[str] = []
    ck = mgr.latest_valid(log=messages.append)
    assert ck is not None and ck.meta["step"] == 2
    assert torch.equal(ck.model_state["w"], torch.full((2,), 2.0))
    assert len(messages) == 1 and newest.name in messages[0]

    mgr.paths()[0].write_bytes(b"junk")
    messages.clear()
    assert mgr.latest_valid(log=messages.append) is None
    assert len(messages) == 2


def test_manager_never_deletes_just_written(tmp_path: Path) -> None:
    mgr = CheckpointManager(tmp_path, keep=1)
    mgr.save(10, model_state={}, meta={})
    written = mgr.save(5, model_state={}, meta={})
    assert written.exists()
    assert mgr.paths() == [written]


def test_atomic_write_failure_keeps_old_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "f.bin"
    atomic_write_bytes(target, b"old")

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_mod.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new" * 100)
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]

    monkeypatch.setattr(ckpt_mod.os, "fsync", boom)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    monkeypatch.undo()
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]

    atomic_write_text(target, "new")
    assert target.read_text() == "new"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_load_model_state_mismatches() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3))
    other = nn.Sequential(nn.Linear(4, 5), nn.Linear(5, 3))
    with pytest.raises(CheckpointError) as err:
        load_model_state(model, other.state_dict(), source="run-7")
    msg = str(err.value)
    assert "run-7" in msg and "0.weight" in msg
    assert "(5, 4)" in msg and "(8, 4)" in msg

    state = dict(model.state_dict())
    del state["1.bias"]
    state["2.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"missing key\(s\): 1\.bias") as err:
        load_model_state(model, state)
    assert "unexpected key(s): 2.weight" in str(err.value)


def test_load_model_state_casts_dtype() -> None:
    model = nn.Linear(3, 2)
    state = {k: v.double() + 1 for k, v in model.state_dict().items()}
    load_model_state(model, state)
    assert model.weight.dtype == torch.float32
    assert torch.equal(model.weight.detach(), state["weight"].float())


def test_module_never_unpickles() -> None:
    source = Path(ckpt_mod.__file__).read_text()
    assert not re.search(r"\bpickle\b|\bdill\b|\bmarshal\b", source)
    assert not re.search(r"\btorch\s*\.\s*load\b", source)
    assert "weights_only" not in source


# ------------------------------------------------------------------ resolved model config


def _nf_model_and_meta() -> tuple[nn.Module, dict]:
    from poincare_resnet.models.registry import create_model

    torch.manual_seed(0)
    model = create_model(
        "poincare_resnet20_nf", num_classes=10, in_chans=1, depth=8, widths=(4, 4, 4)
    )
    return model.eval(), model_meta(model)


def _nf_model_meta_input_logits() -> tuple[nn.Module, dict, torch.Tensor, torch.Tensor]:
    """:func:`_nf_model_and_meta`, an input batch and the model's logits on it."""
    model, meta = _nf_model_and_meta()
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1)).tanh()
    with torch.no_grad():
        return model, meta, x, model(x)


def _drift_nf_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """A later version changes two defaults of ``poincare_resnet20_nf`` (same parameter shapes)."""
    from poincare_resnet.models import registry

    drifted = {**registry._DEFAULTS["poincare_resnet20_nf"], "center_weight": False}
    drifted["residual_scale"] = 1.0
    monkeypatch.setitem(registry._DEFAULTS, "poincare_resnet20_nf", drifted)


def test_checkpoint_rebuilds_the_trained_network_after_a_registry_default_drifts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import warnings

    from poincare_resnet.api import load_model

    model, meta, x, saved = _nf_model_meta_input_logits()
    path = save_checkpoint(tmp_path / "nf.safetensors", model_state=model.state_dict(), meta=meta)
    assert load_checkpoint(path).meta["model_config"]["center_weight"] is True

    _drift_nf_defaults(monkeypatch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a format-2 checkpoint needs no assumption
        rebuilt, _ = load_model(path)
    assert rebuilt.model_config == meta["model_config"]
    with torch.no_grad():
        assert torch.equal(rebuilt(x), saved)


def _format1_checkpoint(path: Path, state: dict, meta: dict) -> Path:
    """A checkpoint as format 1 wrote it: no model_config, no metadata sha256."""
    from safetensors.torch import save as st_save

    tensors = {f"model/{k}": v.detach().clone().contiguous() for k, v in state.items()}
    record = {k: v for k, v in meta.items() if k != "model_config"}
    record.update(format_version=1, sha256=ckpt_mod._payload_sha256(tensors))
    record["_layout"] = {"optimizer": None, "scheduler": None, "rng": None}
    path.write_bytes(st_save(tensors, metadata={"poincare_resnet": json.dumps(record)}))
    return path


def test_format1_checkpoint_loads_with_a_warning_naming_the_assumption(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from poincare_resnet.api import load_model

    model, meta, x, saved = _nf_model_meta_input_logits()
    path = _format1_checkpoint(tmp_path / "old.safetensors", model.state_dict(), meta)
    warning = (
        r"checkpoint has no resolved model config \(format < 2\): rebuilding "
        r"poincare_resnet20_nf with today's registry defaults"
    )
    with pytest.warns(UserWarning, match=warning):
        same, _ = load_model(path)  # today's defaults are still those it was trained with
    with torch.no_grad():
        assert torch.equal(same(x), saved)
    # after the drift the old way silently builds another network from the same weights:
    # exactly what the resolved config prevents
    _drift_nf_defaults(monkeypatch)
    with pytest.warns(UserWarning, match=warning):
        other, _ = load_model(path)
    with torch.no_grad():
        assert not torch.allclose(other(x), saved)


def test_metadata_is_covered_by_a_sha256(tmp_path: Path) -> None:
    path = _save_small(tmp_path / "a.safetensors", value=0.5)
    data = path.read_bytes()
    tampered = data.replace(b'\\"value\\": 0.5', b'\\"value\\": 0.7', 1)
    assert tampered != data and len(tampered) == len(data)
    path.write_bytes(tampered)
    with pytest.raises(CheckpointError, match="metadata sha256 mismatch"):
        load_checkpoint(path)


def test_atomic_stem_replaces_every_suffix_or_none(tmp_path: Path) -> None:
    stem = tmp_path / "table"
    (tmp_path / "table.csv").write_text("old csv")
    with ckpt_mod.atomic_stem(stem, (".csv", ".md")) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".table.")
        Path(f"{tmp}.csv").write_text("new csv")
        Path(f"{tmp}.md").write_text("new md")
        assert (tmp_path / "table.csv").read_text() == "old csv"  # nothing visible before the end
    assert (tmp_path / "table.csv").read_text() == "new csv"
    assert (tmp_path / "table.md").read_text() == "new md"
    with pytest.raises(RuntimeError), ckpt_mod.atomic_stem(stem, (".csv", ".md")) as tmp:
        Path(f"{tmp}.csv").write_text("half")
        raise RuntimeError("crash while writing")
    assert (tmp_path / "table.csv").read_text() == "new csv"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.csv", "table.md"]
    with ckpt_mod.atomic_output(tmp_path / "fig.png") as tmp:
        assert tmp.suffix == ".png"  # savefig picks the format from it
        tmp.write_bytes(b"png")
    assert (tmp_path / "fig.png").read_bytes() == b"png"
