"""Classification and out-of-distribution (OOD) detection metrics.

OOD convention used throughout: the in-distribution (ID) samples are the *positive* class and a
higher score means "more in-distribution".
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from sklearn import metrics as skm

ArrayLike = torch.Tensor | np.ndarray | Sequence[float]

__all__ = [
    "accuracy_topk",
    "confusion_matrix",
    "ood_metrics",
    "ood_roc_curve",
    "per_class_accuracy",
]


def _to_numpy(a: ArrayLike) -> np.ndarray:
    """Convert a tensor / array / sequence to a flat float64 numpy array."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().double().numpy()
    return np.asarray(a, dtype=np.float64).reshape(-1)


def _predictions(logits_or_preds: torch.Tensor | np.ndarray) -> np.ndarray:
    """Class predictions from logits ``[B, K]`` (argmax) or predictions ``[B]``."""
    t = torch.as_tensor(logits_or_preds)
    if t.ndim == 2:
        t = t.argmax(dim=1)
    return t.detach().cpu().long().numpy().reshape(-1)


def _labels(
    logits_or_preds: torch.Tensor, targets: torch.Tensor, num_classes: int | None
) -> tuple[np.ndarray, np.ndarray, int]:
    """Predicted and true labels as int arrays ``[B]`` and the number of classes (given, the
    logits' width, or one more than the largest label)."""
    preds = _predictions(logits_or_preds)
    y = torch.as_tensor(targets).detach().cpu().long().numpy().reshape(-1)
    if num_classes is None:
        t = torch.as_tensor(logits_or_preds)
        num_classes = (
            int(t.shape[1])
            if t.ndim == 2
            else int(max(preds.max(initial=-1), y.max(initial=-1)) + 1)
        )
    return preds, y, num_classes


def accuracy_topk(
    logits: torch.Tensor, targets: torch.Tensor, ks: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Top-k accuracies as fractions in [0, 1], keyed ``"top{k}"``.

    ``top_k = mean_i 1[y_i ∈ argtop_k(logits_i)]``; ``k`` is capped at the number of classes
    ``K`` (so ``top5`` of a 3-class problem is 1.0), the key keeps the requested ``k``.

    Parameters
    ----------
    logits : Tensor
        ``[B, K]``.
    targets : Tensor
        Labels ``[B]``.
    ks : sequence of int
        The ``k`` values.

    Returns
    -------
    dict of str to float
        ``{"top1": ..., "top5": ...}``.
    """
    logits = torch.as_tensor(logits).detach()
    targets = torch.as_tensor(targets).detach().long().reshape(-1)
    if logits.ndim != 2 or logits.shape[0] != targets.shape[0]:
        raise ValueError(
            f"expected logits [B, K] and targets [B], got {tuple(logits.shape)}, "
            f"{tuple(targets.shape)}"
        )
    n, num_classes = logits.shape
    out: dict[str, float] = {}
    if n == 0:
        return {f"top{k}": float("nan") for k in ks}
    kmax = min(max(ks), num_classes)
    top = logits.topk(kmax, dim=1).indices  # [B, kmax]
    hit = top.eq(targets.to(top.device).unsqueeze(1))
    for k in ks:
        kk = min(int(k), num_classes)
        out[f"top{k}"] = hit[:, :kk].any(dim=1).double().mean().item()
    return out


def per_class_accuracy(
    logits_or_preds: torch.Tensor, targets: torch.Tensor, num_classes: int | None = None
) -> np.ndarray:
    """Accuracy of each class ``acc_k = #{i: y_i = k, ŷ_i = k} / #{i: y_i = k}``.

    Accepts logits ``[B, K]`` or predicted labels ``[B]``; classes without samples get NaN.

    Parameters
    ----------
    logits_or_preds : Tensor
        Logits ``[B, K]`` or labels ``[B]``.
    targets : Tensor
        True labels ``[B]``.
    num_classes : int, optional
        ``K`` (default: the logits' width, or the largest label + 1).

    Returns
    -------
    ndarray
        ``[K]`` accuracies.
    """
    preds, y, num_classes = _labels(logits_or_preds, targets, num_classes)
    correct = np.bincount(y[preds == y], minlength=num_classes).astype(np.float64)
    total = np.bincount(y, minlength=num_classes).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, correct / np.maximum(total, 1.0), np.nan)


def confusion_matrix(
    logits_or_preds: torch.Tensor, targets: torch.Tensor, num_classes: int | None = None
) -> np.ndarray:
    """Confusion matrix ``C[i, j] = #{true class i, predicted class j}`` (sklearn convention).

    Parameters
    ----------
    logits_or_preds, targets, num_classes
        As in :func:`per_class_accuracy`.

    Returns
    -------
    ndarray
        ``[K, K]`` counts.
    """
    preds, y, num_classes = _labels(logits_or_preds, targets, num_classes)
    return skm.confusion_matrix(y, preds, labels=np.arange(num_classes))


def _labels_scores(scores_in: ArrayLike, scores_out: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    s_in, s_out = _to_numpy(scores_in), _to_numpy(scores_out)
    if s_in.size == 0 or s_out.size == 0:
        raise ValueError("ood metrics need at least one in- and one out-of-distribution score")
    scores = np.concatenate([s_in, s_out])
    if not np.all(np.isfinite(scores)):
        raise ValueError("ood scores must be finite")
    labels = np.concatenate([np.ones(s_in.size), np.zeros(s_out.size)])
    return labels, scores


def ood_roc_curve(
    scores_in: ArrayLike, scores_out: ArrayLike
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve ``(fpr, tpr, thresholds)`` with ID as the positive class (higher = more ID).

    ``tpr(t) = P(s_in ≥ t)``, ``fpr(t) = P(s_out ≥ t)``; every threshold is kept
    (``drop_intermediate=False``) so that FPR@95 read from the curve is exact.

    Parameters
    ----------
    scores_in, scores_out : array-like
        Finite ID and OOD scores.

    Returns
    -------
    tuple of ndarray
        ``(fpr, tpr, thresholds)``.
    """
    labels, scores = _labels_scores(scores_in, scores_out)
    fpr, tpr, thr = skm.roc_curve(labels, scores, pos_label=1, drop_intermediate=False)
    return fpr, tpr, thr


def ood_metrics(scores_in: ArrayLike, scores_out: ArrayLike) -> dict[str, float]:
    """FPR at 95% TPR, AUROC and AUPR (ID = positive class, higher score = more ID).

    * ``fpr95 = min { fpr(t) : tpr(t) ≥ 0.95 }`` over all ROC thresholds ``t`` (the fraction of
      OOD samples accepted when at least 95% of the ID samples are accepted);
    * ``auroc = P(s_in > s_out) + ½ P(s_in = s_out)`` (``roc_auc_score``);
    * ``aupr`` = average precision with ID positive (AUPR-In, ``average_precision_score``).

    Parameters
    ----------
    scores_in, scores_out : array-like
        Finite ID and OOD scores (at least one each).

    Returns
    -------
    dict of str to float
        ``fpr95``, ``auroc``, ``aupr``.
    """
    labels, scores = _labels_scores(scores_in, scores_out)
    fpr, tpr, _ = skm.roc_curve(labels, scores, pos_label=1, drop_intermediate=False)
    fpr95 = float(fpr[tpr >= 0.95 - 1e-12].min())
    return {
        "fpr95": fpr95,
        "auroc": float(skm.roc_auc_score(labels, scores)),
        "aupr": float(skm.average_precision_score(labels, scores, pos_label=1)),
    }
