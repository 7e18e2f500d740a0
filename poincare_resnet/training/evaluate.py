"""Evaluating a model on a split during and after training."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .optim import autocast_context


@torch.no_grad()
def evaluate_split(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    precision: str = "fp32",
    return_logits: bool = False,
) -> dict[str, Any]:
    """Loss, top-1 and top-5 accuracy (fractions) of ``model`` in eval mode.

    Parameters
    ----------
    model : nn.Module
        The classifier (its ``training`` flag is restored afterwards).
    x : Tensor
        Images ``[N, C, H, W]``.
    y : Tensor
        Labels ``[N]``.
    batch_size : int
        Images per forward pass.
    device : torch.device or str
        Where the model runs.
    precision : str
        ``fp32``, ``bf16`` or ``fp16`` autocast.
    return_logits : bool
        Also return the CPU logits ``[N, K]``.

    Returns
    -------
    dict
        ``loss`` (mean cross-entropy), ``top1``, ``top5`` (and ``logits``).
    """
    device = torch.device(device)
    was_training = model.training
    model.eval()
    dtype = next(model.parameters()).dtype
    loss_sum, logits_all = 0.0, []
    for i in range(0, len(x), batch_size):
        xb = x[i : i + batch_size].to(device, dtype)
        with autocast_context(precision, device):
            logits = model(xb).float()
        loss_sum += float(
            F.cross_entropy(logits, y[i : i + batch_size].to(device), reduction="sum")
        )
        logits_all.append(logits.cpu())
    model.train(was_training)
    logits = torch.cat(logits_all)
    k = min(5, logits.shape[1])
    top = logits.topk(k, dim=1).indices
    hit = top.eq(y.view(-1, 1))
    out: dict[str, Any] = {
        "loss": loss_sum / len(x),
        "top1": float(hit[:, :1].any(1).float().mean()),
        "top5": float(hit.any(1).float().mean()),
    }
    if return_logits:
        out["logits"] = logits
    return out
