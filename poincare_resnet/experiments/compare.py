"""``compare``: Euclidean, hybrid and Poincaré ResNet-20 trained with one recipe, then test
accuracy, epoch time, OOD detection (energy and feature-norm scores against synthetic sets) and
FGSM / PGD robust accuracy on the paper's ε grid, side by side.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..api import load_model
from ..data import load_dataset
from ..evaluation.attacks import PAPER_FGSM_EPS
from ..evaluation.commands import attack_rows, ood_scores_and_rows, resolve_ood_sets
from ..evaluation.plots import plot_accuracy_vs_eps
from ..evaluation.tables import write_table_atomic as write_table
from ..training.checkpoint import atomic_output
from .common import (
    Log,
    TrainRecipe,
    as_str_tuple,
    as_tuple,
    pick,
    torch_threads,
    train_or_none,
    write_json,
)

if TYPE_CHECKING:
    from ..training.config import TrainConfig

SLUG = "compare"
MODELS = ("euclidean_resnet20", "hybrid_resnet20", "poincare_resnet20")


def _eps_key(eps: float) -> str:
    return f"{eps * 255:g}"


def run(
    out_dir: str | Path,
    tiny: bool = False,
    *,
    models: Any = MODELS,
    dataset: str | None = None,
    data_dir: str | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float = 1e-3,
    optimizer: str = "adam",
    weight_decay: float = 1e-4,
    limit_train: int | None = None,
    ood_sets: Any = ("digits", "gaussian", "uniform"),
    scores: Any = ("energy", "feature_norm"),
    repeats: int | None = None,
    attacks: Any = ("fgsm", "pgd"),
    eps: Any = PAPER_FGSM_EPS,
    pgd_steps: int | None = None,
    attack_limit: int | None = None,
    seed: int = 0,
    threads: int | None = None,
    device: str = "cpu",
    log: Log = print,
) -> list[dict[str, Any]]:
    """Train every model of ``models`` with one recipe and evaluate it; one wide table row per
    model (columns ``auroc_<score>_<set>``, ``fpr95_…``, ``<attack>_acc_<ε·255>``).

    Parameters
    ----------
    out_dir, tiny, log
        The output directory of the compare tables (one wide row per model), figure and
        summary; tiny sizes (the ``None`` defaults depend on it); the progress log.
    models : sequence of str
        Registered model names.
    dataset, data_dir, epochs, batch_size, lr, optimizer, weight_decay, limit_train
        The one training recipe.
    ood_sets, scores, repeats
        The OOD evaluation.
    attacks, eps, pgd_steps, attack_limit
        The robustness evaluation.
    seed, threads, device
        Seed (data order, OOD draws, PGD starts), torch CPU threads and device.

    Returns
    -------
    list of dict
        The table rows, one per model.
    """
    out = Path(out_dir)
    models = as_str_tuple(models)
    dataset = pick(dataset, "fashion-mnist", "digits", tiny)
    epochs = int(pick(epochs, 5, 1, tiny))
    batch_size = int(pick(batch_size, 128, 32, tiny))
    limit_train = pick(limit_train, None, 64, tiny)
    repeats = int(pick(repeats, 5, 1, tiny))
    pgd_steps = int(pick(pgd_steps, 10, 2, tiny))
    attack_limit = pick(attack_limit, 1000, 16, tiny)
    ood_sets, scores, attacks = as_str_tuple(ood_sets), as_str_tuple(scores), as_str_tuple(attacks)
    eps = as_tuple(eps, float)
    data = load_dataset(dataset, data_dir)
    test_x, test_y = data.test_x, data.test_y
    sets = resolve_ood_sets(ood_sets, test_x, seed)
    n_att = len(test_y) if attack_limit is None else min(int(attack_limit), len(test_y))
    ev = _Evaluation(
        test_x, test_y, sets, scores, repeats, attacks, eps, pgd_steps, n_att, seed, device
    )
    rows: list[dict[str, Any]] = []
    all_attack_rows: list[dict[str, Any]] = []
    all_ood_rows: list[dict[str, Any]] = []
    recipe = TrainRecipe(
        dataset, data_dir, epochs, batch_size, lr, limit_train, seed, threads, device
    )
    with torch_threads(threads):
        for name in models:
            cfg = recipe.config(
                name, out / "runs" / name, optimizer=optimizer, weight_decay=weight_decay
            )
            row, ood, att = _compare_model(name, cfg, recipe, ev, log)
            rows.append(row)
            all_ood_rows += ood
            all_attack_rows += att
    title = f"Robust accuracy on {dataset} ({n_att} test images)"
    _write_tables(out, rows, all_ood_rows, all_attack_rows, title)
    _write_summary(out, rows, recipe, optimizer)
    return rows


def _write_summary(
    out: Path, rows: list[dict[str, Any]], recipe: TrainRecipe, optimizer: str
) -> None:
    """``compare_summary.json``: the training recipe and the model rows."""
    recipe_facts = {
        "dataset": recipe.dataset,
        "epochs": recipe.epochs,
        "batch_size": recipe.batch_size,
        "lr": recipe.lr,
        "optimizer": optimizer,
        "limit_train": recipe.limit_train,
    }
    write_json(out / f"{SLUG}_summary.json", {"recipe": recipe_facts, "models": rows})


@dataclass(frozen=True)
class _Evaluation:
    """What every trained model is evaluated on: the OOD sets and scores, the attacks."""

    test_x: torch.Tensor
    test_y: torch.Tensor
    sets: dict[str, torch.Tensor]
    scores: tuple[str, ...]
    repeats: int
    attacks: tuple[str, ...]
    eps: tuple[float, ...]
    pgd_steps: int
    n_att: int
    seed: int
    device: str


def _compare_model(
    name: str, cfg: TrainConfig, recipe: TrainRecipe, ev: _Evaluation, log: Log
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Train model ``name`` and evaluate it: its wide row, its OOD rows and its attack rows."""
    row: dict[str, Any] = {"model": name, "dataset": recipe.dataset, "epochs": recipe.epochs}
    summary = train_or_none(cfg, log, f"compare: {name}")
    if summary is None:
        return {**row, "error": "non-finite"}, [], []
    model, _meta = load_model(summary["run_dir"], ev.device)
    row.update(
        params=summary["params"],
        test_top1=summary["test_top1"],
        mean_epoch_time_s=summary["mean_epoch_time_s"],
    )
    ood, _, _ = ood_scores_and_rows(model, ev.test_x, ev.sets, ev.scores, ev.repeats, seed=ev.seed)
    attacked = (ev.test_x[: ev.n_att], ev.test_y[: ev.n_att])
    att = attack_rows(model, *attacked, ev.attacks, ev.eps, ev.pgd_steps, seed=ev.seed)
    _add_columns(row, ood, att)
    log(
        f"compare: {name}: test top-1 {row['test_top1']:.4f}, "
        f"{row['mean_epoch_time_s']:.2f} s/epoch"
    )
    return row, [{"model": name, **r} for r in ood], [{"model": name, **r} for r in att]


def _add_columns(row: dict[str, Any], ood: list[dict], att: list[dict]) -> None:
    """The wide row's ``auroc_<score>_<set>``, ``fpr95_…`` and ``<attack>_acc_<ε·255>``."""
    for r in ood:
        row[f"auroc_{r['score']}_{r['ood_set']}"] = r["auroc"]
        row[f"fpr95_{r['score']}_{r['ood_set']}"] = r["fpr95"]
    for r in att:
        row[f"{r['attack']}_acc_{_eps_key(r['eps'])}"] = r["accuracy"]


def _write_tables(
    out: Path, rows: list[dict], ood_rows: list[dict], att_rows: list[dict], title: str
) -> None:
    """``compare``, ``compare_ood`` and ``compare_attacks`` tables and the robustness figure."""
    write_table(rows, out / SLUG)
    if ood_rows:
        write_table(ood_rows, out / f"{SLUG}_ood")
    if att_rows:
        write_table(att_rows, out / f"{SLUG}_attacks")
        with atomic_output(out / f"{SLUG}.png") as tmp:
            plot_accuracy_vs_eps(att_rows, tmp, title=title)
