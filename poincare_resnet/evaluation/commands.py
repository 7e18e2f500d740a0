"""The ``ood``, ``attack`` and ``explain`` commands on trained checkpoints (CLI and Python API).

Each loads a checkpoint (a ``.safetensors`` file or a run directory) with
:func:`poincare_resnet.api.load_model`, takes the in-distribution data from the test split of
the dataset it was trained on, returns table rows and, when ``out`` is given, writes the table
(CSV + Markdown) and figures there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..training.checkpoint import atomic_output
from .attacks import ATTACKS, PAPER_FGSM_EPS, zero_grad_fraction
from .explain import grad_cam, input_saliency
from .metrics import ood_roc_curve
from .ood import (
    OOD_SET_NAMES,
    SCORE_FUNCTIONS,
    collect_outputs,
    make_ood_sets,
    ood_rows_from_scores,
    score_outputs,
)
from .plots import (
    plot_accuracy_vs_eps,
    plot_explanations,
    plot_roc_curves,
    plot_score_histograms,
)
from .robustness import (
    WORST,
    attack_options,
    correct_under_attack,
    robustness_wide_rows,
    worst_case_correct,
)
from .square_attack import SQUARE_QUERIES
from .tables import write_table_atomic

__all__ = [
    "ROBUSTNESS_ATTACKS",
    "ROBUSTNESS_STEPS",
    "attack_rows",
    "load_checkpoint_data",
    "ood_scores_and_rows",
    "resolve_ood_sets",
    "run_attack",
    "run_explain",
    "run_ood",
]


def _positive_int(name: str, value: Any, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_device_and_out(device: Any, out: str | Path | None) -> None:
    """Fail before any work for a bad device or an output directory that cannot be written."""
    from ..training.config import resolve_device
    from ..training.rundir import check_output_dir

    resolve_device(str(device))
    if out is not None:
        check_output_dir(out, "--out")


def load_checkpoint_data(
    checkpoint: str | Path,
    data_dir: str | None = None,
    device: str = "cpu",
    dataset: str | None = None,
) -> tuple[nn.Module, dict[str, Any], Any]:
    """``(model, meta, DatasetSplits)``: the checkpoint's model and the dataset it names.

    Parameters
    ----------
    checkpoint : str or Path
        A checkpoint file or a run directory.
    data_dir : str, optional
        Where the dataset lives.
    device : str
        Where the model goes.
    dataset : str, optional
        Another dataset than the checkpoint's.

    Returns
    -------
    tuple
        ``(model, meta, DatasetSplits)``.
    """
    from ..api import load_model
    from ..data import load_dataset, trained_image_size

    model, meta = load_model(checkpoint, device)
    name = dataset or meta.get("dataset")
    if not name:
        raise ValueError(f"{checkpoint}: the checkpoint names no dataset; pass one explicitly")
    data = load_dataset(name, data_dir, image_size=trained_image_size(name, meta))
    expect = getattr(model, "in_chans", data.in_chans)
    if data.in_chans != expect:
        raise ValueError(f"dataset {name} has {data.in_chans} channels, the model expects {expect}")
    classes = getattr(model, "num_classes", data.num_classes)
    if data.num_classes != classes:
        raise ValueError(
            f"dataset {name} has {data.num_classes} classes, the model was trained for {classes}"
        )
    return model, meta, data


def _model_dtype(model: nn.Module) -> torch.dtype:
    p = next(iter(model.parameters()), None)
    return p.dtype if p is not None else torch.float32


def resolve_ood_sets(
    names: Sequence[str],
    in_x: torch.Tensor,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Each name is a builtin synthetic set (:data:`OOD_SET_NAMES`) or a path: a directory of
    PNG/JPEG images or a CIFAR-format file, loaded at the shape of ``in_x`` ``[N, C, H, W]``.

    Parameters
    ----------
    names : sequence of str
        Builtin set names or paths.
    in_x : Tensor
        The in-distribution images.
    seed : int
        Seed of the synthetic sets.

    Returns
    -------
    dict of str to Tensor
        The OOD image sets by name, in the dtype of ``in_x``.
    """
    from ..data import load_images_dir

    out: dict[str, torch.Tensor] = {}
    for name in names:
        if name in OOD_SET_NAMES:
            out[name] = make_ood_sets(in_x, [name], seed)[name]
            continue
        path = Path(name).expanduser()
        if not path.exists():
            raise ValueError(
                f"OOD set {name!r} is neither a builtin set ({', '.join(OOD_SET_NAMES)}) nor an "
                f"existing image directory / CIFAR-format file"
            )
        x = load_images_dir(path, tuple(in_x.shape[-2:]), int(in_x.shape[1]))
        label = path.name or str(path)
        while label in out:
            label += "'"
        out[label] = x.to(in_x.dtype)
    return out


