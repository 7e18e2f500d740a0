"""Visual explanations: Grad-CAM and input-gradient saliency.

Grad-CAM hooks ``model.gradcam_layer`` (the last spatial feature map ``A ∈ R^{B×C×H×W}``).  For
hyperbolic models this map is a *tangent-space* map (a tangent vector at the origin of the
Poincaré ball per pixel, i.e. a Euclidean vector space), so linear channel combinations and
gradients are well defined and Grad-CAM applies unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ood import eval_mode

__all__ = ["grad_cam", "input_saliency", "normalize_maps"]


def normalize_maps(maps: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Scale non-negative maps ``[B, H, W]`` to ``[0, 1]`` per image: ``m / max(m)``.

    Dividing by the maximum (no min subtraction) keeps relative magnitudes; all-zero maps stay 0.

    Parameters
    ----------
    maps : Tensor
        Non-negative maps ``[B, H, W]``.
    eps : float
        Floor of the maximum.

    Returns
    -------
    Tensor
        The maps in ``[0, 1]``.
    """
    peak = maps.flatten(1).amax(dim=1).clamp_min(eps)
    return (maps / peak[:, None, None]).clamp(0.0, 1.0)


def _target_scores(logits: torch.Tensor, target: int | torch.Tensor | None) -> torch.Tensor:
    """Logit of the target class per sample (default: the predicted class)."""
    if target is None:
        idx = logits.detach().argmax(dim=1)
    else:
        idx = torch.as_tensor(target, device=logits.device).long().reshape(-1)
        if idx.numel() == 1:
            idx = idx.expand(logits.shape[0])
    return logits.gather(1, idx[:, None]).squeeze(1)


def grad_cam(
    model: nn.Module, x: torch.Tensor, target: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Grad-CAM heat-maps ``[B, H, W]`` in ``[0, 1]`` at the input resolution.

    ``α_k = mean_{ij} ∂y^c/∂A_k[i, j]``, ``L = ReLU(Σ_k α_k A_k)``, bilinearly upsampled to the
    input size and normalised per image (``L / max L``).  ``y^c`` is the logit of ``target``
    (int or ``[B]``; default the predicted class).

    Parameters
    ----------
    model : nn.Module
        A classifier with a ``gradcam_layer`` module (its ``[B, C, H, W]`` output is ``A``).
    x : Tensor
        Images ``[B, C, H, W]``.
    target : int or Tensor, optional
        The explained class.

    Returns
    -------
    Tensor
        Heat-maps ``[B, H, W]``.
    """
    layer = getattr(model, "gradcam_layer", None)
    if not isinstance(layer, nn.Module):
        raise AttributeError("model needs a `gradcam_layer: nn.Module` attribute")
    store: dict[str, torch.Tensor] = {}

    def hook(_m: nn.Module, _inp: object, out: torch.Tensor) -> None:
        store["act"] = out

    handle = layer.register_forward_hook(hook)
    try:
        with eval_mode(model), torch.enable_grad():
            xr = x.detach().requires_grad_(True)  # ensures A is part of a graph
            score = _target_scores(model(xr), target)
            act = store["act"]
            (grads,) = torch.autograd.grad(score.sum(), [act])
    finally:
        handle.remove()
    if act.ndim != 4:
        raise ValueError(f"gradcam_layer must output [B, C, H, W], got {tuple(act.shape)}")
    weights = grads.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * act.detach()).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return normalize_maps(F.relu(cam[:, 0]))


def input_saliency(
    model: nn.Module, x: torch.Tensor, target: int | torch.Tensor | None = None
) -> torch.Tensor:
    """Gradient saliency ``S[i, j] = max_c |∂y^c/∂x[c, i, j]|`` ``[B, H, W]``, normalised per image
    to ``[0, 1]``; ``y^c`` is the target logit (default: predicted class).

    Parameters
    ----------
    model, x, target
        As in :func:`grad_cam` (any differentiable classifier).

    Returns
    -------
    Tensor
        Saliency maps ``[B, H, W]``.
    """
    with eval_mode(model), torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        score = _target_scores(model(xr), target)
        (grad,) = torch.autograd.grad(score.sum(), [xr])
    return normalize_maps(grad.detach().abs().amax(dim=1))
