"""Builders of a run's optimiser, learning-rate schedule and mixed precision (autocast,
grad scaler)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..nn import Curvature, PoincareBatchNorm2d
from .config import NO_DECAY, TrainConfig

_NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, PoincareBatchNorm2d)


def no_decay_parameter_names(model: nn.Module, rule: str = "standard") -> list[str]:
    """The names (as ``model.named_parameters()`` gives them, each parameter once) of the
    parameters that weight decay must not pull toward 0 under ``rule``.

    * **curvature** (every rule but ``"none"``): the parameter of a learnable
      :class:`~poincare_resnet.nn.Curvature` module, ``raw = softplus⁻¹(c)``. Decay pulls
      ``raw`` toward 0, i.e. ``c`` toward ``softplus(0) = ln 2``, which is no prior anyone
      means; one shared module is one parameter, whatever the layers sharing it.
    * **norm weight** (``"standard"``): every parameter of a normalisation layer,
      ``nn.BatchNorm*`` / ``SyncBatchNorm`` / ``InstanceNorm*`` (``_NormBase``), ``GroupNorm``,
      ``LayerNorm`` and :class:`~poincare_resnet.nn.PoincareBatchNorm2d` (its scale and its
      mean point ``bias``): decay would shrink the scale that the normalisation exists to set.
    * **bias** (``"standard"``): every parameter named ``bias`` (convs, linear layers, the
      Poincaré layers' hyperplane offsets ``r_k``, the MLR head's).

    Everything else decays: conv and linear weights (Euclidean and Poincaré), and a residual
    block's learnable scale α.

    Parameters
    ----------
    model : nn.Module
        The network.
    rule : str
        One of :data:`NO_DECAY`.

    Returns
    -------
    list of str
        The exempt parameters' names, in ``named_parameters()`` order.
    """
    if rule not in NO_DECAY:
        raise ValueError(f"unknown no-decay rule {rule!r}; choose one of {NO_DECAY}")
    exempt: set[int] = set()
    for module in model.modules():
        own = dict(module.named_parameters(recurse=False))
        if rule != "none" and isinstance(module, Curvature):
            exempt.update(map(id, own.values()))
        if rule == "standard":
            norm = isinstance(module, _NORM_LAYERS)
            exempt.update(id(p) for k, p in own.items() if norm or k == "bias")
    return [name for name, p in model.named_parameters() if id(p) in exempt]


def parameter_groups(
    model: nn.Module, weight_decay: float, rule: str = "standard"
) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: those that require a gradient, ``weight_decay`` on
    all but :func:`no_decay_parameter_names` (``rule``), which get ``weight_decay=0``.

    Parameters
    ----------
    model : nn.Module
        The network.
    weight_decay : float
        The decay of the decayed group.
    rule : str
        One of :data:`NO_DECAY`.

    Returns
    -------
    list of dict
        ``[{"params", "weight_decay"}, ...]``: the decayed group, then the exempt one; an
        empty group is left out, so ``rule="none"`` gives exactly one group (the layout of the
        optimizer states of runs before the option).
    """
    exempt = set(no_decay_parameter_names(model, rule))
    named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
    groups = [
        {"params": [p for k, p in named if k not in exempt], "weight_decay": weight_decay},
        {"params": [p for k, p in named if k in exempt], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def build_optimizer(cfg: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer ``cfg`` names, PyTorch's fused implementation where the device has one.

    A fused optimizer updates every parameter in one kernel and takes the decision to skip a
    step (fp16 gradient overflow, a NaN event) as a device tensor (``found_inf``), so that
    deciding costs no host sync; its step counter lives on the device too.

    Parameters
    ----------
    cfg : TrainConfig
        ``optimizer`` (``adam``, ``adamw`` or ``sgd``, Nesterov when ``momentum > 0``), ``lr``,
        ``momentum``, ``weight_decay`` and ``no_decay`` (the parameters it spares:
        :func:`parameter_groups`).
    model : nn.Module
        Its parameters that require a gradient are optimised.

    Returns
    -------
    torch.optim.Optimizer
        The optimizer, ``fused=True`` where :func:`_fused_available`.
    """
    groups = parameter_groups(model, cfg.weight_decay, cfg.no_decay)
    params = [p for g in groups for p in g["params"]]
    fused = True if _fused_available(params) else None
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, fused=fused
        )
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, fused=fused)
    return torch.optim.Adam(groups, lr=cfg.lr, fused=fused)


def _fused_available(params: list[nn.Parameter]) -> bool:
    """Whether PyTorch has fused optimizer kernels for these parameters' device and dtype."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    return bool(params) and all(
        p.device.type in _get_fused_kernels_supported_devices() and p.is_floating_point()
        for p in params
    )


def lr_factor(step: int, cfg: TrainConfig, steps_per_epoch: int) -> float:
    r"""Per-step learning-rate factor: linear warm-up, then cosine / step / constant.

    With :math:`W` warm-up steps and :math:`T` steps in all: :math:`(t+1)/W` for :math:`t < W`,
    then ``cosine`` :math:`\tfrac12(1 + \cos(\pi \min(1, (t-W)/(T-W))))`, ``step``
    :math:`\gamma^{\lfloor e / \text{step\_size} \rfloor}` (:math:`e` the epoch), ``none`` 1.

    Parameters
    ----------
    step : int
        The optimisation step :math:`t` (from 0).
    cfg : TrainConfig
        ``epochs``, ``warmup_epochs``, ``schedule``, ``gamma``, ``step_size``.
    steps_per_epoch : int
        Steps in one epoch.

    Returns
    -------
    float
        The factor the base learning rate is multiplied by.
    """
    total = max(1, cfg.epochs * steps_per_epoch)
    warm = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warm:
        return (step + 1) / warm
    if cfg.schedule == "cosine":
        progress = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if cfg.schedule == "step":
        return cfg.gamma ** ((step // steps_per_epoch) // max(1, cfg.step_size))
    return 1.0


def build_scheduler(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR`` whose factor is :func:`lr_factor`.

    Parameters
    ----------
    cfg : TrainConfig
        The run's options (``schedule``, ``warmup_epochs``, ``epochs``, ...).
    optimizer : torch.optim.Optimizer
        The optimizer whose learning rate it sets.
    steps_per_epoch : int
        Optimisation steps in one epoch of this rank.

    Returns
    -------
    torch.optim.lr_scheduler.LambdaLR
        Stepped once after every optimisation step.
    """
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, cfg, steps_per_epoch)
    )


def autocast_context(precision: str, device: torch.device) -> torch.autocast:
    """The autocast region of ``--precision``: off for ``fp32``, else bfloat16 / float16.

    Parameters
    ----------
    precision : str
        ``fp32``, ``bf16`` or ``fp16``.
    device : torch.device
        The device whose autocast it is.

    Returns
    -------
    torch.autocast
        A context manager.
    """
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def make_grad_scaler(cfg: TrainConfig, device: torch.device) -> torch.amp.GradScaler:
    """A ``torch.amp.GradScaler`` for ``--precision fp16`` (CUDA or CPU), disabled otherwise.

    The loss is multiplied by the scale :math:`s` before the backward pass, so float16 gradients
    of small magnitude do not flush to zero; gradients are divided by :math:`s` again
    (``unscale_``) before clipping and the update. A step whose gradients overflow is skipped and
    :math:`s \\leftarrow s/2`; after 2000 steps in a row without overflow :math:`s \\leftarrow 2s`.
    bf16 has float32's exponent range and needs no scaler.

    Parameters
    ----------
    cfg : TrainConfig
        ``precision`` says whether the scaler is enabled.
    device : torch.device
        The training device.

    Returns
    -------
    torch.amp.GradScaler
        Enabled for ``fp16`` only (a disabled scaler passes the loss and gradients through).
    """
    return torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