def ood_scores_and_rows(
    model: nn.Module,
    in_x: torch.Tensor,
    ood_sets: Mapping[str, torch.Tensor],
    scores: Sequence[str] = ("energy", "msp", "feature_norm"),
    repeats: int = 5,
    subsample: int | None = None,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, dict[str, Any]]]:
    """OOD metric rows (as :func:`~poincare_resnet.evaluation.evaluate_ood`) and the raw
    scores, one forward pass per image set.

    Parameters
    ----------
    model : nn.Module
        A classifier with ``forward_features`` and ``forward_head``.
    in_x : Tensor
        In-distribution images ``[N, C, H, W]`` (cast to the model's dtype).
    ood_sets : mapping of str to Tensor
        Out-of-distribution image sets by name.
    scores : sequence of str
        Names in :data:`~poincare_resnet.evaluation.SCORE_FUNCTIONS`.
    repeats, subsample, seed
        As in :func:`~poincare_resnet.evaluation.ood.ood_rows_from_scores`.
    batch_size : int
        Images per forward pass.
    device : str or torch.device, optional
        Where the model runs (default: that of its parameters).

    Returns
    -------
    tuple
        ``(rows, {score: in_scores}, {score: {set: out_scores}})``.
    """
    for s in scores:
        if s not in SCORE_FUNCTIONS:
            raise ValueError(f"unknown OOD score {s!r}; choose from {sorted(SCORE_FUNCTIONS)}")
    dtype = _model_dtype(model)

    def score(x: torch.Tensor) -> dict[str, Any]:
        return score_outputs(*collect_outputs(model, x.to(dtype), batch_size, device), scores)

    in_scores = score(in_x)
    per_set = {name: score(x) for name, x in ood_sets.items()}
    rows = ood_rows_from_scores(in_scores, per_set, repeats, seed, subsample)
    out_scores = {s: {k: per_set[k][s] for k in ood_sets} for s in scores}
    return rows, in_scores, out_scores


def run_ood(
    checkpoint: str | Path,
    ood_sets: Sequence[str],
    data_dir: str | None = None,
    out: str | Path | None = None,
    scores: Sequence[str] = ("energy", "msp", "feature_norm"),
    repeats: int = 5,
    subsample: int | None = None,
    seed: int = 0,
    device: str = "cpu",
    dataset: str | None = None,
    batch_size: int = 256,
) -> list[dict[str, Any]]:
    """OOD detection of a checkpoint: ID = its test set, OOD = builtin sets or image paths.

    Writes ``ood.csv`` / ``ood.md``, ``roc_<score>.png`` and ``hist_<score>.png`` into ``out``.

    Parameters
    ----------
    checkpoint : str or Path
        A checkpoint file or a run directory.
    ood_sets : sequence of str
        Builtin set names or paths.
    data_dir, dataset : str, optional
        As in :func:`load_checkpoint_data`.
    out : str or Path, optional
        Output directory.
    scores : sequence of str
        OOD score names.
    repeats, subsample, seed
        As in :func:`~poincare_resnet.evaluation.ood.ood_rows_from_scores`.
    device : str
        Where the model runs.
    batch_size : int
        Images per forward pass.

    Returns
    -------
    list of dict
        One row per (set, score), with the model and dataset names.
    """
    if not ood_sets:
        raise ValueError("give at least one OOD set")
    _positive_int("repeats", repeats)
    _positive_int("subsample", subsample, allow_none=True)
    _positive_int("batch_size", batch_size)
    for s in scores:
        if s not in SCORE_FUNCTIONS:
            raise ValueError(f"unknown OOD score {s!r}; choose from {sorted(SCORE_FUNCTIONS)}")
    _check_device_and_out(device, out)
    model, meta, data = load_checkpoint_data(checkpoint, data_dir, device, dataset)
    sets = resolve_ood_sets(ood_sets, data.test_x, seed)
    rows, in_scores, out_scores = ood_scores_and_rows(
        model, data.test_x, sets, scores, repeats, subsample, seed, batch_size
    )
    rows = [{"model": meta.get("model_name", ""), "dataset": data.name, **r} for r in rows]
    if out is not None:
        out = Path(out)
        write_table_atomic(rows, out / "ood")
        for s in scores:
            curves = {k: ood_roc_curve(in_scores[s], v) for k, v in out_scores[s].items()}
            with atomic_output(out / f"roc_{s}.png") as tmp:
                plot_roc_curves(curves, tmp, title=f"ROC, {s} (ID = {data.name})")
            with atomic_output(out / f"hist_{s}.png") as tmp:
                plot_score_histograms(in_scores[s], out_scores[s], tmp, title=s)
    return rows


