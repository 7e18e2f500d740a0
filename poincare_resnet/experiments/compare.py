"""``compare``: Euclidean, hybrid and Poincaré ResNet-20 trained with one recipe, then test
accuracy, epoch time, OOD detection (energy and feature-norm scores against synthetic sets) and
FGSM / PGD robust accuracy on the paper's ε grid, side by side.

Every model is trained once per seed (``seeds``), into ``runs/<model>-seed<k>`` (beside, not
inside, the ``runs/<model>`` of the compares before seeds); a finished run of the same recipe
there is reused and an unfinished one resumed, so an interrupted compare continues where it
stopped. The tables report every number as the mean over seeds and its sample standard
deviation (``<col>_seeds_std``; ``mean ± std`` in the Markdown, ``n_seeds`` noted); the
per-seed values are in ``compare_summary.json``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..api import load_model, resolve_checkpoint
from ..data import load_dataset
from ..evaluation.attacks import PAPER_FGSM_EPS, zero_grad_fraction
from ..evaluation.commands import attack_rows, ood_scores_and_rows, resolve_ood_sets
from ..evaluation.plots import plot_accuracy_vs_eps
from ..evaluation.square_attack import SQUARE_QUERIES
from ..evaluation.tables import mean_over_seeds
from ..evaluation.tables import write_table_atomic as write_table
from ..models.registry import check_model_kwargs
from ..training.checkpoint import atomic_output
from .common import (
    Log,
    TrainRecipe,
    as_str_tuple,
    as_tuple,
    pick,
    torch_threads,
    train_or_reuse,
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
    no_decay: str = "standard",
    limit_train: int | None = None,
    ood_sets: Any = ("digits", "gaussian", "uniform"),
    scores: Any = ("energy", "feature_norm"),
    repeats: int | None = None,
    attacks: Any = ("fgsm", "pgd"),
    eps: Any = PAPER_FGSM_EPS,
    pgd_steps: int | None = None,
    attack_limit: int | None = None,
    restarts: int = 1,
    queries: int = SQUARE_QUERIES,
    seeds: Any = None,
    seed: int = 0,
    threads: int | None = None,
    device: str = "cpu",
    log: Log = print,
) -> list[dict[str, Any]]:
    """Train every model of ``models`` with one recipe, once per seed, and evaluate it; one
    wide table row per model (columns ``auroc_<score>_<set>``, ``fpr95_…``,
    ``<attack>_acc_<ε·255>``, ``worst_lost_<ε·255>``), each number the mean over seeds with its
    sample standard deviation ``<col>_seeds_std``
    (:func:`~poincare_resnet.evaluation.tables.mean_over_seeds`).

    Parameters
    ----------
    out_dir, tiny, log
        The output directory of the compare tables (one wide row per model), figure and
        summary; tiny sizes (the ``None`` defaults depend on it); the progress log.
    models : sequence of str
        Registered model names, each optionally with model options, ``name:key=value:…``
        (:func:`model_spec`; e.g. ``hybrid_resnet20:hybrid_head=fc``, the capped head); the
        spec is the model's label in the tables.
    dataset, data_dir, epochs, batch_size, lr, optimizer, weight_decay, no_decay, limit_train
        The one training recipe (``no_decay``: ``--no-decay``, the parameters weight decay
        spares).
    ood_sets, scores, repeats
        The OOD evaluation.
    attacks, eps, pgd_steps, attack_limit, restarts, queries
        The robustness evaluation (:func:`~poincare_resnet.evaluation.commands.attack_rows`:
        ``pgd_steps`` and ``restarts`` of the iterated attacks, ``queries`` of ``square``);
        with two or more attacks a ``worst`` row per ε (per image, correct under every
        attack), and every model's fraction of exactly-zero input gradients
        (``zero_grad_inputs``, the gradient-masking check).
    seeds : int, str or sequence of int, optional
        The seeds, e.g. ``"0,1,2"`` (default: ``seed`` alone). Each run's seed sets its
        initialisation, data order, OOD draws and PGD starts; the synthetic OOD sets are drawn
        once, from the first seed, so all runs are scored on the same images.
    seed, threads, device
        The seed when ``seeds`` is not given; torch CPU threads and device.

    Returns
    -------
    list of dict
        The table rows, one per model (means over seeds, ``n_seeds``, ``diverged_seeds``).
    """
    out = Path(out_dir)
    models = as_str_tuple(models)
    specs = {label: model_spec(label) for label in models}
    if len(specs) != len(models):
        raise ValueError(f"models must be distinct, got {models}")
    seeds = _check_seeds(as_tuple(seed if seeds is None else seeds, int))
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
    sets = resolve_ood_sets(ood_sets, test_x, seeds[0])
    n_att = len(test_y) if attack_limit is None else min(int(attack_limit), len(test_y))
    ev = _Evaluation(
        test_x,
        test_y,
        sets,
        scores,
        repeats,
        attacks,
        eps,
        pgd_steps,
        n_att,
        seeds[0],
        device,
        int(restarts),
        int(queries),
    )
    recipe = TrainRecipe(
        dataset, data_dir, epochs, batch_size, lr, limit_train, seeds[0], threads, device
    )
    per_seed = _Rows()
    with torch_threads(threads):
        for label, (name, kwargs) in specs.items():
            for s in seeds:
                run_recipe = dataclasses.replace(recipe, seed=s)
                cfg = run_recipe.config(
                    name,
                    out / "runs" / f"{label.replace(':', '_')}-seed{s}",
                    optimizer=optimizer,
                    weight_decay=weight_decay,
                    no_decay=no_decay,
                    model_kwargs=kwargs,
                )
                per_seed.add(s, *_compare_model(label, cfg, run_recipe, ev.with_seed(s), log))
    rows = _model_rows(per_seed.models, models)
    title = f"Robust accuracy on {dataset} ({n_att} test images, mean over {len(seeds)} seeds)"
    tables = (
        rows,
        mean_over_seeds(per_seed.ood, _group_keys(per_seed.ood, ("model", "ood_set", "score"))),
        mean_over_seeds(
            per_seed.attacks, _group_keys(per_seed.attacks, ("model", "attack", "eps", "eps_255"))
        ),
    )
    _write_tables(out, *tables, title)
    facts = _recipe_facts(
        recipe, seeds, optimizer=optimizer, weight_decay=weight_decay, no_decay=no_decay
    )
    _write_summary(out, rows, per_seed, facts)
    return rows


def _group_keys(rows: list[dict[str, Any]], keys: tuple[str, ...]) -> tuple[str, ...]:
    """``keys`` and every other text column of ``rows`` (an attack's loss, say): the columns
    that name one row of a seed's table."""
    text = [k for r in rows for k, v in r.items() if isinstance(v, str) and k not in keys]
    return (*keys, *dict.fromkeys(text))


def model_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """``"name"`` or ``"name:key=value:key=value"`` → (registered name, model options).

    Values are read as JSON where they parse (``learnable_c=true``, ``c=0.5``), else kept as
    text (``hybrid_head=fc``). Raises ``ValueError`` for an unknown model or option (before
    anything is trained), a word without ``=`` or a key given twice.

    Parameters
    ----------
    spec : str
        The model and its options.

    Returns
    -------
    tuple
        ``(name, {option: value})``.
    """
    name, *items = spec.split(":")
    options: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or key in options:
            raise ValueError(f"model spec {spec!r}: expected name:key=value:…, each key once")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    check_model_kwargs(name, options)
    return name, options


def _check_seeds(seeds: tuple[int, ...]) -> tuple[int, ...]:
    """``seeds`` if they are distinct and in ``[0, 2**63)``; ``ValueError`` otherwise."""
    if len(set(seeds)) != len(seeds) or min(seeds) < 0 or max(seeds) >= 2**63:
        raise ValueError(f"seeds must be distinct integers in [0, 2**63), got {seeds}")
    return seeds


@dataclass
class _Rows:
    """The per-seed rows (each with its ``seed``): wide model rows, OOD rows, attack rows."""

    models: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    ood: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    attacks: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def add(self, seed: int, row: dict, ood: list[dict], att: list[dict]) -> None:
        self.models.append({**row, "seed": seed})
        self.ood += [{**r, "seed": seed} for r in ood]
        self.attacks += [{**r, "seed": seed} for r in att]


def _model_rows(per_seed: list[dict[str, Any]], models: tuple[str, ...]) -> list[dict[str, Any]]:
    """One row per model: the mean ± std over its finished seeds, ``diverged_seeds`` the
    others (a model whose every seed diverged: ``error`` and ``n_seeds = 0``)."""
    finished = [r for r in per_seed if "error" not in r]
    means = {r["model"]: r for r in mean_over_seeds(finished, ("model", "dataset", "epochs"))}
    rows = []
    for name in models:
        diverged = sum(1 for r in per_seed if r["model"] == name and "error" in r)
        row = means.get(name, {"model": name, "n_seeds": 0, "error": "non-finite"})
        rows.append({**row, "diverged_seeds": diverged})
    return rows


def _recipe_facts(recipe: TrainRecipe, seeds: tuple[int, ...], **options: Any) -> dict[str, Any]:
    """The training recipe as ``compare_summary.json`` records it."""
    facts = {
        "dataset": recipe.dataset,
        "epochs": recipe.epochs,
        "batch_size": recipe.batch_size,
        "lr": recipe.lr,
        "limit_train": recipe.limit_train,
    }
    return {**facts, **options, "seeds": list(seeds)}


def _write_summary(
    out: Path, rows: list[dict[str, Any]], per_seed: _Rows, recipe: dict[str, Any]
) -> None:
    """``compare_summary.json``: the training recipe, the model rows (means and sample stds)
    and every per-seed row."""
    per = {"models": per_seed.models, "ood": per_seed.ood, "attacks": per_seed.attacks}
    write_json(out / f"{SLUG}_summary.json", {"recipe": recipe, "models": rows, "per_seed": per})


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
    restarts: int = 1
    queries: int = SQUARE_QUERIES

    def key(self) -> dict[str, Any]:
        """The settings a cached evaluation must match (besides the checkpoint)."""
        return {
            "ood_sets": sorted(self.sets),
            "scores": list(self.scores),
            "repeats": self.repeats,
            "attacks": list(self.attacks),
            "eps": list(self.eps),
            "pgd_steps": self.pgd_steps,
            "n_att": self.n_att,
            "seed": self.seed,
            "restarts": self.restarts,
            "queries": self.queries,
            "n_test": len(self.test_y),
        }

    def with_seed(self, seed: int) -> _Evaluation:
        """The same evaluation with the OOD draws and PGD starts of ``seed``."""
        return dataclasses.replace(self, seed=seed)


def _compare_model(
    name: str, cfg: TrainConfig, recipe: TrainRecipe, ev: _Evaluation, log: Log
) -> tuple[dict[str, Any], list[dict[str, Any]], list[dict[str, Any]]]:
    """Train model ``name`` and evaluate it: its wide row, its OOD rows and its attack rows."""
    row: dict[str, Any] = {"model": name, "dataset": recipe.dataset, "epochs": recipe.epochs}
    summary = train_or_reuse(cfg, log, f"compare: {name} seed {recipe.seed}")
    if summary is None:
        return {**row, "error": "non-finite"}, [], []
    row.update(
        params=summary["params"],
        test_top1=summary["test_top1"],
        mean_epoch_time_s=summary["mean_epoch_time_s"],
    )
    # the directory trained or reused here, not the summary's ``run_dir``: that is where the
    # run was written, which a moved or restored run (benchmarks/fmnist_table.sh) no longer is
    ood, att, zero = _evaluate_or_reuse(Path(cfg.out), ev, log, f"{name} seed {recipe.seed}")
    row.update(zero)
    _add_columns(row, ood, att)
    log(
        f"compare: {name} seed {recipe.seed}: test top-1 {row['test_top1']:.4f}, "
        f"{row['mean_epoch_time_s']:.2f} s/epoch"
    )
    return row, [{"model": name, **r} for r in ood], [{"model": name, **r} for r in att]


EVAL_FILE = "compare_eval.json"


def _evaluate_or_reuse(
    run_dir: Path, ev: _Evaluation, log: Log, what: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, float]]:
    """The OOD rows, attack rows and zero-gradient fractions of the run's best checkpoint,
    read from ``<run>/compare_eval.json`` when that file holds the same evaluation settings
    and checkpoint digest, else computed and written there (the attacks dominate a compare's
    evaluation: a rerun over finished runs, or one lane's compare reading another's runs,
    evaluates nothing twice)."""
    key = {**ev.key(), "checkpoint_sha256": _digest(run_dir)}
    cache = run_dir / EVAL_FILE
    if cache.is_file():
        saved = json.loads(cache.read_text(encoding="utf-8"))
        if saved.get("key") == key:
            log(f"compare: {what}: reusing its evaluation {cache}")
            return saved["ood"], saved["attacks"], saved["zero_grad"]
    model, _meta = load_model(run_dir, ev.device)
    ood, _, _ = ood_scores_and_rows(model, ev.test_x, ev.sets, ev.scores, ev.repeats, seed=ev.seed)
    x, y = ev.test_x[: ev.n_att], ev.test_y[: ev.n_att]
    options = {"restarts": ev.restarts, "queries": ev.queries, "worst_case": len(ev.attacks) > 1}
    att = attack_rows(model, x, y, ev.attacks, ev.eps, ev.pgd_steps, seed=ev.seed, **options)
    zero = zero_grad_fraction(model, x, y) if ev.attacks else {}
    write_json(cache, {"key": key, "ood": ood, "attacks": att, "zero_grad": zero})
    return ood, att, zero


def _digest(run_dir: Path) -> str:
    """SHA-256 of the checkpoint :func:`~poincare_resnet.api.load_model` reads from ``run_dir``."""
    return hashlib.sha256(resolve_checkpoint(run_dir).read_bytes()).hexdigest()


def _add_columns(row: dict[str, Any], ood: list[dict], att: list[dict]) -> None:
    """The wide row's ``auroc_<score>_<set>``, ``fpr95_…``, ``<attack>_acc_<ε·255>`` and
    ``worst_lost_<ε·255>`` (clean minus worst-case accuracy on the attacked images)."""
    for r in ood:
        row[f"auroc_{r['score']}_{r['ood_set']}"] = r["auroc"]
        row[f"fpr95_{r['score']}_{r['ood_set']}"] = r["fpr95"]
    for r in att:
        row[f"{r['attack']}_acc_{_eps_key(r['eps'])}"] = r["accuracy"]
        if r["attack"] == "worst":
            row[f"worst_lost_{_eps_key(r['eps'])}"] = r["clean_accuracy"] - r["accuracy"]


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
