"""Out-of-distribution scores, model output collection, OOD evaluation and synthetic OOD sets.

All scores follow the convention *higher = more in-distribution (ID)*, matching
:func:`poincare_resnet.evaluation.metrics.ood_metrics` (ID is the positive class).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .metrics import ood_metrics

__all__ = [
    "OOD_SET_NAMES",
    "SCORE_FUNCTIONS",
    "collect_outputs",
    "energy_score",
    "evaluate_ood",
    "feature_norm_score",
    "make_ood_sets",
    "msp_score",
    "ood_rows_from_scores",
    "score_outputs",
]

OOD_SET_NAMES: tuple[str, ...] = ("gaussian", "uniform", "inverted", "hflip", "vflip", "digits")


def energy_score(logits: torch.Tensor, T: float = 1.0) -> torch.Tensor:
    """Negative free energy ``-E(x) = T · logsumexp(f(x) / T)`` (higher = more ID), ``[B]``.

    Parameters
    ----------
    logits : Tensor
        ``[B, K]``.
    T : float
        The temperature.

    Returns
    -------
    Tensor
        ``[B]`` scores.
    """
    return T * torch.logsumexp(logits / T, dim=-1)


def msp_score(logits: torch.Tensor) -> torch.Tensor:
    """Maximum softmax probability ``max_k softmax(f(x))_k`` (higher = more ID), shape ``[B]``.

    Parameters
    ----------
    logits : Tensor
        ``[B, K]``.

    Returns
    -------
    Tensor
        ``[B]`` scores.
    """
    return torch.softmax(logits, dim=-1).amax(dim=-1)


def feature_norm_score(features: torch.Tensor) -> torch.Tensor:
    """Hyperbolic distance of the pooled feature point to the origin, ``2‖v‖`` (shape ``[B]``).

    ``features`` are tangent vectors ``v`` at the origin of the Poincaré ball of curvature ``-c``.
    With ``expmap0(v) = tanh(√c‖v‖) v / (√c‖v‖)`` (conformal factor ``λ_0 = 2``) and
    ``d(0, x) = (2/√c) artanh(√c‖x‖)`` one gets ``d(0, expmap0(v)) = 2‖v‖`` for every ``c``.
    Sign convention: ``+distance`` — ID samples of hyperbolic nets sit farther from the origin
    (more confident), so higher = more ID.  For a Euclidean model this is ``2‖f‖``, a monotone
    rescaling of the feature norm (same AUROC/FPR/AUPR).

    Parameters
    ----------
    features : Tensor
        Pooled tangent features ``[B, D]`` (or ``[B, D, 1, 1]``).

    Returns
    -------
    Tensor
        ``[B]`` scores.
    """
    return 2.0 * torch.linalg.vector_norm(features.flatten(1), dim=-1)


SCORE_FUNCTIONS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "energy": lambda logits, feats: energy_score(logits),
    "msp": lambda logits, feats: msp_score(logits),
    "feature_norm": lambda logits, feats: feature_norm_score(feats),
}


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put every submodule in eval mode and restore each one's own ``training`` flag on exit.

    Parameters
    ----------
    model : nn.Module
        The network.

    Yields
    ------
    nn.Module
        ``model``, in eval mode.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, flag in flags:
            m.training = flag


def _model_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


def collect_outputs(
    model: nn.Module,
    x: torch.Tensor,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` in eval mode without grad; return CPU ``(logits [N, K], features [N, D])``.

    Features come from ``forward_features`` and logits from ``forward_head(features)``.

    Parameters
    ----------
    model : nn.Module
        A classifier with ``forward_features`` and ``forward_head``.
    x : Tensor
        Images ``[N, C, H, W]`` (at least one).
    batch_size : int
        Images per forward pass.
    device : torch.device or str, optional
        Where the model runs (default: that of its parameters).

    Returns
    -------
    tuple of Tensor
        ``(logits, features)`` on the CPU.
    """
    dev = _model_device(model, device)
    logits_all, feats_all = [], []
    with eval_mode(model), torch.no_grad():
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size].to(dev)
            feats = model.forward_features(xb)
            logits = model.forward_head(feats)
            feats_all.append(feats.detach().flatten(1).cpu())
            logits_all.append(logits.detach().cpu())
    if not logits_all:
        raise ValueError("collect_outputs needs at least one input")
    return torch.cat(logits_all), torch.cat(feats_all)


