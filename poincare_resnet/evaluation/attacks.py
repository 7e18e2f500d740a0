"""White-box L∞ adversarial attacks (FGSM, PGD) and robust accuracy.

Inputs live in ``[-1, 1]``; ``eps`` is measured in those input units.  Attacks run the model in
eval mode (each submodule's mode is restored afterwards) and differentiate with respect to the
input only (``torch.autograd.grad``), so no ``.grad`` is left on the parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .ood import _model_device, eval_mode

__all__ = ["ATTACKS", "PAPER_FGSM_EPS", "fgsm", "pgd", "robust_accuracy"]

#: The paper's FGSM grid, ε ∈ {0.8, 1.6, 2.4, 3.2}/255 in [-1, 1] input units.
PAPER_FGSM_EPS: tuple[float, ...] = (0.8 / 255, 1.6 / 255, 2.4 / 255, 3.2 / 255)

X_MIN, X_MAX = -1.0, 1.0


def _input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``∇_x Σ_i CE(f(x_i), y_i)`` (sum, so each sample's gradient is not scaled by ``1/B``)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        loss = F.cross_entropy(model(x), y, reduction="sum")
        (grad,) = torch.autograd.grad(loss, [x])
    return grad.detach()


def fgsm(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> torch.Tensor:
    """Fast gradient sign method: ``x_adv = clip_[-1,1](x + ε · sign(∇_x CE(f(x), y)))``.

    Parameters
    ----------
    model : nn.Module
        The classifier (eval mode is the caller's choice).
    x : Tensor
        Images ``[B, C, H, W]`` in ``[-1, 1]``.
    y : Tensor
        Labels ``[B]``.
    eps : float
        The L∞ radius in input units.

    Returns
    -------
    Tensor
        The adversarial images.
    """
    x = x.detach().clamp(X_MIN, X_MAX)
    if eps == 0:
        return x.clone()
    with eval_mode(model):
        grad = _input_grad(model, x, y)
    return (x + eps * grad.sign()).clamp(X_MIN, X_MAX).detach()


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Projected gradient descent (Madry et al.) in the L∞ ball of radius ``eps``.

    ``x_{t+1} = clip_[-1,1](Π_{‖·−x‖∞≤ε}(x_t + α · sign(∇_x CE(f(x_t), y))))`` with
    ``α = step_size`` (default ``2.5 ε / steps``) and, if ``random_start``, ``x_0 = x + U[-ε, ε]``.

    Parameters
    ----------
    model, x, y
        As in :func:`fgsm`.
    eps : float
        ``ε``, in ``[-1, 1]`` input units.
    steps : int
        Gradient steps.
    step_size : float, optional
        ``α`` (default ``2.5 ε / steps``).
    random_start : bool
        Start at a uniform point of the ε-ball.
    generator : torch.Generator, optional
        The random start's generator.

    Returns
    -------
    Tensor
        The adversarial images.
    """
    x = x.detach().clamp(X_MIN, X_MAX)
    if eps == 0 or steps <= 0:
        return x.clone()
    alpha = 2.5 * eps / steps if step_size is None else float(step_size)
    lo, hi = (x - eps).clamp_min(X_MIN), (x + eps).clamp_max(X_MAX)
    x_adv = x.clone()
    if random_start:
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device="cpu")
        x_adv = torch.max(torch.min(x + (2.0 * noise.to(x.device) - 1.0) * eps, hi), lo)
    with eval_mode(model):
        for _ in range(steps):
            grad = _input_grad(model, x_adv, y)
            x_adv = torch.max(torch.min(x_adv + alpha * grad.sign(), hi), lo).detach()
    return x_adv


ATTACKS: dict[str, Callable[..., torch.Tensor]] = {"fgsm": fgsm, "pgd": pgd}


def robust_accuracy(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: str | Callable[..., torch.Tensor] = "fgsm",
    eps_list: Sequence[float] = PAPER_FGSM_EPS,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    **kw,
) -> list[dict[str, float | str]]:
    """Accuracy under ``attack`` for each ``eps``: rows ``{attack, eps, eps_255, accuracy,
    clean_accuracy}`` with ``eps_255 = 255 · eps`` (the paper reports ε·255 in [-1, 1] units).

    ``attack`` is ``"fgsm"``, ``"pgd"`` or a callable ``attack(model, x, y, eps, **kw)``.

    Parameters
    ----------
    model, x, y
        As in :func:`fgsm` (``x`` and ``y`` are split into batches).
    attack : str or callable
        The attack.
    eps_list : sequence of float
        The radii.
    batch_size : int
        Images per batch.
    device : torch.device or str, optional
        Where the model runs.
    **kw
        Further arguments of the attack.

    Returns
    -------
    list of dict
        One row per ε.
    """
    if isinstance(attack, str):
        if attack not in ATTACKS:
            raise ValueError(f"unknown attack {attack!r}; choose from {sorted(ATTACKS)}")
        name, fn = attack, ATTACKS[attack]
    else:
        name, fn = getattr(attack, "__name__", "custom"), attack
    dev = _model_device(model, device)
    n = x.shape[0]
    y = torch.as_tensor(y).long()

    def _accuracy(eps: float | None) -> float:
        correct = 0
        for i in range(0, n, batch_size):
            xb, yb = x[i : i + batch_size].to(dev), y[i : i + batch_size].to(dev)
            xb = xb.clamp(X_MIN, X_MAX) if eps is None else fn(model, xb, yb, eps, **kw)
            with eval_mode(model), torch.no_grad():
                correct += int((model(xb).argmax(dim=1) == yb).sum())
        return correct / max(n, 1)

    clean = _accuracy(None)
    return [
        {
            "attack": name,
            "eps": float(eps),
            "eps_255": float(eps) * 255.0,
            "accuracy": _accuracy(float(eps)),
            "clean_accuracy": clean,
        }
        for eps in eps_list
    ]
