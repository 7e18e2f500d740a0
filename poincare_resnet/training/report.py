"""What a finished run writes: ``summary.json``, ``training_curves.png`` and ``report.md``."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from .checkpoint import atomic_output, atomic_write_text
from .config import TrainConfig


def versions() -> dict[str, str]:
    """The versions a run records (``poincare_resnet``, ``torch``, ``python``).

    Returns
    -------
    dict of str to str
        Package name → version string.
    """
    return {
        "poincare_resnet": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def summarize(
    cfg: TrainConfig, state: dict[str, Any], test: dict[str, Any], **facts: Any
) -> dict[str, Any]:
    """The run's ``summary.json``: options, best epoch, test metrics, times.

    Parameters
    ----------
    cfg : TrainConfig
        The run's options.
    state : dict
        The loop's state (``history``, ``best_epoch``, ``best_val_top1``).
    test : dict
        :func:`~poincare_resnet.training.evaluate_split` on the test split (``top1``, ``top5``,
        ``loss``).
    **facts
        Further entries, in this order after the metrics (``train_time_s``, ``params``, ...).

    Returns
    -------
    dict
        The summary (JSON-serialisable).
    """
    hist = state["history"]
    times = [r["epoch_time_s"] for r in hist]
    return {
        "model": cfg.model,
        "dataset": cfg.dataset,
        "epochs": cfg.epochs,
        "best_epoch": state["best_epoch"],
        "best_val_top1": state["best_val_top1"],
        "test_top1": test["top1"],
        "test_top5": test["top5"],
        "test_loss": test["loss"],
        "final_train_top1": hist[-1]["train_top1"] if hist else None,
        "mean_epoch_time_s": float(np.mean(times)) if times else None,
        **facts,
    }


def report_markdown(cfg: TrainConfig, summary: dict[str, Any]) -> str:
    """The run's ``report.md``: test accuracy, best epoch, recipe, and the training curves.

    Parameters
    ----------
    cfg : TrainConfig
        The run's options.
    summary : dict
        :func:`summarize`'s result.

    Returns
    -------
    str
        Markdown text.
    """
    s = summary
    return "\n".join(
        [
            f"# {cfg.model} on {cfg.dataset}",
            "",
            f"- test top-1: **{s['test_top1'] * 100:.2f} %** (top-5 {s['test_top5'] * 100:.2f} %), "
            f"best checkpoint from epoch {s['best_epoch']} (val top-1 "
            f"{s['best_val_top1'] * 100:.2f} %)",
            f"- {cfg.epochs} epochs, mean epoch time {s['mean_epoch_time_s']:.1f} s, "
            f"{s['params']} parameters",
            f"- optimizer {cfg.optimizer}, lr {cfg.lr}, schedule {cfg.schedule}, batch "
            f"{cfg.batch_size}, seed {cfg.seed}",
            "",
            "![training curves](training_curves.png)",
            "",
        ]
    )


def write_report(run: Path, cfg: TrainConfig, summary: dict[str, Any], history: list) -> None:
    """Write ``summary.json``, ``training_curves.png`` and ``report.md`` into ``run`` (atomically).

    Parameters
    ----------
    run : Path
        The run directory.
    cfg : TrainConfig
        The run's options.
    summary : dict
        :func:`summarize`'s result.
    history : list of dict
        The per-epoch rows of ``metrics.jsonl``.
    """
    from ..evaluation.plots import plot_training_curves

    atomic_write_text(run / "summary.json", json.dumps(summary, indent=2))
    with atomic_output(run / "training_curves.png") as tmp:
        plot_training_curves(history, tmp)
    atomic_write_text(run / "report.md", report_markdown(cfg, summary))
