"""``benchmarks/fmnist_table.sh``'s ``save`` / ``restore``: the files a run's reuse needs survive
the round trip; a finished run keeps no resume point, an unfinished one its newest only; a run
already in the results tree is never overwritten by ``restore``."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fmnist_table.sh"
KEPT = ("config.json", "summary.json", "metrics.jsonl", "best.safetensors", "best.json")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _script(*args: str, results: Path, saved: Path) -> str:
    env = {**os.environ, "RESULTS": str(results), "SAVED": str(saved)}
    out = subprocess.run(
        ["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, check=True
    )
    return out.stdout


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _runs(tmp_path: Path) -> Path:
    results = tmp_path / "results"
    done = results / "runs" / "euclidean_resnet20-seed0"
    for name in (*KEPT, "compare_eval.json", "last.safetensors", "report.md"):
        _write(done / name, f"done {name}")
    _write(done / "checkpoints" / "ckpt-00000422.safetensors", "old")
    open_run = results / "runs" / "poincare_resnet20-seed1"
    for name in KEPT[:1] + KEPT[2:]:  # no summary: unfinished
        _write(open_run / name, f"open {name}")
    for step in ("00000422", "00000844"):
        _write(open_run / "checkpoints" / f"ckpt-{step}.safetensors", f"weights {step}")
        _write(open_run / "checkpoints" / f"ckpt-{step}.json", f"meta {step}")
    return results


def test_save_keeps_what_reuse_needs_and_the_newest_resume_point(tmp_path):
    results, saved = _runs(tmp_path), tmp_path / "saved"
    _script("save", results=results, saved=saved)
    done = saved / "runs" / "euclidean_resnet20-seed0"
    # no last.safetensors, report or resume point of a finished run
    assert sorted(p.name for p in done.iterdir()) == sorted([*KEPT, "compare_eval.json"])
    ckpts = saved / "runs" / "poincare_resnet20-seed1" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == [
        "ckpt-00000844.json",
        "ckpt-00000844.safetensors",
    ]
    # saving again after the run finished drops its resume point
    _write(results / "runs" / "poincare_resnet20-seed1" / "summary.json", "finished")
    _script("save", results=results, saved=saved)
    assert not ckpts.exists()


def test_restore_round_trips_and_never_overwrites(tmp_path):
    results, saved = _runs(tmp_path), tmp_path / "saved"
    _script("save", results=results, saved=saved)
    fresh = tmp_path / "fresh"
    _write(fresh / "runs" / "euclidean_resnet20-seed0" / "summary.json", "mine")
    log = _script("restore", results=fresh, saved=saved)
    assert "kept" in log and "restored poincare_resnet20-seed1" in log
    assert (fresh / "runs" / "euclidean_resnet20-seed0" / "summary.json").read_text() == "mine"
    back = fresh / "runs" / "poincare_resnet20-seed1"
    assert (back / "best.safetensors").read_text() == "open best.safetensors"
    assert (back / "checkpoints" / "ckpt-00000844.safetensors").read_text() == "weights 00000844"
