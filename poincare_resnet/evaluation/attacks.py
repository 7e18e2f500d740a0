"""L∞ adversarial attacks and robust accuracy: FGSM, PGD (cross-entropy or margin loss, random
restarts), an angular attack on the embedding, a gradient-masking check.

Inputs live in ``[-1, 1]``; ``eps`` is measured in those input units.  Attacks run the model in
eval mode (each submodule's mode is restored afterwards) and differentiate with respect to the
input only (``torch.autograd.grad``), so no ``.grad`` is left on the parameters.  The
gradient-free Square attack is in :mod:`poincare_resnet.evaluation.square_attack`; the per-sample
robustness table (worst case over attacks, transfer) in
:mod:`poincare_resnet.evaluation.robustness`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .ood import _model_device, eval_mode

__all__ = [
    "ATTACKS",
    "LOSSES",
    "PAPER_FGSM_EPS",
    "angular",
    "angular_component",
    "angular_input_grad",
    "DIRECTIONS",
    "attack_loss",
    "fgsm",
    "input_grad",
    "margin_loss",
    "pgd",
    "predict",
    "robust_accuracy",
    "zero_grad_fraction",
]

#: The paper's FGSM grid, ε ∈ {0.8, 1.6, 2.4, 3.2}/255 in [-1, 1] input units.
PAPER_FGSM_EPS: tuple[float, ...] = (0.8 / 255, 1.6 / 255, 2.4 / 255, 3.2 / 255)

#: The attack losses: cross-entropy and the Carlini–Wagner margin.
LOSSES: tuple[str, ...] = ("ce", "margin")

X_MIN, X_MAX = -1.0, 1.0

Direction = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The Carlini–Wagner margin ``m_i = max_{j≠y_i} z_ij − z_{i y_i}`` (> 0: misclassified).

    Parameters
    ----------
    logits : Tensor
        ``z``, shape ``[B, K]`` (``K ≥ 2``).
    y : Tensor
        Labels ``[B]``.

    Returns
    -------
    Tensor
        ``m``, shape ``[B]``.
    """
    true = logits.gather(1, y[:, None])
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf"))
    return others.amax(dim=1) - true[:, 0]


def attack_loss(logits: torch.Tensor, y: torch.Tensor, loss: str = "ce") -> torch.Tensor:
    """The per-sample loss an attack ascends: ``CE(z_i, y_i)`` or :func:`margin_loss`.

    Parameters
    ----------
    logits : Tensor
        ``[B, K]``.
    y : Tensor
        Labels ``[B]``.
    loss : str
        ``"ce"`` or ``"margin"``.

    Returns
    -------
    Tensor
        ``[B]``.
    """
    _check_loss(loss)
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    return margin_loss(logits, y)


def _check_loss(loss: str) -> None:
    if loss not in LOSSES:
        raise ValueError(f"unknown attack loss {loss!r}; choose from {', '.join(LOSSES)}")


def _grad_or_zeros(out: torch.Tensor, x: torch.Tensor, grad_out=None) -> torch.Tensor:
    """``∂⟨out, grad_out⟩/∂x``; zeros where ``x`` does not reach ``out`` (a detached input)."""
    if not out.requires_grad:
        return torch.zeros_like(x)
    (grad,) = torch.autograd.grad(out, [x], grad_outputs=grad_out, allow_unused=True)
    return torch.zeros_like(x) if grad is None else grad.detach()


def input_grad(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str = "ce"
) -> torch.Tensor:
    """``∇_x Σ_i L(f(x_i), y_i)`` (a sum, so each sample's gradient is not scaled by ``1/B``).

    Parameters
    ----------
    model : nn.Module
        The classifier (its mode is the caller's).
    x : Tensor
        Images ``[B, C, H, W]``.
    y : Tensor
        Labels ``[B]``.
    loss : str
        ``"ce"`` or ``"margin"`` (:func:`attack_loss`).

    Returns
    -------
    Tensor
        The gradient, shaped like ``x`` (exact zeros where the graph does not reach ``x``).
    """
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        return _grad_or_zeros(attack_loss(model(x), y, loss).sum(), x)


