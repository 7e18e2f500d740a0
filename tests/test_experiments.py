"""Every experiment in its tiny configuration: files, columns and sane values."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch

from poincare_resnet.cli import main
from poincare_resnet.experiments import EXPERIMENTS, experiment_options, run_experiment
from poincare_resnet.experiments.common import as_tuple, count_graph_nodes, torch_threads


def _quiet(_msg: str) -> None:
    pass


def _check_outputs(out: Path, slug: str, extra_tables: tuple[str, ...] = ()) -> dict:
    for stem in (slug, *extra_tables):
        assert (out / f"{stem}.csv").is_file(), stem
        assert (out / f"{stem}.md").read_text().startswith("| ")
    assert (out / f"{slug}.png").stat().st_size > 1000
    return json.loads((out / f"{slug}_summary.json").read_text())


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_registry_and_option_checking(tmp_path):
    assert set(EXPERIMENTS) == {"init-norms", "bn-speed", "graph-memory", "compare", "norm-free"}
    for name in EXPERIMENTS:
        assert "threads" in experiment_options(name)
    with pytest.raises(ValueError, match="does not take bogus"):
        run_experiment("init-norms", tmp_path, tiny=True, bogus=1)
    with pytest.raises(ValueError, match="unknown experiment"):
        experiment_options("nope")


def test_helpers():
    assert as_tuple("8, 20,32") == (8, 20, 32) and as_tuple(5) == (5,)
    assert as_tuple([0.5, "1"], float) == (0.5, 1.0)
    with pytest.raises(ValueError):
        as_tuple("a,b")
    x = torch.ones(3, requires_grad=True)
    y = (x * 2).sum()  # SumBackward -> MulBackward -> AccumulateGrad
    assert count_graph_nodes(y.grad_fn) == 3
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_init_norms(tmp_path):
    rows = run_experiment("init-norms", tmp_path, tiny=True, threads=1, log=_quiet)
    summary = _check_outputs(tmp_path, "init_norms")
    assert {r["layer"] for r in rows} == {"linear", "conv"} and len(rows) == 10
    by = {(r["layer"], r["init"]): r for r in rows}
    assert set(rows[0]) >= {"layer", "init", "depth", "relative_norm"}
    assert all(r["depth"] == 10 for r in rows)
    assert by["linear", "identity"]["relative_norm"] == pytest.approx(1.0, abs=1e-3)
    assert by["linear", "hnn"]["relative_norm"] < 0.01
    assert by["linear", "identity (legacy λ)"]["relative_norm"] < 0.9
    assert summary["identity_within_5pct"] and summary["hnn_below_1pct"]


def test_bn_speed(tmp_path):
    rows = run_experiment("bn-speed", tmp_path, tiny=True, threads=1, log=_quiet)
    summary = _check_outputs(tmp_path, "bn_speed", ("bn_speed_train",))
    speed = [r for r in rows if r["part"] == "speed"]
    train = [r for r in rows if r["part"] == "train"]
    assert len(speed) == 1 and [r["bn_mean"] for r in train] == ["midpoint", "frechet"]
    r = speed[0]
    for name, slow, fast in (
        ("algorithmic", "frechet_ref", "midpoint_ref"),
        ("implementation", "midpoint_ref", "midpoint_fused"),
    ):
        assert r[f"{name}_speedup"] == pytest.approx(r[f"{slow}_ms"] / r[f"{fast}_ms"])
        assert summary[f"{name}_speedup"] == pytest.approx(r[f"{name}_speedup"])
    assert r["memory_method"] == "allocator_peak" and r["frechet_ref_peak_mib"] > 0
    assert all(0.0 <= t["test_top1"] <= 1.0 and t["mean_epoch_time_s"] > 0 for t in train)
    assert (tmp_path / "runs" / "frechet" / "best.safetensors").is_file()


def test_graph_memory(tmp_path):
    rows = run_experiment("graph-memory", tmp_path, tiny=True, threads=1, log=_quiet)
    summary = _check_outputs(tmp_path, "graph_memory")
    assert [r["backward"] for r in rows] == ["manual", "autograd"]
    manual, autograd = rows
    for r in rows:
        assert r["depth"] == 8 and r["graph_nodes"] > 100
        assert r["peak_mib"] >= 0 and r["step_time_s"] > 0
    # manual backward passes + closed-form kernels keep far fewer bytes in the graph
    assert manual["saved_mib"] < 0.6 * autograd["saved_mib"]
    assert autograd["nodes_vs_autograd"] == 1.0 and autograd["saved_vs_autograd"] == 1.0
    assert summary["depth"] == 8 and summary["saved_ratio"] < 0.6


def test_compare(tmp_path):
    rows = run_experiment("compare", tmp_path, tiny=True, threads=1, log=_quiet)
    _check_outputs(tmp_path, "compare", ("compare_ood", "compare_attacks"))
    assert [r["model"] for r in rows] == [
        "euclidean_resnet20",
        "hybrid_resnet20",
        "poincare_resnet20",
    ]
    for r in rows:
        assert 0.0 <= r["test_top1"] <= 1.0 and r["mean_epoch_time_s"] > 0
        for s in ("energy", "feature_norm"):
            for ood in ("digits", "gaussian", "uniform"):
                assert 0.0 <= r[f"auroc_{s}_{ood}"] <= 1.0
                assert 0.0 <= r[f"fpr95_{s}_{ood}"] <= 1.0
        for attack in ("fgsm", "pgd"):
            for e in ("0.8", "1.6", "2.4", "3.2"):
                assert 0.0 <= r[f"{attack}_acc_{e}"] <= 1.0
    assert len(_csv_rows(tmp_path / "compare.csv")) == 3


def test_norm_free(tmp_path):
    rows = run_experiment("norm-free", tmp_path, tiny=True, threads=1, log=_quiet)
    summary = _check_outputs(tmp_path, "norm_free", ("norm_free_train",))
    init = [r for r in rows if r["part"] == "init"]
    train = [r for r in rows if r["part"] == "train"]
    assert {(r["variant"], r["depth"]) for r in init} == {
        (v, d)
        for v in ("scaled", "unscaled", "scaled-identity", "unscaled-identity", "batchnorm")
        for d in (8, 14)
    }
    for r in init:
        for key in ("feature_map_norm", "feature_norm", "logit_norm"):
            assert math.isfinite(r[key]) and r[key] > 0
    assert [r["model"] for r in train] == ["poincare_resnet20_nf", "poincare_resnet20"]
    assert all(0.0 <= r["test_top1"] <= 1.0 for r in train)
    assert summary["depths"] == [8, 14] and "scaled_within_2x" in summary


def test_cli_experiment(tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["experiment", "init-norms", "--tiny", "--threads", "1", "--out", str(out)]
    assert main([*argv, "--set", "features=8", "channels=4", "size=6"]) == 0
    printed = capsys.readouterr().out
    assert "| layer | init | depth |" in printed and "HNN++ init" in printed
    assert (out / "init_norms.png").is_file()
    assert main([*argv, "--epochs", "2"]) == 2
    assert "does not take epochs" in capsys.readouterr().err
