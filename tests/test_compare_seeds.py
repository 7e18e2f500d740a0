"""``experiment compare --seeds``: every model once per seed, mean ± sample std in the tables,
per-seed values in the JSON, finished runs reused by a second invocation."""

from __future__ import annotations

import dataclasses
import json
import statistics

import pytest
from _helpers import tiny_config

from poincare_resnet.evaluation.tables import SEEDS_STD, mean_over_seeds, write_table
from poincare_resnet.experiments import run_experiment
from poincare_resnet.experiments.common import TrainRecipe, same_recipe_run, train_or_reuse
from poincare_resnet.experiments.compare import model_spec
from poincare_resnet.training import trainer

OPTIONS = {
    "models": "hybrid_resnet20:hybrid_head=fc",  # a model with options (the capped head)
    "seeds": "0,1",
    "attacks": "fgsm",
    "ood_sets": "gaussian",
    "scores": "energy",
    "threads": 1,
}


def test_mean_over_seeds_keeps_settings_and_aggregates_numbers(tmp_path):
    rows = [
        {"model": "a", "seed": 0, "acc": 0.5, "params": 7, "steps": 3, "note": "x", "tag": "p"},
        {"model": "a", "seed": 1, "acc": 0.7, "params": 7, "steps": 5, "note": "x", "tag": "q"},
        {"model": "b", "seed": 0, "acc": 0.9, "params": 9, "steps": 3, "note": "y", "tag": "p"},
    ]
    a, b = mean_over_seeds(rows, ("model",))
    assert a["n_seeds"] == 2 and a["params"] == 7 and "params" + SEEDS_STD not in a
    assert a["acc"] == pytest.approx(0.6) and a["acc" + SEEDS_STD] == pytest.approx(0.02**0.5)
    assert a["steps"] == 4 and a["steps" + SEEDS_STD] == pytest.approx(2**0.5)  # ints that vary
    assert a["note"] == "x" and "tag" not in a and "seed" not in a
    assert b["n_seeds"] == 1 and b["acc"] == 0.9 and b["acc" + SEEDS_STD] is None
    md = write_table([a, b], tmp_path / "t")
    assert "| model | n_seeds | acc | params | steps | note |" in md
    assert "| a | 2 | 0.6 ± 0.14 | 7 | 4 ± 1.4 | x |" in md and "| b | 1 | 0.9 | 9 |" in md
    assert SEEDS_STD in (tmp_path / "t.csv").read_text()


def test_compare_over_two_seeds_reports_mean_and_std_and_reuses_finished_runs(
    tmp_path, monkeypatch
):
    messages: list[str] = []
    rows = run_experiment("compare", tmp_path, tiny=True, log=messages.append, **OPTIONS)
    summary = json.loads((tmp_path / "compare_summary.json").read_text())
    per_seed = summary["per_seed"]["models"]
    assert [r["seed"] for r in per_seed] == [0, 1] and summary["recipe"]["seeds"] == [0, 1]
    (row,) = rows
    assert row["model"] == OPTIONS["models"] and row["n_seeds"] == 2 and row["diverged_seeds"] == 0
    numbers = [k for k, v in per_seed[0].items() if isinstance(v, float)]
    assert {"test_top1", "auroc_energy_gaussian", "fgsm_acc_0.8"} <= set(numbers)
    for k in numbers:
        values = [r[k] for r in per_seed]
        assert row[k] == pytest.approx(statistics.fmean(values), rel=1e-12, abs=1e-15)
        assert row[k + SEEDS_STD] == pytest.approx(statistics.stdev(values), rel=1e-12, abs=1e-15)
    assert any(row[k + SEEDS_STD] > 0 for k in numbers)  # the seeds trained different networks
    attacks = summary["per_seed"]["attacks"]
    att_csv = (tmp_path / "compare_attacks.md").read_text()
    assert len(attacks) == 8 and att_csv.count("±") >= 4
    assert " ± " in (tmp_path / "compare.md").read_text()

    runs = [tmp_path / "runs" / f"hybrid_resnet20_hybrid_head=fc-seed{s}" for s in (0, 1)]
    stamps = [(r / "best.safetensors").stat().st_mtime_ns for r in runs]

    def no_training(*_a, **_k):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(trainer, "train", no_training)
    again: list[str] = []
    rows2 = run_experiment("compare", tmp_path, tiny=True, log=again.append, **OPTIONS)
    assert sum("reusing the finished run" in m for m in again) == 2
    assert sum("reusing its evaluation" in m for m in again) == 2  # nothing attacked twice
    assert [(r / "best.safetensors").stat().st_mtime_ns for r in runs] == stamps
    assert rows2[0]["test_top1"] == row["test_top1"]

    cfg = TrainRecipe("digits", None, 1, 32, 1e-3, 64, 1, 1, "cpu").config(
        "hybrid_resnet20",
        runs[1],
        optimizer="adam",
        weight_decay=1e-4,
        model_kwargs={"hybrid_head": "fc"},
    )
    assert same_recipe_run(cfg)
    assert not same_recipe_run(dataclasses.replace(cfg, lr=2e-3))
    assert not same_recipe_run(dataclasses.replace(cfg, seed=0))
    assert not same_recipe_run(dataclasses.replace(cfg, model_kwargs={}))