def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``argmax_k f(x)_k`` in eval mode without autograd.

    Parameters
    ----------
    model : nn.Module
        The classifier.
    x : Tensor
        Images ``[B, C, H, W]``.

    Returns
    -------
    Tensor
        Predicted labels ``[B]``.
    """
    with eval_mode(model), torch.no_grad():
        return model(x).argmax(dim=1)


def fgsm(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, loss: str = "ce"
) -> torch.Tensor:
    """Fast gradient sign method: ``x_adv = clip_[-1,1](x + ε · sign(∇_x L(f(x), y)))``.

    Parameters
    ----------
    model : nn.Module
        The classifier.
    x : Tensor
        Images ``[B, C, H, W]`` in ``[-1, 1]``.
    y : Tensor
        Labels ``[B]``.
    eps : float
        The L∞ radius in input units.
    loss : str
        ``"ce"`` (the default, the paper's) or ``"margin"``.

    Returns
    -------
    Tensor
        The adversarial images.
    """
    x = x.detach().clamp(X_MIN, X_MAX)
    if eps == 0:
        return x.clone()
    with eval_mode(model):
        grad = input_grad(model, x, y, loss)
    return (x + eps * grad.sign()).clamp(X_MIN, X_MAX).detach()


def _sign_ascent(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    direction: Direction,
    steps: int,
    alpha: float,
    random_start: bool,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """One run of ``x_{t+1} = clip_[-1,1](Π_{‖·−x‖∞≤ε}(x_t + α · sign(d(x_t))))``."""
    lo, hi = (x - eps).clamp_min(X_MIN), (x + eps).clamp_max(X_MAX)
    x_adv = x.clone()
    if random_start:
        noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device="cpu")
        x_adv = torch.max(torch.min(x + (2.0 * noise.to(x.device) - 1.0) * eps, hi), lo)
    for _ in range(steps):
        d = direction(model, x_adv, y)
        x_adv = torch.max(torch.min(x_adv + alpha * d.sign(), hi), lo).detach()
    return x_adv


def _keep_first_fooling(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    run: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    restarts: int,
) -> torch.Tensor:
    """``restarts`` runs of ``run(x, y)``; per sample the first result that fools the model
    (later restarts attack only the samples not fooled yet), else the first run's result."""
    best = run(x, y)
    if restarts == 1:
        return best
    fooled = predict(model, best) != y
    for _ in range(restarts - 1):
        todo = (~fooled).nonzero()[:, 0]
        if todo.numel() == 0:
            break
        x_r = run(x[todo], y[todo])
        hit = predict(model, x_r) != y[todo]
        best[todo[hit]] = x_r[hit]
        fooled[todo[hit]] = True
    return best


def _check_iterated(steps: int, restarts: int, random_start: bool) -> None:
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be a positive integer, got {restarts!r}")
    if restarts > 1 and not random_start:
        raise ValueError("restarts > 1 need random_start (otherwise every restart is the same)")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be a non-negative integer, got {steps!r}")


def _iterated_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    direction: Direction,
    steps: int,
    step_size: float | None,
    random_start: bool,
    generator: torch.Generator | None,
    restarts: int,
) -> torch.Tensor:
    """:func:`_sign_ascent` with ``α = step_size`` (default ``2.5 ε / steps``), ``restarts``
    random starts (:func:`_keep_first_fooling`), in eval mode."""
    _check_iterated(steps, restarts, random_start)
    x = x.detach().clamp(X_MIN, X_MAX)
    if eps == 0 or steps == 0:
        return x.clone()
    alpha = 2.5 * eps / steps if step_size is None else float(step_size)
    ascent = functools.partial(
        _sign_ascent,
        model,
        eps=eps,
        direction=direction,
        steps=steps,
        alpha=alpha,
        random_start=random_start,
        generator=generator,
    )
    with eval_mode(model):
        return _keep_first_fooling(model, x, y, ascent, restarts)


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    steps: int = 10,
    step_size: float | None = None,
    random_start: bool = True,
    generator: torch.Generator | None = None,
    loss: str = "ce",
    restarts: int = 1,
    direction: str = "gradient",
) -> torch.Tensor:
    """Projected gradient descent (Madry et al.) in the L∞ ball of radius ``eps``.

    ``x_{t+1} = clip_[-1,1](Π_{‖·−x‖∞≤ε}(x_t + α · sign(d(x_t))))`` with ``d = ∇_x L(f(x), y)``
    (``direction="gradient"``) or the angular direction of :func:`angular_input_grad`
    (``"angular"``, :func:`angular`),
    ``α = step_size`` (default ``2.5 ε / steps``), ``L`` the cross-entropy or the margin
    ``max_{j≠y} z_j − z_y`` (:func:`margin_loss`) and, if ``random_start``,
    ``x_0 = x + U[-ε, ε]``.  With ``restarts = R`` the attack runs up to ``R`` times from fresh
    random starts and keeps, per sample, the first result that fools the model: a restart never
    makes a sample correct again.

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
        The random starts' generator.
    loss : str
        ``"ce"`` or ``"margin"``.
    restarts : int
        Random restarts (``> 1`` needs ``random_start``).
    direction : str
        ``"gradient"`` or ``"angular"``.

    Returns
    -------
    Tensor
        The adversarial images.
    """
    _check_loss(loss)
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; choose from {', '.join(DIRECTIONS)}")
    d = functools.partial(DIRECTIONS[direction], loss=loss)
    return _iterated_attack(
        model, x, y, eps, d, steps, step_size, random_start, generator, restarts
    )


