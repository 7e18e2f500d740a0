"""Figures (PNG, rendered off-screen with the Agg canvas); tables are in :mod:`.tables`.

Figures are built with :class:`matplotlib.figure.Figure` and
:class:`matplotlib.backends.backend_agg.FigureCanvasAgg` directly, so nothing is ever shown and
the global pyplot backend is left untouched.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import auc

from .tables import is_number

__all__ = [
    "plot_accuracy_vs_eps",
    "plot_confusion_matrix",
    "plot_explanations",
    "plot_roc_curves",
    "plot_score_histograms",
    "plot_training_curves",
]

PathLike = str | Path


def _np(a: object) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64)


def _new_figure(figsize: tuple[float, float]) -> Figure:
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def plot_roc_curves(
    curves: Mapping[str, object], path: PathLike, title: str = "ROC (ID = positive)"
) -> Path:
    """ROC curves, one per entry: ``name -> (fpr, tpr[, thresholds])`` or ``{"fpr", "tpr"}``;
    the legend shows ``AUROC = ∫ tpr d fpr``.

    Parameters
    ----------
    curves : mapping
        Curves by name.
    path : str or Path
        The PNG of the ROC curves.
    title : str
        The title above the ROC curves.

    Returns
    -------
    Path
        ``path`` (the ROC curves, written).
    """
    fig = _new_figure((5.0, 4.5))
    ax = fig.add_subplot()
    for name, curve in curves.items():
        if isinstance(curve, Mapping):
            fpr, tpr = _np(curve["fpr"]), _np(curve["tpr"])
        else:
            fpr, tpr = _np(curve[0]), _np(curve[1])  # type: ignore[index]
        ax.plot(fpr, tpr, label=f"{name} (AUROC={auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.axhline(0.95, color="grey", ls="--", lw=0.6)
    ax.set(
        xlabel="FPR (OOD accepted)",
        ylabel="TPR (ID accepted)",
        title=title,
        xlim=(0, 1),
        ylim=(0, 1.01),
    )
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def plot_score_histograms(
    scores_in: object, scores_out_dict: Mapping[str, object], path: PathLike, title: str = ""
) -> Path:
    """Overlaid density histograms of ID scores and each OOD set's scores (shared bins).

    Parameters
    ----------
    scores_in : array-like
        ID scores.
    scores_out_dict : mapping
        OOD scores by set.
    path : str or Path
        The PNG of the score histograms.
    title : str
        The title above the score histograms.

    Returns
    -------
    Path
        ``path`` (the score histograms, written).
    """
    s_in = _np(scores_in).reshape(-1)
    outs = {k: _np(v).reshape(-1) for k, v in scores_out_dict.items()}
    allv = np.concatenate([s_in, *outs.values()])
    allv = allv[np.isfinite(allv)]
    lo, hi = (float(allv.min()), float(allv.max())) if allv.size else (0.0, 1.0)
    bins = np.linspace(lo, hi if hi > lo else lo + 1.0, 41)
    fig = _new_figure((6.0, 4.0))
    ax = fig.add_subplot()
    ax.hist(s_in, bins=bins, density=True, alpha=0.6, label="in-distribution")
    for name, s in outs.items():
        ax.hist(s, bins=bins, density=True, alpha=0.4, histtype="stepfilled", label=name)
    ax.set(xlabel="score (higher = more ID)", ylabel="density", title=title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_accuracy_vs_eps(
    rows: Sequence[Mapping[str, object]], path: PathLike, title: str = "Robust accuracy"
) -> Path:
    """Accuracy vs ``ε·255`` per curve; rows as from ``robust_accuracy`` (grouped by the
    optional ``model`` key and ``attack``), the clean accuracy plotted at ``ε = 0``.

    Parameters
    ----------
    rows : sequence of mapping
        Robust-accuracy rows.
    path : str or Path
        The PNG of the robust-accuracy curves.
    title : str
        The title above the robust-accuracy curves.

    Returns
    -------
    Path
        ``path`` (the robust-accuracy curves, written).
    """
    groups: dict[str, list[Mapping[str, object]]] = {}
    for r in rows:
        key = " / ".join(str(r[k]) for k in ("model", "attack") if k in r) or "accuracy"
        groups.setdefault(key, []).append(r)
    fig = _new_figure((5.5, 4.0))
    ax = fig.add_subplot()
    for key, rs in groups.items():
        pts = sorted(
            (
                float(r.get("eps_255", 255.0 * float(r["eps"]))),  # type: ignore[arg-type]
                float(r["accuracy"]),
            )
            for r in rs
        )  # type: ignore[arg-type]
        if "clean_accuracy" in rs[0] and all(p[0] > 0 for p in pts):
            pts.insert(0, (0.0, float(rs[0]["clean_accuracy"])))  # type: ignore[arg-type]
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, marker="o", label=key)
    ax.set(xlabel="ε · 255 (input range [-1, 1])", ylabel="accuracy", title=title, ylim=(0, 1.02))
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_confusion_matrix(
    cm: object, class_names: Sequence[str] | None, path: PathLike, normalize: bool = True
) -> Path:
    """Confusion matrix heat-map (rows = true, columns = predicted), row-normalised by default.

    Parameters
    ----------
    cm : array-like
        ``[K, K]`` counts.
    class_names : sequence of str, optional
        Tick labels.
    path : str or Path
        The PNG of the confusion matrix.
    normalize : bool
        Divide each row by its sum.

    Returns
    -------
    Path
        ``path`` (the confusion matrix, written).
    """
    m = _np(cm)
    if normalize:
        m = m / np.maximum(m.sum(axis=1, keepdims=True), 1.0)
    k = m.shape[0]
    names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
    size = max(4.0, 0.45 * k + 2.0)
    fig = _new_figure((size, size))
    ax = fig.add_subplot()
    im = ax.imshow(m, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else None)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(k), names, rotation=90, fontsize=7)
    ax.set_yticks(range(k), names, fontsize=7)
    ax.set(xlabel="predicted", ylabel="true")
    if k <= 20:
        for i in range(k):
            for j in range(k):
                ax.text(
                    j,
                    i,
                    f"{m[i, j]:.2f}" if normalize else f"{int(m[i, j])}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if m[i, j] > 0.5 * m.max() else "black",
                )
    return _save(fig, path)


def _image_hwc(img: torch.Tensor) -> np.ndarray:
    """``[C, H, W]`` image in [-1, 1] → ``[H, W, C]`` (or ``[H, W]``) in [0, 1]."""
    a = ((_np(img) + 1.0) / 2.0).clip(0.0, 1.0)
    return a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)[..., :3]


def _as_map_columns(name: str, maps: object) -> list[tuple[str, np.ndarray]]:
    """Normalise a model's maps to ``[(column title, [N, H, W])]``."""
    if isinstance(maps, Mapping):
        return [(f"{name}\n{k}", _np(v)) for k, v in maps.items()]
    if isinstance(maps, tuple | list):
        labels = ["Grad-CAM", "saliency"] + [f"map {i}" for i in range(2, len(maps))]
        return [(f"{name}\n{lab}", _np(v)) for lab, v in zip(labels, maps, strict=False)]
    a = _np(maps)
    if a.ndim == 4:  # [N, M, H, W]: channel 0 Grad-CAM, channel 1 saliency, ...
        return _as_map_columns(name, [a[:, i] for i in range(a.shape[1])])
    return [(f"{name}\nGrad-CAM", a)]


