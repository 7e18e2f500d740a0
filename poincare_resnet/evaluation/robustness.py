"""Per-sample robustness: correctness under each attack, the worst case over attacks, transfer
attacks (examples crafted on a source model, evaluated on the target) and the wide table.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .attacks import X_MAX, X_MIN, predict, resolve_attack
from .ood import _model_device

__all__ = [
    "WORST",
    "attack_options",
    "correct_under_attack",
    "robustness_wide_rows",
    "worst_case_correct",
]

#: The ``attack`` name of the worst-case rows.
WORST = "worst"


def _dtype(model: nn.Module) -> torch.dtype:
    p = next(iter(model.parameters()), None)
    return p.dtype if p is not None else torch.get_default_dtype()


def attack_options(fn: Callable[..., Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``options`` that ``fn`` takes as keyword arguments.

    Parameters
    ----------
    fn : callable
        An attack ``fn(model, x, y, eps, **kw)`` (a function or a ``functools.partial``).
    options : mapping
        Candidate options (``steps``, ``restarts``, ``queries``, ``generator`` …).

    Returns
    -------
    dict
        The options ``fn`` accepts.
    """
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return dict(options)
    return {k: v for k, v in options.items() if k in params}


def correct_under_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: str | Callable[..., torch.Tensor] | None,
    eps: float | None,
    source: nn.Module | None = None,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    clean: torch.Tensor | None = None,
    **kw: Any,
) -> torch.Tensor:
    """Per sample, whether ``model`` classifies ``attack(source, x_i, y_i, ε)`` correctly:
    ``c_i = [argmax f(x̃_i) = y_i]`` with ``x̃ = attack(g, x, y, ε)``, ``g = source`` (a
    transfer attack) or ``model`` (white-box); ``eps = None`` scores the clean images.  With
    ``clean`` (the clean correctness), only the clean-correct images are attacked and the
    others count as misclassified, so ``c ≤ clean`` (robust accuracy as in RobustBench).

    Parameters
    ----------
    model : nn.Module
        The attacked (evaluated) classifier.
    x : Tensor
        Images ``[N, C, H, W]`` in ``[-1, 1]``.
    y : Tensor
        Labels ``[N]``.
    attack : str, callable or None
        A name of :data:`~poincare_resnet.evaluation.attacks.ATTACKS` or a callable (``None``
        with ``eps = None``).
    eps : float or None
        The radius in input units (``None``: no attack).
    source : nn.Module, optional
        The model the examples are crafted on (default: ``model``).
    batch_size : int
        Images per batch.
    device : torch.device or str, optional
        Where the models run.
    clean : Tensor, optional
        Bool ``[N]``: the images ``model`` classifies correctly without attack.
    **kw
        Further options of the attack.

    Returns
    -------
    Tensor
        ``c``, bool ``[N]`` (on the CPU).
    """
    if clean is not None:
        out = torch.zeros(x.shape[0], dtype=torch.bool)
        keep = clean.cpu().nonzero()[:, 0]
        yk = torch.as_tensor(y)[keep]
        out[keep] = correct_under_attack(
            model, x[keep], yk, attack, eps, source, batch_size, device, **kw
        )
        return out
    fn = None if eps is None else resolve_attack(attack)[1]  # type: ignore[arg-type]
    crafter = model if source is None else source
    dev, dtype = _model_device(model, device), _dtype(model)
    y = torch.as_tensor(y).long()
    out = []
    for i in range(0, x.shape[0], batch_size):
        xb, yb = x[i : i + batch_size].to(dev), y[i : i + batch_size].to(dev)
        if fn is None:
            xb = xb.clamp(X_MIN, X_MAX)
        else:
            xb = fn(crafter, xb.to(_dtype(crafter)), yb, eps, **kw)
        out.append((predict(model, xb.to(dtype)) == yb).cpu())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.bool)


def worst_case_correct(correct: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The worst case over attacks, per sample: ``w_i = ∧_a c_{a,i}`` (correct only if correct
    under every attack).  Its mean is at most every attack's accuracy and can be below their
    minimum (different attacks fool different samples).

    Parameters
    ----------
    correct : mapping of str to Tensor
        Per attack, bool ``[N]``.

    Returns
    -------
    Tensor
        ``w``, bool ``[N]``.
    """
    if not correct:
        raise ValueError("the worst case needs at least one attack")
    masks = list(correct.values())
    out = masks[0].clone()
    for m in masks[1:]:
        if m.shape != out.shape:
            raise ValueError(f"per-sample masks differ in shape: {tuple(m.shape)} vs {out.shape}")
        out &= m
    return out


def robustness_wide_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The long attack rows (one per attack and ε) as one row per ε: ``eps_255, n,
    clean_accuracy, <attack> …, worst`` (accuracies).

    Parameters
    ----------
    rows : sequence of mapping
        Rows with ``attack``, ``eps``, ``eps_255``, ``accuracy``, ``clean_accuracy``, ``n``.

    Returns
    -------
    list of dict
        One row per ε, in first-seen order.
    """
    wide: dict[float, dict[str, Any]] = {}
    for r in rows:
        row = wide.setdefault(
            float(r["eps"]),
            {
                "eps_255": r["eps_255"],
                "n": r.get("n", ""),
                "clean_accuracy": r["clean_accuracy"],
            },
        )
        row[str(r["attack"])] = r["accuracy"]
    return list(wide.values())