def angular_component(e: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """The part of ``g`` orthogonal to the radial direction of ``e``:
    ``g_a = g − (g·ê) ê`` with ``ê = e / ‖e‖`` (``g_a = g`` where ``e = 0``).

    Parameters
    ----------
    e : Tensor
        Embeddings ``[B, D]``.
    g : Tensor
        Gradients at ``e``, ``[B, D]``.

    Returns
    -------
    Tensor
        ``g_a``, ``[B, D]``.
    """
    norm = e.norm(dim=1, keepdim=True)
    unit = torch.where(norm > 0, e / norm.clamp_min(torch.finfo(e.dtype).tiny), 0.0)
    return g - (g * unit).sum(dim=1, keepdim=True) * unit


def angular_input_grad(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss: str = "ce"
) -> torch.Tensor:
    """The angular attack direction ``∇_x ⟨e(x), g_a⟩`` with ``g_a`` held fixed.

    ``e(x)`` is ``model.forward_features(x)`` (the pooled embedding before the head, flattened
    to ``[B, D]``), ``g_e = ∇_e Σ_i L(forward_head(e_i), y_i)`` and ``g_a`` its
    :func:`angular_component`.  For a Poincaré model ``e`` is the tangent vector at the origin
    of the embedding point ``expmap0(e)``; ``expmap0`` keeps directions and scales the radial
    and the angular parts by positive factors, so the direction is the same as for the
    decomposition at the point itself (or of the Riemannian gradient).

    Parameters
    ----------
    model : nn.Module
        A classifier with ``forward_features`` and ``forward_head``.
    x, y, loss
        As in :func:`input_grad`.

    Returns
    -------
    Tensor
        Shaped like ``x``.
    """
    if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
        raise ValueError(
            f"the angular attack needs forward_features and forward_head; "
            f"{type(model).__name__} has not both"
        )
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        feats = model.forward_features(x)
        total = attack_loss(model.forward_head(feats), y, loss).sum()
        (g_e,) = torch.autograd.grad(total, [feats], retain_graph=True)
        e = feats.detach().flatten(1)
        g_a = angular_component(e, g_e.detach().flatten(1)).view_as(feats)
        return _grad_or_zeros(feats, x, g_a)


#: The ascent directions of :func:`pgd`: the input gradient, its angular part.
DIRECTIONS: dict[str, Direction] = {"gradient": input_grad, "angular": angular_input_grad}


def angular(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, **kw) -> torch.Tensor:
    """The angular attack (in the spirit of AGSM, arXiv 2511.12985): PGD along the angular part
    of the embedding gradient, ``pgd(..., direction="angular")``.

    ``x_{t+1} = clip_[-1,1](Π_{‖·−x‖∞≤ε}(x_t + α · sign(∇_x ⟨e(x_t), g_a⟩)))`` with ``g_a`` the
    loss gradient at the embedding ``e`` less its radial part (:func:`angular_input_grad`);
    steps, step size, random start and restarts as in :func:`pgd`.  It runs on any model with
    ``forward_features`` / ``forward_head`` (Poincaré, hybrid, Euclidean).

    Parameters
    ----------
    model, x, y, eps
        As in :func:`fgsm`.
    **kw
        ``steps``, ``step_size``, ``random_start``, ``generator``, ``loss``, ``restarts`` of
        :func:`pgd`.

    Returns
    -------
    Tensor
        The adversarial images.
    """
    return pgd(model, x, y, eps, direction="angular", **kw)


def zero_grad_fraction(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss: str = "ce",
    batch_size: int = 256,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """How often the input gradient ``∇_x L(f(x_i), y_i)`` is exactly zero, in eval mode:
    ``zero_grad_inputs`` = the fraction of inputs whose gradient is 0 in every element,
    ``zero_grad_elements`` = the fraction of all gradient elements that are exactly 0.

    A gradient attack cannot move an input whose gradient is zero (``sign(0) = 0``): a large
    ``zero_grad_inputs`` flags gradient masking (a clamp, a quantiser, a saturated softmax).

    Parameters
    ----------
    model, x, y
        As in :func:`fgsm`.
    loss : str
        ``"ce"`` or ``"margin"``.
    batch_size : int
        Images per batch.
    device : torch.device or str, optional
        Where the model runs.

    Returns
    -------
    dict
        ``{"zero_grad_inputs": float, "zero_grad_elements": float}``.
    """
    dev = _model_device(model, device)
    y = torch.as_tensor(y).long()
    inputs = elements = total = 0
    with eval_mode(model):
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i : i + batch_size].to(dev), y[i : i + batch_size].to(dev)
            g = input_grad(model, xb, yb, loss)
            zero = (g == 0).flatten(1)
            inputs += int(zero.all(dim=1).sum())
            elements += int(zero.sum())
            total += zero.numel()
    n = max(x.shape[0], 1)
    return {"zero_grad_inputs": inputs / n, "zero_grad_elements": elements / max(total, 1)}


def _registry() -> dict[str, Callable[..., torch.Tensor]]:
    from .square_attack import square

    return {
        "fgsm": fgsm,
        "pgd": pgd,
        "pgd-margin": functools.partial(pgd, loss="margin"),
        "square": square,
        "angular": functools.partial(pgd, direction="angular"),
    }


#: The attacks by name: ``attack(model, x, y, eps, **options)``.
ATTACKS: dict[str, Callable[..., torch.Tensor]] = _registry()


def resolve_attack(attack: str | Callable[..., torch.Tensor]) -> tuple[str, Callable]:
    """``(name, function)`` of an attack name of :data:`ATTACKS` or a callable.

    Parameters
    ----------
    attack : str or callable
        The attack.

    Returns
    -------
    tuple
        ``(name, attack)``.
    """
    if not isinstance(attack, str):
        return getattr(attack, "__name__", "custom"), attack
    if attack not in ATTACKS:
        raise ValueError(f"unknown attack {attack!r}; choose from {', '.join(ATTACKS)}")
    return attack, ATTACKS[attack]


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
    Only the clean-correct images are attacked (the others count as misclassified).

    ``attack`` is a name of :data:`ATTACKS` or a callable ``attack(model, x, y, eps, **kw)``.

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
    from .robustness import correct_under_attack

    name, fn = resolve_attack(attack)
    y = torch.as_tensor(y).long()

    clean_ok = correct_under_attack(model, x, y, None, None, batch_size=batch_size, device=device)

    def accuracy(eps: float) -> float:
        ok = correct_under_attack(model, x, y, fn, eps, None, batch_size, device, clean_ok, **kw)
        return float(ok.double().mean()) if ok.numel() else 0.0

    clean = float(clean_ok.double().mean()) if clean_ok.numel() else 0.0
    return [
        {
            "attack": name,
            "eps": float(eps),
            "eps_255": float(eps) * 255.0,
            "accuracy": accuracy(float(eps)),
            "clean_accuracy": clean,
        }
        for eps in eps_list
    ]