def plot_explanations(
    images: torch.Tensor, maps_by_model: Mapping[str, object], path: PathLike
) -> Path:
    """Grid with one row per image: the image, then per model its Grad-CAM overlaid on the
    image and its saliency map, side by side.

    Each value of ``maps_by_model`` is a ``[N, H, W]`` Grad-CAM tensor, a ``[N, 2, H, W]`` tensor
    (Grad-CAM, saliency), a ``(gradcam, saliency)`` pair or a ``{title: [N, H, W]}`` dict.
    Columns titled "Grad-CAM" (or the first column of a model) are drawn as overlays.

    Parameters
    ----------
    images : Tensor
        ``[N, C, H, W]`` in ``[-1, 1]``.
    maps_by_model : mapping
        Maps by model name.
    path : str or Path
        The PNG of the explanation grid.

    Returns
    -------
    Path
        ``path`` (the explanation grid, written).
    """
    imgs = images.detach().cpu()
    n = imgs.shape[0]
    columns: list[tuple[str, np.ndarray, bool]] = []
    for name, maps in maps_by_model.items():
        for j, (title, arr) in enumerate(_as_map_columns(name, maps)):
            overlay = "cam" in title.lower() or j == 0
            columns.append((title, arr, overlay))
    ncols = 1 + len(columns)
    fig = _new_figure((1.6 * ncols, 1.6 * n + 0.4))
    axes = np.asarray(fig.subplots(n, ncols, squeeze=False))
    for i in range(n):
        base = _image_hwc(imgs[i])
        cmap = "gray" if base.ndim == 2 else None
        axes[i, 0].imshow(base, cmap=cmap, vmin=0.0, vmax=1.0)
        for j, (_title, arr, overlay) in enumerate(columns, start=1):
            if overlay:
                axes[i, j].imshow(base, cmap=cmap, vmin=0.0, vmax=1.0)
                axes[i, j].imshow(arr[i], cmap="jet", alpha=0.5, vmin=0.0, vmax=1.0)
            else:
                axes[i, j].imshow(arr[i], cmap="hot", vmin=0.0, vmax=1.0)
    axes[0, 0].set_title("image", fontsize=8)
    for j, (title, _arr, _ov) in enumerate(columns, start=1):
        axes[0, j].set_title(title, fontsize=8)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    return _save(fig, path)


def plot_training_curves(metrics_rows: Sequence[Mapping[str, object]], path: PathLike) -> Path:
    """Loss (left) and accuracy (right) vs epoch for every numeric key present in the rows that
    contains ``loss`` resp. ``acc``/``top1`` (e.g. ``train_loss``, ``val_loss``, ``val_acc``).

    Parameters
    ----------
    metrics_rows : sequence of mapping
        The rows of ``metrics.jsonl``.
    path : str or Path
        The PNG of the training curves.

    Returns
    -------
    Path
        ``path`` (the training curves, written).
    """
    keys: list[str] = []
    for r in metrics_rows:
        keys += [k for k, v in r.items() if k not in keys and k != "epoch" and is_number(v)]
    loss_keys = [k for k in keys if "loss" in k.lower()]
    acc_keys = [k for k in keys if "acc" in k.lower() or "top1" in k.lower()]
    fig = _new_figure((10.0, 4.0))
    ax_loss, ax_acc = fig.subplots(1, 2)
    for ax, ks, ylabel in ((ax_loss, loss_keys, "loss"), (ax_acc, acc_keys, "accuracy")):
        for k in ks:
            pts = [
                (float(r.get("epoch", i)), float(r[k]))  # type: ignore[arg-type]
                for i, r in enumerate(metrics_rows)
                if is_number(r.get(k))
            ]
            pts = [p for p in pts if math.isfinite(p[1])]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, marker=".", label=k)
        ax.set(xlabel="epoch", ylabel=ylabel)
        if ks:
            ax.legend(fontsize=7)
    return _save(fig, path)