def test_compare_worst_case_zero_gradients_and_evaluation_cache(tmp_path, monkeypatch):
    """Two attacks give a ``worst`` row per ε, never above either attack (per image AND), and
    the zero-gradient column; a second compare with the same settings reads the cached
    evaluation (no attack runs), one with another attack budget evaluates again."""
    from poincare_resnet.experiments import compare

    opts = {**OPTIONS, "seeds": "0", "attacks": "fgsm,square", "eps": "0.1", "queries": 3}
    run_experiment("compare", tmp_path, tiny=True, log=lambda _m: None, **opts)
    att = json.loads((tmp_path / "compare_summary.json").read_text())["per_seed"]["attacks"]
    acc = {r["attack"]: r["accuracy"] for r in att}
    assert set(acc) == {"fgsm", "square", "worst"}
    assert acc["worst"] <= min(acc["fgsm"], acc["square"])
    (row,) = json.loads((tmp_path / "compare_summary.json").read_text())["per_seed"]["models"]
    assert 0.0 <= row["zero_grad_inputs"] <= 1.0 and "worst_acc_25.5" in row
    (worst,) = [r for r in att if r["attack"] == "worst"]
    assert row["worst_lost_25.5"] == worst["clean_accuracy"] - worst["accuracy"]

    calls: list[int] = []
    real = compare.attack_rows
    monkeypatch.setattr(compare, "attack_rows", lambda *a, **k: calls.append(1) or real(*a, **k))
    run_experiment("compare", tmp_path, tiny=True, log=lambda _m: None, **opts)
    assert calls == []
    run_experiment("compare", tmp_path, tiny=True, log=lambda _m: None, **{**opts, "queries": 4})
    assert calls == [1]


def test_a_moved_compare_reuses_its_runs_where_they_now_are(tmp_path, monkeypatch):
    """A compare directory moved (or restored from a copy, as benchmarks/fmnist_table.sh does)
    reuses its runs and their cached evaluations from the new place: the summaries' recorded
    ``run_dir`` is the old place, which no longer exists."""
    from poincare_resnet.experiments import compare

    opts = {**OPTIONS, "seeds": "0"}
    first = run_experiment("compare", tmp_path / "old", tiny=True, log=lambda _m: None, **opts)
    (tmp_path / "old").rename(tmp_path / "new")
    monkeypatch.setattr(trainer, "train", lambda *a, **k: pytest.fail("trained again"))
    monkeypatch.setattr(compare, "attack_rows", lambda *a, **k: pytest.fail("attacked again"))
    again: list[str] = []
    rows = run_experiment("compare", tmp_path / "new", tiny=True, log=again.append, **opts)
    assert any("reusing its evaluation " + str(tmp_path / "new") in m for m in again)
    assert rows[0]["fgsm_acc_0.8"] == first[0]["fgsm_acc_0.8"]


def test_seeds_models_and_model_specs_are_checked(tmp_path):
    with pytest.raises(ValueError, match="seeds must be distinct"):
        run_experiment("compare", tmp_path, tiny=True, **{**OPTIONS, "seeds": "1,1"})
    with pytest.raises(ValueError, match="models must be distinct"):
        run_experiment("compare", tmp_path, tiny=True, models="hybrid_resnet20,hybrid_resnet20")
    assert model_spec("hybrid_resnet20:hybrid_head=fc:c=0.5:learnable_c=false") == (
        "hybrid_resnet20",
        {"hybrid_head": "fc", "c": 0.5, "learnable_c": False},
    )
    assert model_spec("poincare_resnet20") == ("poincare_resnet20", {})
    with pytest.raises(ValueError, match="expected name:key=value"):
        model_spec("hybrid_resnet20:hybrid_head")
    with pytest.raises(ValueError, match="unknown model option.*'head'"):
        model_spec("hybrid_resnet20:head=fc")
    assert not list(tmp_path.iterdir())  # nothing was trained or written


def test_an_interrupted_run_of_the_same_recipe_is_resumed_not_restarted(tmp_path):
    run = tmp_path / "run"
    cfg = tiny_config(run, epochs=1, ckpt_every_steps=1, keep_checkpoints=10, overwrite=True)
    train_or_reuse(dataclasses.replace(cfg, max_steps=1), lambda _m: None, "first")
    assert not (run / "summary.json").exists()
    step1 = run / "checkpoints" / "ckpt-00000001.safetensors"
    stamp = step1.stat().st_mtime_ns
    messages: list[str] = []
    summary = train_or_reuse(cfg, messages.append, "second")
    assert messages == [f"second: resuming the unfinished run {run}"]
    assert summary is not None and (run / "summary.json").is_file()
    # a restart would have replaced the run and written step 1's checkpoint again
    assert step1.stat().st_mtime_ns == stamp