#: The attacks of the robustness table (the ``attack`` command's default).
ROBUSTNESS_ATTACKS: tuple[str, ...] = ("fgsm", "pgd", "pgd-margin", "square", "angular")

#: The iterated attacks' default steps in the robustness table (the ``attack`` command's).
ROBUSTNESS_STEPS = 5


def _check_attacks(attacks: Sequence[str]) -> tuple[str, ...]:
    names = tuple(attacks)
    for name in names:
        if name not in ATTACKS:
            raise ValueError(f"unknown attack {name!r}; choose from {', '.join(ATTACKS)}")
    if len(set(names)) != len(names):
        raise ValueError(f"attacks repeat a name: {', '.join(names)}")
    return names


def _settings_columns(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """The columns that record an attack's budget: ``steps`` (and ``restarts``) of the
    iterated attacks, ``queries`` of the Square attack."""
    keys = ("steps", "restarts", "queries")
    return {k: options[k] for k in keys if k in options}


def attack_rows(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attacks: Sequence[str] = ("fgsm", "pgd"),
    eps: Sequence[float] = PAPER_FGSM_EPS,
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    *,
    restarts: int = 1,
    queries: int = SQUARE_QUERIES,
    source: nn.Module | None = None,
    worst_case: bool = False,
) -> list[dict[str, Any]]:
    """Robust accuracy rows ``{attack, eps, eps_255, accuracy, clean_accuracy, ...}`` for every
    attack and ε (``eps`` in [-1, 1] input units), and with ``worst_case`` one row
    ``attack = "worst"`` per ε: the accuracy of ``w_i = ∧_a c_{a,i}`` (per sample, correct
    under every attack; :func:`~poincare_resnet.evaluation.robustness.worst_case_correct`).
    Only the images classified correctly without attack are attacked; the others count as
    misclassified under every attack.

    Parameters
    ----------
    model, x, y
        As in :func:`~poincare_resnet.evaluation.fgsm`.
    attacks : sequence of str
        Names of :data:`~poincare_resnet.evaluation.ATTACKS`.
    eps : sequence of float
        The radii ``ε``, one row per attack and radius.
    steps, step_size, random_start
        The iterated attacks' settings (:func:`~poincare_resnet.evaluation.pgd`).
    seed : int
        Seed of each attack's generator (random starts, Square's draws).
    batch_size : int
        Images per attacked batch.
    device : str or torch.device, optional
        Where the model runs.
    restarts : int
        Random restarts of ``pgd``, ``pgd-margin`` and ``angular``.
    queries : int
        The Square attack's queries per image.
    source : nn.Module, optional
        Craft the examples on this model, evaluate them on ``model`` (a transfer attack).
    worst_case : bool
        Add the worst-case rows.

    Returns
    -------
    list of dict
        One row per (attack, ε), then the worst-case rows.
    """
    names = _check_attacks(attacks)
    x = x.to(_model_dtype(model))
    y = torch.as_tensor(y).long()
    n = int(x.shape[0])

    def row(name: str, e: float, ok: torch.Tensor, extra: dict[str, Any]) -> dict[str, Any]:
        acc = float(ok.double().mean()) if n else 0.0
        base = {"attack": name, "eps": float(e), "eps_255": float(e) * 255.0, "accuracy": acc}
        return {**base, "clean_accuracy": clean, **extra, "n": n}

    clean_ok = correct_under_attack(model, x, y, None, None, batch_size=batch_size, device=device)
    clean = float(clean_ok.double().mean()) if n else 0.0
    rows: list[dict[str, Any]] = []
    per_eps: dict[float, dict[str, torch.Tensor]] = {float(e): {} for e in eps}
    for name in names:
        fn = ATTACKS[name]
        given = {
            "steps": steps,
            "step_size": step_size,
            "random_start": random_start,
            "restarts": restarts,
            "queries": queries,
            "generator": torch.Generator().manual_seed(seed),
        }
        kw = attack_options(fn, given)
        for e in eps:
            ok = correct_under_attack(
                model, x, y, fn, e, source, batch_size, device, clean=clean_ok, **kw
            )
            per_eps[float(e)][name] = ok
            rows.append(row(name, e, ok, _settings_columns(name, kw)))
    if worst_case and names:
        rows += [row(WORST, e, worst_case_correct(per_eps[float(e)]), {}) for e in eps]
    return rows


def _subset(n: int, limit: int | None, seed: int) -> torch.Tensor:
    if limit is None or limit >= n:
        return torch.arange(n)
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    gen = torch.Generator().manual_seed(seed)
    return torch.randperm(n, generator=gen)[:limit].sort().values


def _check_attack_options(
    attacks: Sequence[str],
    eps: Sequence[float],
    steps: int,
    step_size: float | None,
    restarts: int,
    queries: int,
    random_start: bool,
) -> list[float]:
    """Fail before any work on a bad attack option; the radii as a list."""
    if not attacks:
        raise ValueError("give at least one attack")
    _check_attacks(attacks)
    eps = list(eps)
    if not eps or not all(isinstance(e, int | float) and math.isfinite(e) and e >= 0 for e in eps):
        raise ValueError(f"eps must be one or more finite values >= 0, got {eps!r}")
    _positive_int("steps", steps)
    if step_size is not None and not (math.isfinite(step_size) and step_size > 0):
        raise ValueError(f"step_size must be finite and > 0, got {step_size!r}")
    _positive_int("restarts", restarts)
    _positive_int("queries", queries)
    if restarts > 1 and not random_start:
        raise ValueError("restarts > 1 need the random start (drop --no-random-start)")
    return eps


def _load_source(
    source: str | Path, data: Any, data_dir: str | None, device: str, dataset: str | None
) -> nn.Module:
    """The source model of a transfer attack; it must have been trained on the target's data."""
    src, src_meta, src_data = load_checkpoint_data(source, data_dir, device, dataset)
    mine = (data.name, data.num_classes, data.in_chans, tuple(data.test_x.shape[-2:]))
    theirs = (src_data.name, src_data.num_classes, src_data.in_chans)
    theirs += (tuple(src_data.test_x.shape[-2:]),)
    if mine != theirs:
        raise ValueError(
            f"--source {source} was trained on {theirs[0]} ({theirs[1]} classes, "
            f"{theirs[2]}×{theirs[3]}), the attacked run on {mine[0]} ({mine[1]} classes, "
            f"{mine[2]}×{mine[3]}): a transfer attack needs the same data"
        )
    return src


def run_attack(
    checkpoint: str | Path,
    attacks: Sequence[str] = ROBUSTNESS_ATTACKS,
    eps: Sequence[float] = PAPER_FGSM_EPS,
    steps: int = ROBUSTNESS_STEPS,
    step_size: float | None = None,
    random_start: bool = True,
    limit: int | None = None,
    out: str | Path | None = None,
    device: str = "cpu",
    data_dir: str | None = None,
    dataset: str | None = None,
    seed: int = 0,
    batch_size: int = 256,
    restarts: int = 1,
    queries: int = SQUARE_QUERIES,
    source: str | Path | None = None,
) -> list[dict[str, Any]]:
    """The robustness table of a checkpoint on (a seeded subset of ``limit`` images of) its
    test set: accuracy under each attack and ε, the per-sample worst case over the attacks
    (when there are two or more) and the fraction of exactly-zero input gradients; with
    ``source``, the examples are crafted on that run's model (a transfer attack).  Writes
    ``attack.csv`` / ``attack.md`` (one row per attack and ε), ``robustness.csv`` /
    ``robustness.md`` / ``robustness.json`` (one row per ε) and ``accuracy_vs_eps.png``.

    Parameters
    ----------
    checkpoint : str or Path
        A checkpoint file or a run directory (the attacked model).
    attacks, eps, steps, step_size, random_start, seed, batch_size, restarts, queries
        As in :func:`attack_rows`.
    limit : int, optional
        Attack this many random test images.
    out : str or Path, optional
        Output directory.
    device, data_dir, dataset
        As in :func:`load_checkpoint_data`.
    source : str or Path, optional
        The checkpoint or run directory the examples are crafted on (same data and classes).

    Returns
    -------
    list of dict
        The rows of ``attack.csv``.
    """
    eps = _check_attack_options(attacks, eps, steps, step_size, restarts, queries, random_start)
    _positive_int("limit", limit, allow_none=True)
    _positive_int("batch_size", batch_size)
    _check_device_and_out(device, out)
    model, meta, data = load_checkpoint_data(checkpoint, data_dir, device, dataset)
    src = None if source is None else _load_source(source, data, data_dir, device, dataset)
    idx = _subset(len(data.test_y), limit, seed)
    x, y = data.test_x[idx].to(_model_dtype(model)), data.test_y[idx]
    zero = zero_grad_fraction(model, x, y, batch_size=batch_size)
    worst = len(tuple(attacks)) > 1  # the worst case over one attack is that attack
    options = {"restarts": restarts, "queries": queries, "source": src, "worst_case": worst}
    rows = attack_rows(
        model, x, y, attacks, eps, steps, step_size, random_start, seed, batch_size, **options
    )
    label = {"model": meta.get("model_name", ""), "dataset": data.name}
    if source is not None:
        label["source"] = str(source)
    rows = [{**label, **r, **zero} for r in rows]
    if out is not None:
        _write_robustness(Path(out), rows, label, zero, data.name)
    return rows


def _write_robustness(
    out: Path, rows: list[dict[str, Any]], label: dict[str, Any], zero: dict[str, float], name: str
) -> None:
    """``attack`` (long), ``robustness`` (wide, + JSON) tables and the accuracy-vs-ε plot."""
    from ..experiments.common import write_json

    write_table_atomic(rows, out / "attack")
    wide = [{**label, **r, **zero} for r in robustness_wide_rows(rows)]
    write_table_atomic(wide, out / "robustness")
    write_json(out / "robustness.json", {**label, **zero, "rows": wide, "attacks": rows})
    with atomic_output(out / "accuracy_vs_eps.png") as tmp:
        plot_accuracy_vs_eps(rows, tmp, title=f"Robust accuracy on {name}")


def run_explain(
    checkpoints: Sequence[str | Path],
    images: int | Sequence[int] = 4,
    out: str | Path | None = None,
    data_dir: str | None = None,
    device: str = "cpu",
    dataset: str | None = None,
) -> list[dict[str, Any]]:
    """Grad-CAM and input saliency of each checkpoint for a few test images (``images``: how
    many from the start, or a list of test indices); all models side by side in
    ``explanations.png``, predictions in ``explanations.csv`` / ``.md``.

    Parameters
    ----------
    checkpoints : sequence of str or Path
        Checkpoint files or run directories (the first names the dataset).
    images : int or sequence of int
        How many test images, or which.
    out : str or Path, optional
        Output directory.
    data_dir, device, dataset
        As in :func:`load_checkpoint_data`.

    Returns
    -------
    list of dict
        One row per (model, image): label, prediction, confidence.
    """
    if isinstance(checkpoints, str | Path):
        checkpoints = [checkpoints]
    if not checkpoints:
        raise ValueError("give at least one checkpoint")
    if isinstance(images, bool) or (isinstance(images, int) and images < 1):
        raise ValueError(f"images must be a positive count or a list of indices, got {images!r}")
    _check_device_and_out(device, out)
    loaded = []
    data = None
    for ck in checkpoints:
        model, meta, d = load_checkpoint_data(ck, data_dir, device, dataset)
        if data is None:
            data = d
        elif (d.name, d.in_chans, d.image_size) != (data.name, data.in_chans, data.image_size):
            raise ValueError(
                f"{ck} was trained on {d.name}, the first checkpoint on {data.name}; "
                "explain compares models of one dataset"
            )
        loaded.append((str(ck), model, meta))
    assert data is not None
    n_test = len(data.test_y)
    index = list(range(int(images))) if isinstance(images, int) else [int(i) for i in images]
    if not index:
        raise ValueError("give at least one image")
    bad = [i for i in index if not 0 <= i < n_test]
    if bad:
        raise ValueError(f"image indices {bad} out of range: the test set has {n_test} images")
    x = data.test_x[index]
    y = data.test_y[index]
    names = [meta.get("model_name", f"model{k}") for k, (_c, _m, meta) in enumerate(loaded)]
    labels = [n if names.count(n) == 1 else f"{n} #{k + 1}" for k, n in enumerate(names)]
    maps: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    rows: list[dict[str, Any]] = []
    for label, (ck, model, _meta) in zip(labels, loaded, strict=True):
        dev = next(model.parameters()).device
        xm = x.to(dev, _model_dtype(model))
        maps[label] = (grad_cam(model, xm).cpu(), input_saliency(model, xm).cpu())
        with torch.no_grad():
            probs = torch.softmax(model(xm).float(), dim=1).cpu()
        conf, pred = probs.max(dim=1)
        for j, i in enumerate(index):
            cls = data.class_names
            rows.append(
                {
                    "model": label,
                    "checkpoint": ck,
                    "image": i,
                    "label": cls[int(y[j])],
                    "predicted": cls[int(pred[j])],
                    "confidence": float(conf[j]),
                    "correct": bool(pred[j] == y[j]),
                }
            )
    if out is not None:
        out = Path(out)
        write_table_atomic(rows, out / "explanations")
        with atomic_output(out / "explanations.png") as tmp:
            plot_explanations(x, maps, tmp)
    return rows
