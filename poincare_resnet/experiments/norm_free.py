"""``norm-free``: Poincaré ResNets without batch norm.

(a) Output tangent norm at initialisation vs depth for ``PoincareResNet(depth, **NORM_FREE)``
(the ``_nf`` models: no batch norm, α = 1/√blocks on every residual branch, He init and centred
weights for the convolutions), the same with ``residual_scale=None`` (unscaled), both with the
paper's identity init (``-identity``), and with batch norm for reference. Inputs are uniform
random images in [-1, 1]; ``feature_map_norm`` is the mean per-pixel tangent norm of the last
stage's output, ``feature_norm`` the norm of the pooled features and ``logit_norm`` the logits'
norm. Every tangent norm is capped at ``artanh(1 − ε)/√c`` (≈ 9.82 at c = 0.1, float32) by the
ball projection, so an unscaled network's growth saturates there: with He init the unscaled
network is already near it at depth 20 (each unscaled block doubles the tangent variance).

(b) Training of ``poincare_resnet20_nf`` vs ``poincare_resnet20`` with one recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..evaluation.tables import write_table_atomic as write_table
from ..models import NORM_FREE, PoincareResNet
from ..training.config import resolve_device
from .common import (
    Log,
    TrainRecipe,
    as_str_tuple,
    as_tuple,
    mean_tangent_norm,
    new_figure,
    pick,
    save_figure,
    torch_threads,
    train_or_none,
    write_json,
)

SLUG = "norm_free"
VARIANTS: dict[str, dict[str, Any]] = {
    "scaled": dict(NORM_FREE),  # as poincare_resnet*_nf
    "unscaled": {**NORM_FREE, "residual_scale": None},
    "scaled-identity": {"norm": "none", "residual_scale": "auto"},  # the paper's init
    "unscaled-identity": {"norm": "none", "residual_scale": None},
    "batchnorm": {"norm": "batch", "residual_scale": None},
}
LABELS = {
    "scaled": "no norm, α = 1/√blocks (the _nf models)",
    "unscaled": "no norm, unscaled",
    "scaled-identity": "no norm, α = 1/√blocks, identity init",
    "unscaled-identity": "no norm, unscaled, identity init",
    "batchnorm": "batch norm (reference)",
}
TRAIN_MODELS = ("poincare_resnet20_nf", "poincare_resnet20")


@torch.no_grad()
def init_norms(
    depth: int, variant: str, x: torch.Tensor, mode: str, seed: int = 0
) -> dict[str, float]:
    """Tangent norms of a freshly initialised ResNet's outputs on ``x``.

    Parameters
    ----------
    depth : int
        The ResNet's depth.
    variant : str
        A key of :data:`VARIANTS`.
    x : Tensor
        The input batch.
    mode : str
        ``"train"`` or ``"eval"`` (batch-norm statistics).
    seed : int
        Seed of the initialisation.

    Returns
    -------
    dict of str to float
        ``feature_map_norm``, ``feature_norm``, ``logit_norm``.
    """
    torch.manual_seed(seed)
    model = PoincareResNet(depth, in_chans=x.shape[1], **VARIANTS[variant]).to(x.device)
    model.train(mode == "train")
    fmap = model.forward_feature_map(x)
    feats = model.pool(fmap)
    logits = model.forward_head(feats)
    return {
        "feature_map_norm": mean_tangent_norm(fmap, 1),
        "feature_norm": mean_tangent_norm(feats.flatten(1), 1),
        "logit_norm": mean_tangent_norm(logits, 1),
    }


def run(
    out_dir: str | Path,
    tiny: bool = False,
    *,
    depths: Any = None,
    variants: Any = tuple(VARIANTS),
    init_batch: int | None = None,
    size: int | None = None,
    in_chans: int = 3,
    mode: str = "train",
    models: Any = TRAIN_MODELS,
    dataset: str | None = None,
    data_dir: str | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float = 1e-3,
    limit_train: int | None = None,
    train_runs: bool = True,
    seed: int = 0,
    threads: int | None = None,
    device: str = "cpu",
    log: Log = print,
) -> list[dict[str, Any]]:
    """(a) init norms vs depth per variant, (b) training comparison; tables + figure.

    Parameters
    ----------
    out_dir, tiny, log
        The output directory of the norm-free tables, figure and summary; tiny sizes (the
        ``None`` defaults depend on it); the progress log.
    depths, variants, init_batch, size, in_chans, mode
        Part (a): the initial norms.
    models, dataset, data_dir, epochs, batch_size, lr, limit_train, train_runs
        Part (b): the training runs (``train_runs=False`` skips them).
    seed, threads, device
        Seed (inputs, initialisation, training), torch CPU threads and device.

    Returns
    -------
    list of dict
        The table rows (init rows, then training rows).
    """
    out = Path(out_dir)
    depths = as_tuple(pick(depths, (20, 32, 44, 56, 110), (8, 14), tiny))
    variants = as_str_tuple(variants)
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    if mode not in ("train", "eval"):
        raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
    init_batch = int(pick(init_batch, 16, 4, tiny))
    size = int(pick(size, 32, 8, tiny))
    dataset = pick(dataset, "fashion-mnist", "digits", tiny)
    epochs = int(pick(epochs, 5, 1, tiny))
    batch_size = int(pick(batch_size, 128, 32, tiny))
    limit_train = pick(limit_train, None, 64, tiny)
    dev = resolve_device(device)
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(init_batch, in_chans, size, size, generator=gen) * 2 - 1).to(dev)
    with torch_threads(threads):
        init_rows = [
            row for variant in variants for row in _init_rows(variant, depths, x, mode, seed)
        ]
        train_rows: list[dict[str, Any]] = []
        if train_runs:
            recipe = TrainRecipe(
                dataset, data_dir, epochs, batch_size, lr, limit_train, seed, threads, device
            )
            train_rows = [_train_row(name, recipe, out, log) for name in as_str_tuple(models)]
    _write_outputs(out, init_rows, train_rows, depths, log)
    return init_rows + train_rows


def _init_rows(
    variant: str, depths: tuple, x: torch.Tensor, mode: str, seed: int
) -> list[dict[str, Any]]:
    """Part (a) for one variant: the initial norms per depth, relative to the first depth's."""
    rows = []
    first = None
    for depth in depths:
        r = init_norms(depth, variant, x, mode, seed)
        first = r["feature_map_norm"] if first is None else first
        rows.append(
            {
                "part": "init",
                "variant": variant,
                "depth": depth,
                "mode": mode,
                **r,
                "relative_to_first": r["feature_map_norm"] / first,
            }
        )
    return rows


