"""The Square attack (L∞; Andriushchenko, Croce, Flammarion & Hein, ECCV 2020): a
gradient-free, score-based random search, written here.

Neither AutoAttack (not on PyPI) nor torchattacks (its wheel pulls torchvision and a different
torch) installs beside this package's torch, so the attack follows the paper and its reference
code (``square_attack_linf``): vertical-stripe initialisation, one random square of ``±ε`` per
channel per query, the margin loss, the piecewise-constant schedule of the square's area.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .ood import eval_mode

__all__ = ["SQUARE_P_INIT", "SQUARE_QUERIES", "square", "square_fraction"]

#: The default query budget per image (the initialisation counts as one query): sized so that the
#: default robustness table of a Poincaré ResNet-20 on 1000 Fashion-MNIST images fits ≈ 2 min
#: on a 2-core CPU (docs/evaluation.md); raise it for a stronger gradient-free check.
SQUARE_QUERIES = 10

#: The default initial fraction of pixels a square covers (AutoAttack's ``p_init`` for L∞).
SQUARE_P_INIT = 0.8

# The reference code's schedule: at iteration t of n, with u = ⌊10⁴ t / n⌋, p = p_init / h
# where h is the halving factor of the first bound ``u ≤ bound`` (u ≤ 10: h = 1).
_SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64))
_SCHEDULE += ((6000, 128), (8000, 256), (10000, 512))


def square_fraction(p_init: float, it: int, n_iters: int) -> float:
    """The fraction ``p`` of the image a square covers at iteration ``it`` of ``n_iters``.

    ``u = ⌊10⁴ · it / n_iters⌋``; ``p = p_init`` for ``u ≤ 10``, then ``p_init / 2`` up to 50,
    ``/4`` up to 200, ``/8`` up to 500, ``/16`` up to 1000, ``/32`` up to 2000, ``/64`` up to
    4000, ``/128`` up to 6000, ``/256`` up to 8000, ``/512`` up to 10⁴ (the paper's schedule,
    rescaled to the query budget).

    Parameters
    ----------
    p_init : float
        The initial fraction, in ``(0, 1]``.
    it : int
        The iteration (0-based, after the initialisation).
    n_iters : int
        The query budget.

    Returns
    -------
    float
        ``p``.
    """
    u = int(it / n_iters * 10000)
    if u <= 10:
        return p_init
    for bound, halving in _SCHEDULE:
        if u <= bound:
            return p_init / halving
    return p_init


def _side(p: float, h: int, w: int) -> int:
    """The square's side ``s = round(√(p · h · w))``, clamped to ``[1, min(h, w) − 1]``."""
    return min(max(int(round(math.sqrt(p * h * w))), 1), max(min(h, w) - 1, 1))


def _signs(shape: tuple[int, ...], eps: float, gen, like: torch.Tensor) -> torch.Tensor:
    """Uniform draws from ``{−ε, +ε}`` (drawn on the CPU from ``gen``)."""
    bits = torch.randint(0, 2, shape, generator=gen, device="cpu").to(like.device, like.dtype)
    return (2.0 * bits - 1.0) * eps


def _square_masks(b: int, h: int, w: int, s: int, gen, device) -> torch.Tensor:
    """``[b, 1, h, w]`` masks of one ``s × s`` square each, placed uniformly in the image."""
    top = torch.randint(0, h - s + 1, (b, 1), generator=gen, device="cpu").to(device)
    left = torch.randint(0, w - s + 1, (b, 1), generator=gen, device="cpu").to(device)
    rows, cols = torch.arange(h, device=device), torch.arange(w, device=device)
    in_h = (rows >= top) & (rows < top + s)
    in_w = (cols >= left) & (cols < left + s)
    return (in_h[:, :, None] & in_w[:, None, :])[:, None]


def _propose(
    x: torch.Tensor, best: torch.Tensor, eps: float, p: float, gen, tries: int = 8
) -> torch.Tensor:
    """``clip(x + δ')``: ``δ = best − x`` with one random square set to ``±ε`` per channel,
    redrawn (up to ``tries`` times) where it would leave ``best`` unchanged."""
    b, c, h, w = x.shape
    mask = _square_masks(b, h, w, _side(p, h, w), gen, x.device)
    delta = best - x
    new = best
    todo = torch.ones(b, dtype=torch.bool, device=x.device)
    for _ in range(tries):
        signs = _signs((b, c, 1, 1), eps, gen, x)
        cand = (x + torch.where(mask, signs, delta)).clamp(-1.0, 1.0)
        new = torch.where(todo[:, None, None, None], cand, new)
        todo = (new == best).flatten(1).all(dim=1)
        if not bool(todo.any()):
            break
    return new


def square(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    queries: int = SQUARE_QUERIES,
    p_init: float = SQUARE_P_INIT,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Square attack, L∞, untargeted: random search on the margin ``m = max_{j≠y} z_j − z_y``.

    ``x_0 = clip_[-1,1](x + δ_0)`` with ``δ_0`` vertical stripes (one ``±ε`` per channel and
    column); then per query, for each image not yet misclassified, ``δ`` with one ``s × s``
    square (``s = round(√(p h w))``, ``p`` from :func:`square_fraction`) set to a random
    ``±ε`` per channel, kept if it raises ``m``.  Every candidate stays in the ε-ball and in
    ``[-1, 1]``.  No gradient is used, so gradient masking does not stop it.

    Parameters
    ----------
    model, x, y, eps
        As in :func:`~poincare_resnet.evaluation.attacks.fgsm`.
    queries : int
        Forward passes per image (the initialisation is the first).
    p_init : float
        The initial square area as a fraction of the image, in ``(0, 1]``.
    generator : torch.Generator, optional
        The random draws' generator (CPU).

    Returns
    -------
    Tensor
        The adversarial images.
    """
    from .attacks import X_MAX, X_MIN, margin_loss

    if isinstance(queries, bool) or not isinstance(queries, int) or queries < 1:
        raise ValueError(f"queries must be a positive integer, got {queries!r}")
    if not 0 < p_init <= 1:
        raise ValueError(f"p_init must lie in (0, 1], got {p_init!r}")
    x = x.detach().clamp(X_MIN, X_MAX)
    if eps == 0:
        return x.clone()
    b, c, _h, w = x.shape
    with eval_mode(model), torch.no_grad():
        best = (x + _signs((b, c, 1, w), eps, generator, x)).clamp(X_MIN, X_MAX)
        logits = model(best)
        margin = margin_loss(logits, y)
        fooled = logits.argmax(dim=1) != y
        for it in range(queries - 1):
            todo = (~fooled).nonzero()[:, 0]
            if todo.numel() == 0:
                break
            p = square_fraction(p_init, it, queries)
            cand = _propose(x[todo], best[todo], eps, p, generator)
            logits = model(cand)
            m = margin_loss(logits, y[todo])
            better = m > margin[todo]
            best[todo[better]] = cand[better]
            margin[todo[better]] = m[better]
            fooled[todo[better]] = logits.argmax(dim=1)[better] != y[todo[better]]
    return best.detach()