def score_outputs(
    logits: torch.Tensor, feats: torch.Tensor, names: Sequence[str]
) -> dict[str, np.ndarray]:
    """The OOD scores ``names`` (of :data:`SCORE_FUNCTIONS`) of one set's outputs.

    Parameters
    ----------
    logits : Tensor
        ``[N, K]`` logits (:func:`collect_outputs`).
    feats : Tensor
        ``[N, D]`` features.
    names : sequence of str
        Score names; an unknown one raises ``ValueError`` naming the choices.

    Returns
    -------
    dict of str to ndarray
        ``{name: float64 scores [N]}`` (higher = more ID).
    """
    out = {}
    for name in names:
        if name not in SCORE_FUNCTIONS:
            raise ValueError(f"unknown OOD score {name!r}; choose from {sorted(SCORE_FUNCTIONS)}")
        out[name] = SCORE_FUNCTIONS[name](logits, feats).double().numpy()
    return out


def evaluate_ood(
    model: nn.Module,
    in_x: torch.Tensor,
    ood_sets: Mapping[str, torch.Tensor],
    scores: Sequence[str] = ("energy", "msp", "feature_norm"),
    repeats: int = 1,
    seed: int = 0,
    subsample: int | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> list[dict[str, float | str | int]]:
    """OOD detection metrics of ``model`` for every (OOD set, score) pair.

    Runs each image set through the network once (:func:`collect_outputs`), scores it and hands
    the scores to :func:`ood_rows_from_scores`, which documents the rows.

    Parameters
    ----------
    model : nn.Module
        A classifier with ``forward_features`` and ``forward_head``.
    in_x : Tensor
        In-distribution images ``[N, C, H, W]``.
    ood_sets : mapping of str to Tensor
        Out-of-distribution image sets by name.
    scores : sequence of str
        Names in :data:`SCORE_FUNCTIONS` (higher = more ID).
    repeats, seed, subsample
        As in :func:`ood_rows_from_scores`.
    batch_size, device
        As in :func:`collect_outputs`.

    Returns
    -------
    list of dict
        One row per (set, score), sets in order, scores in order.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    in_scores = score_outputs(*collect_outputs(model, in_x, batch_size, device), scores)
    out_scores = {
        name: score_outputs(*collect_outputs(model, x, batch_size, device), scores)
        for name, x in ood_sets.items()
    }
    return ood_rows_from_scores(in_scores, out_scores, repeats, seed, subsample)


def ood_rows_from_scores(
    in_scores: Mapping[str, np.ndarray],
    out_scores: Mapping[str, Mapping[str, np.ndarray]],
    repeats: int = 1,
    seed: int = 0,
    subsample: int | None = None,
) -> list[dict[str, float | str | int]]:
    """OOD detection metrics (:func:`~poincare_resnet.evaluation.ood_metrics`) from
    precomputed scores, for every (OOD set, score) pair.

    With ``repeats == 1`` and ``subsample is None``, or when ``n`` (below) is the size of both
    sets, the full sets are used once (std 0, ``repeats`` 1: a draw of every sample is only a
    permutation, so more repeats would report rounding noise as spread). Otherwise each repeat
    draws (without replacement, seeded by ``seed``) ``n`` ID and ``n`` OOD samples,
    ``n = min(len(in), len(ood), subsample)``, shared by all scores; the metrics are averaged
    over repeats and their (population) standard deviation reported.

    Parameters
    ----------
    in_scores : mapping of str to ndarray
        ``{score name: in-distribution scores [N_in]}``; its order is the rows' score order.
    out_scores : mapping of str to mapping of str to ndarray
        ``{OOD set: {score name: scores [N_out]}}`` holding every score of ``in_scores``.
    repeats : int
        Number of random draws (>= 1).
    seed : int
        Seed of the draws.
    subsample : int, optional
        At most this many samples per side and draw.

    Returns
    -------
    list of dict
        Rows ``{ood_set, score, fpr95, auroc, aupr, fpr95_std, auroc_std, aupr_std, repeats,
        n_in, n_out}``.
    """
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    rng = np.random.default_rng(seed)
    rows: list[dict[str, float | str | int]] = []
    n_in = len(next(iter(in_scores.values()))) if in_scores else 0
    for set_name, set_scores in out_scores.items():
        n_out = len(next(iter(set_scores.values()))) if set_scores else 0
        draws = _draws(n_in, n_out, repeats, subsample, rng)
        for score, s_in in in_scores.items():
            vals = [ood_metrics(s_in[i], set_scores[score][o]) for i, o in draws]
            row: dict[str, float | str | int] = {"ood_set": set_name, "score": score}
            for key in ("fpr95", "auroc", "aupr"):
                row[key] = float(np.mean([v[key] for v in vals]))
            for key in ("fpr95", "auroc", "aupr"):
                row[f"{key}_std"] = float(np.std([v[key] for v in vals]))
            row.update(repeats=len(draws), n_in=len(draws[0][0]), n_out=len(draws[0][1]))
            rows.append(row)
    return rows


def _draws(
    n_in: int, n_out: int, repeats: int, subsample: int | None, rng: np.random.Generator
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (ID, OOD) index pairs of each repeat: everything, or ``repeats`` random subsets."""
    n = min(n_in, n_out) if subsample is None else min(n_in, n_out, int(subsample))
    if (repeats == 1 and subsample is None) or n == n_in == n_out:
        return [(np.arange(n_in), np.arange(n_out))]
    return [
        (rng.choice(n_in, n, replace=False), rng.choice(n_out, n, replace=False))
        for _ in range(repeats)
    ]


def _digits_like(in_x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """scikit-learn digits (8×8, values 0–16) scaled to [-1, 1], resized and tiled to ``in_x``."""
    from sklearn.datasets import load_digits

    images = torch.as_tensor(load_digits().images, dtype=torch.float32)  # [1797, 8, 8]
    n, c, h, w = in_x.shape
    idx = torch.randperm(images.shape[0], generator=gen)
    if n > idx.numel():
        idx = idx.repeat((n + idx.numel() - 1) // idx.numel())
    d = images[idx[:n]].unsqueeze(1) / 16.0 * 2.0 - 1.0
    d = F.interpolate(d, size=(h, w), mode="bilinear", align_corners=False).clamp(-1.0, 1.0)
    return d.expand(n, c, h, w).contiguous().to(dtype=in_x.dtype, device=in_x.device)


def make_ood_sets(
    in_x: torch.Tensor, names: Sequence[str] = OOD_SET_NAMES, seed: int = 0
) -> dict[str, torch.Tensor]:
    """Synthetic OOD sets with the shape ``[N, C, H, W]`` of the ID test images ``in_x``.

    * ``gaussian``: ``N(0, 0.5²)`` noise clamped to ``[-1, 1]``;
    * ``uniform``: ``U[-1, 1]`` noise;
    * ``inverted``: ``-x`` (colour negative of the ID images);
    * ``hflip`` / ``vflip``: ID images flipped left-right / upside-down (near-OOD; ``hflip`` is
      close to ID for datasets trained with flip augmentation);
    * ``digits``: scikit-learn's 8×8 digits scaled to ``[-1, 1]``, bilinearly resized to
      ``H × W`` and repeated over the ``C`` channels.

    Parameters
    ----------
    in_x : Tensor
        The ID test images.
    names : sequence of str
        Which sets (of :data:`OOD_SET_NAMES`).
    seed : int
        Seed of the noise sets.

    Returns
    -------
    dict of str to Tensor
        The sets by name.
    """
    if in_x.ndim != 4:
        raise ValueError(f"expected images [N, C, H, W], got {tuple(in_x.shape)}")
    gen = torch.Generator().manual_seed(seed)
    shape, kw = in_x.shape, {"dtype": in_x.dtype}
    out: dict[str, torch.Tensor] = {}
    for name in names:
        if name == "gaussian":
            t = (0.5 * torch.randn(shape, generator=gen, **kw)).clamp(-1.0, 1.0)
        elif name == "uniform":
            t = torch.rand(shape, generator=gen, **kw) * 2.0 - 1.0
        elif name == "inverted":
            t = -in_x.detach().clone()
        elif name == "hflip":
            t = torch.flip(in_x.detach(), dims=[-1])
        elif name == "vflip":
            t = torch.flip(in_x.detach(), dims=[-2])
        elif name == "digits":
            t = _digits_like(in_x.detach(), gen)
        else:
            raise ValueError(f"unknown OOD set {name!r}; choose from {OOD_SET_NAMES}")
        out[name] = t.to(in_x.device)
    return out