def _train_row(name: str, recipe: TrainRecipe, out: Path, log: Log) -> dict[str, Any]:
    """Part (b) for one model: its training run's test / validation accuracy and epoch time."""
    cfg = recipe.config(name, out / "runs" / name)
    row: dict[str, Any] = {
        "part": "train",
        "model": name,
        "dataset": recipe.dataset,
        "epochs": recipe.epochs,
    }
    s = train_or_none(cfg, log, f"norm-free: {name}")
    if s is None:
        row.update(test_top1=float("nan"), error="non-finite")
    else:
        row.update(
            test_top1=s["test_top1"],
            best_val_top1=s["best_val_top1"],
            mean_epoch_time_s=s["mean_epoch_time_s"],
        )
    return row


def _write_outputs(
    out: Path,
    init_rows: list[dict[str, Any]],
    train_rows: list[dict[str, Any]],
    depths: tuple,
    log: Log,
) -> None:
    """The tables, the figure and the summary (each variant's norm growth over depth)."""
    write_table(init_rows, out / SLUG)
    if train_rows:
        write_table(train_rows, out / f"{SLUG}_train")
    _figure(init_rows, out / f"{SLUG}.png")
    summary = _summary(init_rows, depths)
    summary["train"] = {r["model"]: r.get("test_top1") for r in train_rows}
    write_json(out / f"{SLUG}_summary.json", summary)
    for v in ("scaled", "unscaled", "scaled-identity", "unscaled-identity"):
        if v in summary:
            s = summary[v]
            log(
                f"norm-free: {v}: output tangent norm {s['first']:.3f} at depth {depths[0]}, "
                f"{s['last']:.3f} at depth {depths[-1]} ({s['ratio']:.2f}x)"
            )


def _summary(rows: list[dict[str, Any]], depths: tuple) -> dict[str, Any]:
    out: dict[str, Any] = {"depths": list(depths)}
    for v in VARIANTS:
        vals = [r["feature_map_norm"] for r in rows if r["variant"] == v]
        if vals:
            out[v] = {
                "first": vals[0],
                "last": vals[-1],
                "ratio": vals[-1] / vals[0],
                "monotone_growth": all(b >= a for a, b in zip(vals, vals[1:], strict=False)),
            }
    if "scaled" in out:
        out["scaled_within_2x"] = 0.5 <= out["scaled"]["ratio"] <= 2.0
    return out


def _figure(rows: list[dict[str, Any]], path: Path) -> None:
    fig, (ax,) = new_figure(1)
    for v in VARIANTS:
        rs = [r for r in rows if r["variant"] == v]
        if rs:
            ax.plot(
                [r["depth"] for r in rs],
                [r["feature_map_norm"] for r in rs],
                marker="o",
                label=LABELS[v],
            )
    ax.set(
        xlabel="depth",
        ylabel="mean tangent norm of the last feature map",
        title="Poincaré ResNet outputs at initialisation",
    )
    ax.legend()
    save_figure(fig, path)
