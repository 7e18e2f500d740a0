"""CIFAR-style ResNets of depth 6n+2: Poincaré, Euclidean, and hybrid (Euclidean + Poincaré head).

All three share one topology (SPEC §7, §9): stem conv3×3 → BN → ReLU; three stages of ``n``
basic blocks with widths ``widths`` (the first block of stages 2 and 3 has stride 2 and a 1×1
stride-2 convolution on the shortcut); global average pooling; a fully connected head.

Every model exposes ``forward_features(x) -> [B, D]``, ``forward_head(f) -> logits`` and
``gradcam_layer`` (the last stage, whose output is the last feature map), which the evaluation
tools use.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..nn import (
    Curvature,
    PoincareBatchNorm2d,
    PoincareConv2d,
    PoincareGlobalAvgPool2d,
    PoincareLinear,
    PoincareResidual,
    TangentReLU,
)

NORMS = ("batch", "none")

#: The ``poincare_resnet*_nf`` models: no batch norm, residual branches scaled by 1/√blocks,
#: He-initialised centred conv weights, the paper's identity init for the head (see
#: :class:`PoincareResNet`).
NORM_FREE = {
    "norm": "none",
    "residual_scale": "auto",
    "init": "kaiming",
    "head_init": "identity",
    "center_weight": True,
}


def blocks_per_stage(depth: int) -> int:
    """``n`` for a depth ``6n + 2`` ResNet; raises ``ValueError`` otherwise."""
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(
            f"depth must be 6n+2 with n ≥ 1 (8, 14, 20, 32, 44, 56, 110, …), got {depth!r}"
        )
    return (depth - 2) // 6


def _make_stages(widths, n: int, block) -> list[nn.Sequential]:
    """Three stages of ``n`` blocks ``block(c_in, c_out, stride)``; the first block of stages 2
    and 3 has stride 2."""
    stages, cin = [], widths[0]
    for i, w in enumerate(widths):
        blocks = []
        for j in range(n):
            blocks.append(block(cin, w, 2 if (i > 0 and j == 0) else 1))
            cin = w
        stages.append(nn.Sequential(*blocks))
    return stages


def _check_widths(widths) -> tuple[int, int, int]:
    widths = tuple(int(w) for w in widths)
    if len(widths) != 3 or min(widths) < 1:
        raise ValueError(f"widths must be three positive channel counts, got {widths!r}")
    return widths


class _ResNetBase(nn.Module):
    """Shared plumbing: stages, pooling and the feature/head split."""

    stem: nn.Module
    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential
    pool: nn.Module
    fc: nn.Module

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"{type(self).__name__} expects images [B, {self.in_chans}, H, W], "
                f"got shape {tuple(x.shape)}"
            )

    def forward_feature_map(self, x: Tensor) -> Tensor:
        self._check_input(x)
        return self.layer3(self.layer2(self.layer1(self.stem(x))))

    def forward_features(self, x: Tensor) -> Tensor:
        return self.pool(self.forward_feature_map(x))

    def forward_head(self, f: Tensor) -> Tensor:
        return self.fc(f)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    @property
    def gradcam_layer(self) -> nn.Module:
        return self.layer3


# ------------------------------------------------------------------------------ Poincaré


class PoincareBasicBlock(nn.Module):
    """``ReLU((α ⊗ f) ⊕ res)`` with ``f = BN(conv(ReLU(BN(conv(x)))))``, all on tangent maps."""

    def __init__(self, cin: int, cout: int, stride: int, curvature: Curvature, opts: dict) -> None:
        super().__init__()
        conv = dict(c=curvature, init=opts["init"], bias=True, center_weight=opts["center_weight"])
        self.conv1 = PoincareConv2d(cin, cout, 3, stride=stride, padding=1, **conv)
        self.bn1 = opts["make_norm"](cout)
        self.relu = TangentReLU()
        self.conv2 = PoincareConv2d(cout, cout, 3, stride=1, padding=1, **conv)
        self.bn2 = opts["make_norm"](cout)
        self.shortcut = (
            PoincareConv2d(cin, cout, 1, stride=stride, **conv)
            if stride != 1 or cin != cout
            else nn.Identity()
        )
        self.residual = PoincareResidual(c=curvature, order=opts["residual_order"])
        scale = opts["residual_scale"]
        if scale == "learnable":
            self.alpha = nn.Parameter(torch.zeros(()))  # SkipInit
        else:
            self.alpha = None
            self.alpha_value = None if scale is None else float(scale)

    def forward(self, x: Tensor) -> Tensor:
        f = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        alpha = self.alpha if self.alpha is not None else self.alpha_value
        return self.relu(self.residual(f, self.shortcut(x), alpha))


class PoincareResNet(_ResNetBase):
    """Fully hyperbolic ResNet (van Spengler et al., ICCV 2023) of depth ``6n + 2``.

    Inputs are images in [−1, 1], read as tangent vectors at the origin along the channel axis;
    every layer works on the ball of curvature −c (``c = 0.1`` in the paper), passing tangent
    maps between layers (SPEC §5). The logits are ``logmap0`` of the Poincaré FC head's output.

    Options: ``init`` (``"identity"``, ``"center"``, ``"hnn"``, ``"kaiming"``), ``bn_mean``
    (``"midpoint"`` or ``"frechet"``), ``bn_eval_batch_stats`` (the paper's eval with batch
    statistics), ``residual_order`` (``"f+res"`` or ``"res+f"``), ``learnable_c`` (one
    curvature shared by all layers, stored as ``softplus⁻¹(c)``), ``pool`` (``"tangent"`` or
    ``"midpoint"``), ``norm="none"`` with ``residual_scale`` (``"auto"`` = 1/√(blocks),
    ``"learnable"`` = SkipInit-style α initialised at 0, or a float) for a normalisation-free
    network, ``center_weight`` (every conv's normals centred over their inputs, the centring
    half of weight standardisation) and ``head_init`` (the FC head's init; default ``init``).
    :data:`NORM_FREE` holds the options of the registered ``poincare_resnet*_nf`` models: with
    the paper's identity init and uncentred weights a norm-free network trains markedly slower
    (``docs/results/norm-free/``).
    """

    def __init__(
        self,
        depth: int = 20,
        widths: tuple[int, int, int] = (8, 16, 32),
        num_classes: int = 10,
        in_chans: int = 3,
        c: float = 0.1,
        learnable_c: bool = False,
        init: str = "identity",
        bn_mean: str = "midpoint",
        bn_eval_batch_stats: bool = False,
        bn_momentum: float | None = 0.1,
        residual_order: str = "f+res",
        pool: str = "tangent",
        norm: str = "batch",
        residual_scale: float | str | None = None,
        center_weight: bool = False,
        head_init: str | None = None,
    ) -> None:
        super().__init__()
        n = blocks_per_stage(depth)
        widths = _check_widths(widths)
        if norm not in NORMS:
            raise ValueError(f"unknown norm {norm!r}; choose one of {NORMS}")
        if residual_scale == "auto":
            residual_scale = 1.0 / math.sqrt(3 * n)
        if isinstance(residual_scale, str) and residual_scale != "learnable":
            raise ValueError(
                f"residual_scale must be a float, 'auto' or 'learnable', got {residual_scale!r}"
            )
        self.depth, self.widths, self.num_classes, self.in_chans = (
            depth,
            widths,
            num_classes,
            in_chans,
        )
        self.curvature = Curvature(c, learnable=learnable_c)
        cur = self.curvature

        def make_norm(ch: int) -> nn.Module:
            if norm == "none":
                return nn.Identity()
            return PoincareBatchNorm2d(
                ch, c=cur, mean=bn_mean, momentum=bn_momentum, eval_batch_stats=bn_eval_batch_stats
            )

        opts = dict(
            init=init,
            make_norm=make_norm,
            residual_order=residual_order,
            residual_scale=residual_scale,
            center_weight=center_weight,
        )
        self.stem = nn.Sequential(
            PoincareConv2d(
                in_chans, widths[0], 3, padding=1, c=cur, init=init, center_weight=center_weight
            ),
            make_norm(widths[0]),
            TangentReLU(),
        )
        self.layer1, self.layer2, self.layer3 = _make_stages(
            widths, n, lambda cin, w, stride: PoincareBasicBlock(cin, w, stride, cur, opts)
        )
        self.pool = PoincareGlobalAvgPool2d(pool, c=cur)
        self.fc = PoincareLinear(widths[2], num_classes, c=cur, init=head_init or init)


# ------------------------------------------------------------------------------ Euclidean


class EuclideanBasicBlock(nn.Module):
    """Standard basic block: ``ReLU(BN(conv(ReLU(BN(conv(x))))) + shortcut(x))``."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class _GlobalAvgPool(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mean((2, 3))


class EuclideanResNet(_ResNetBase):
    """Euclidean ResNet of depth ``6n + 2`` with the same topology as :class:`PoincareResNet`."""

    def __init__(
        self,
        depth: int = 20,
        widths: tuple[int, int, int] = (8, 16, 32),
        num_classes: int = 10,
        in_chans: int = 3,
        head: nn.Module | None = None,
    ) -> None:
        super().__init__()
        n = blocks_per_stage(depth)
        widths = _check_widths(widths)
        self.depth, self.widths, self.num_classes, self.in_chans = (
            depth,
            widths,
            num_classes,
            in_chans,
        )
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, widths[0], 3, 1, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        self.layer1, self.layer2, self.layer3 = _make_stages(widths, n, EuclideanBasicBlock)
        self.pool = _GlobalAvgPool()
        self.fc = head if head is not None else nn.Linear(widths[2], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class HybridResNet(EuclideanResNet):
    """Euclidean backbone with a Poincaré FC head (SPEC §9): the pooled features are read as
    tangent vectors at the origin of a ball with learnable curvature (initialised at ``c``)."""

    def __init__(
        self,
        depth: int = 20,
        widths: tuple[int, int, int] = (8, 16, 32),
        num_classes: int = 10,
        in_chans: int = 3,
        c: float = 1.0,
        learnable_c: bool = True,
        init: str = "identity",
    ) -> None:
        widths = _check_widths(widths)
        self_c = Curvature(c, learnable=learnable_c)
        head = PoincareLinear(widths[2], num_classes, c=self_c, init=init)
        super().__init__(depth, widths, num_classes, in_chans, head=head)
        self.curvature = self_c
