"""CIFAR-style ResNets of depth 6n+2: Poincaré, Euclidean, and hybrid (Euclidean + Poincaré head).

All three share one topology (SPEC §7, §9): stem conv3×3 → BN → ReLU; three stages of ``n``
basic blocks with widths ``widths`` (the first block of stages 2 and 3 has stride 2 and a 1×1
stride-2 convolution on the shortcut); global average pooling; a fully connected head.

Every model exposes ``forward_features(x) -> [B, D]``, ``forward_head(f) -> logits`` and
``gradcam_layer`` (the last stage, whose output is the last feature map), which the evaluation
tools use.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor, nn

from ..nn import (
    Curvature,
    PoincareBatchNorm2d,
    PoincareConv2d,
    PoincareGlobalAvgPool2d,
    PoincareLinear,
    PoincareMLR,
    PoincareResidual,
    TangentReLU,
    conv_norm,
)

NORMS = ("batch", "none")

#: The ``poincare_resnet*_nf`` models: no batch norm, residual branches scaled by 1/√blocks,
#: He-initialised centred conv weights, the paper's identity init for the head (see
#: :class:`PoincareLayers`).
NORM_FREE = {
    "norm": "none",
    "residual_scale": "auto",
    "init": "kaiming",
    "head_init": "identity",
    "center_weight": True,
}

L = TypeVar("L")


def blocks_per_stage(depth: int) -> int:
    """``n`` for a depth ``6n + 2`` ResNet; raises ``ValueError`` otherwise."""
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(
            f"depth must be 6n+2 with n ≥ 1 (8, 14, 20, 32, 44, 56, 110, …), got {depth!r}"
        )
    return (depth - 2) // 6


def make_stages(
    widths: Sequence[int],
    counts: Sequence[int],
    block: Callable[[int, int, int], nn.Module],
    expansion: int = 1,
) -> list[nn.Sequential]:
    """One stage of ``counts[i]`` blocks ``block(c_in, widths[i], stride)`` per width; the first
    block of every stage but the first has stride 2. A block outputs ``expansion · width``
    channels (4 for bottlenecks)."""
    stages, cin = [], widths[0]
    for i, (w, n) in enumerate(zip(widths, counts, strict=True)):
        blocks = []
        for j in range(n):
            blocks.append(block(cin, w, 2 if (i > 0 and j == 0) else 1))
            cin = w * expansion
        stages.append(nn.Sequential(*blocks))
    return stages


def check_widths(widths: Sequence[int], stages: int = 3) -> tuple[int, ...]:
    """``widths`` as a tuple of ``stages`` positive ints; raises ``ValueError`` otherwise."""
    widths = tuple(int(w) for w in widths)
    if len(widths) != stages or min(widths) < 1:
        count = {3: "three", 4: "four"}.get(stages, str(stages))
        raise ValueError(f"widths must be {count} positive channel counts, got {widths!r}")
    return widths


def as_layers(kind: type[L], layers: L | dict[str, Any] | None, options: dict[str, Any]) -> L:
    """The layer settings ``kind`` from ``layers`` (an instance, a dict of its fields or
    ``None`` for the defaults) with the flat ``options`` (field names) on top.

    Raises ``ValueError`` naming an unknown field, listing the valid ones.
    """
    names = [f.name for f in dataclasses.fields(kind)]
    given = dict(layers) if isinstance(layers, dict) else {}
    unknown = [k for k in [*given, *options] if k not in names]
    if unknown:
        raise ValueError(
            f"unknown layer option(s) {', '.join(map(repr, unknown))} for {kind.__name__}; "
            f"valid: {', '.join(names)}"
        )
    if layers is not None and not isinstance(layers, dict | kind):
        raise ValueError(f"layers must be a {kind.__name__} or a dict, got {layers!r}")
    base = layers if isinstance(layers, kind) else kind(**given)
    return dataclasses.replace(base, **options)


class _ResNetBase(nn.Module):
    """Shared plumbing: stem, stages ``layer1 … layer{num_stages}``, pooling, the head."""

    num_stages = 3
    stem: nn.Module
    pool: nn.Module
    fc: nn.Module

    def _set_topology(
        self, depth: int, widths: Sequence[int], num_classes: int, in_chans: int
    ) -> None:
        """Record the topology; ``widths`` checked as ``num_stages`` positive ints."""
        self.depth, self.widths = depth, check_widths(widths, self.num_stages)
        self.num_classes, self.in_chans = num_classes, in_chans

    def _check_input(self, x: Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_chans:
            raise ValueError(
                f"{type(self).__name__} expects images [B, {self.in_chans}, H, W], "
                f"got shape {tuple(x.shape)}"
            )

    def forward_feature_map(self, x: Tensor) -> Tensor:
        self._check_input(x)
        x = self.stem(x)
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return x

    def forward_features(self, x: Tensor) -> Tensor:
        return self.pool(self.forward_feature_map(x))

    def forward_head(self, f: Tensor) -> Tensor:
        return self.fc(f)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))

    @property
    def gradcam_layer(self) -> nn.Module:
        """The last stage, whose output is the last spatial feature map."""
        return getattr(self, f"layer{self.num_stages}")


# ------------------------------------------------------------------------------ Poincaré


@dataclass(frozen=True)
class PoincareLayers:
    """Settings of the layers inside a Poincaré ResNet (every family, every depth).

    Given to a model as ``layers=PoincareLayers(...)``, as ``layers={"bn_eps": 1e-3}`` (e.g.
    ``--model-kwargs 'layers={"bn_eps": 1e-3}'``) or field by field as flat options
    (``init="center"``, ``bn_eps=1e-3``), which override ``layers``.

    Parameters
    ----------
    init, center_weight
        Every conv's initialisation (``"identity"``, ``"center"``, ``"hnn"``, ``"kaiming"``,
        ``"identity-compensated"``: one of :data:`~poincare_resnet.nn.INITS`) and whether its
        normals are centred over their inputs (the centring half of weight standardisation).
    head_init
        The FC head's init (default ``init``).
    norm
        ``"batch"`` (Poincaré midpoint batch norm) or ``"none"`` (normalisation-free).
    bn_mean, bn_momentum, bn_eps, bn_track_running_stats, bn_eval_batch_stats
        :class:`~poincare_resnet.nn.PoincareBatchNorm2d`'s ``mean`` (``"midpoint"`` or
        ``"frechet"``), ``momentum``, ``eps``, ``track_running_stats`` and
        ``eval_batch_stats`` (the paper's eval with batch statistics).
    residual_order
        ``"f+res"`` (the paper's ``f ⊕ res``) or ``"res+f"``.
    residual_scale
        α of ``(α ⊗ f) ⊕ res``: ``None`` (1), a float, ``"auto"`` (1/√blocks) or
        ``"learnable"`` (SkipInit-style α initialised at 0).
    pool
        Global pooling: ``"tangent"`` (the paper's mean of tangent vectors) or ``"midpoint"``.
    """

    init: str = "identity"
    center_weight: bool = False
    head_init: str | None = None
    norm: str = "batch"
    bn_mean: str = "midpoint"
    bn_momentum: float | None = 0.1
    bn_eps: float = 1e-5
    bn_track_running_stats: bool = True
    bn_eval_batch_stats: bool = False
    residual_order: str = "f+res"
    residual_scale: float | str | None = None
    pool: str = "tangent"

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"unknown norm {self.norm!r}; choose one of {NORMS}")
        scale = self.residual_scale
        if isinstance(scale, str) and scale not in ("auto", "learnable"):
            raise ValueError(
                f"residual_scale must be a float, 'auto' or 'learnable', got {scale!r}"
            )

    def conv(
        self, cin: int, cout: int, k: int, cur: Curvature, stride: int = 1, padding: int = 0
    ) -> PoincareConv2d:
        """A ``k×k`` Poincaré conv with these settings (bias on)."""
        return PoincareConv2d(
            cin,
            cout,
            k,
            stride=stride,
            padding=padding,
            bias=True,
            c=cur,
            init=self.init,
            center_weight=self.center_weight,
        )

    def norm_layer(self, ch: int, cur: Curvature) -> nn.Module:
        """Poincaré batch norm over ``ch`` channels (``nn.Identity`` for ``norm="none"``)."""
        if self.norm == "none":
            return nn.Identity()
        return PoincareBatchNorm2d(
            ch,
            c=cur,
            mean=self.bn_mean,
            momentum=self.bn_momentum,
            eps=self.bn_eps,
            track_running_stats=self.bn_track_running_stats,
            eval_batch_stats=self.bn_eval_batch_stats,
        )

    def block_scale(self, num_blocks: int) -> float | str | None:
        """``residual_scale`` with ``"auto"`` resolved to ``1/√num_blocks``."""
        if self.residual_scale == "auto":
            return 1.0 / math.sqrt(num_blocks)
        return self.residual_scale

    def stem(
        self,
        in_chans: int,
        width: int,
        cur: Curvature,
        kernel: int = 3,
        stride: int = 1,
        max_pool: bool = False,
    ) -> nn.Sequential:
        """conv ``kernel×kernel`` (stride) → BN → ReLU [→ tangent max-pool 3×3 stride 2]."""
        parts = [
            self.conv(in_chans, width, kernel, cur, stride=stride, padding=kernel // 2),
            self.norm_layer(width, cur),
            TangentReLU(),
        ]
        if max_pool:
            parts.append(TangentMaxPool2d(3, stride=2, padding=1))
        return PoincareStem(*parts)

    def head(self, features: int, num_classes: int, cur: Curvature) -> tuple[nn.Module, nn.Module]:
        """Global pooling and the Poincaré FC head."""
        return (
            PoincareGlobalAvgPool2d(self.pool, c=cur),
            PoincareLinear(features, num_classes, c=cur, init=self.head_init or self.init),
        )


class PoincareStem(nn.Sequential):
    """``conv → BN → ReLU [→ max-pool]`` as an ``nn.Sequential`` (same parameter names), with
    the conv → BN pair run by :func:`~poincare_resnet.nn.conv_norm` (the FC output is recomputed
    in BN's backward rather than kept)."""

    def forward(self, x: Tensor) -> Tensor:
        x = conv_norm(self[0], self[1], x)
        for layer in list(self)[2:]:
            x = layer(x)
        return x


class TangentMaxPool2d(nn.MaxPool2d):
    """Max-pool of a tangent map at the origin, coordinate by coordinate (``nn.MaxPool2d``).

    Any vector of ``R^C`` is the tangent of a ball point (``expmap0`` maps ``R^C`` onto the
    ball), so the pooled map is again a valid map of ball points; like :class:`TangentReLU` it
    is a coordinate-wise operation in the tangent space at the origin, which is the map the
    layers pass between them (SPEC §5). Padding is ``−∞`` and is never selected.
    """


class _PoincareBlock(nn.Module):
    """The residual half of a Poincaré block: shortcut (identity, or a 1×1 Poincaré conv with
    the block's stride when the shape changes), α and ``ReLU((α ⊗ f) ⊕ shortcut(x))``."""

    relu: nn.Module

    def _setup_residual(
        self,
        cin: int,
        cout: int,
        stride: int,
        cur: Curvature,
        layers: PoincareLayers,
        scale: float | str | None,
    ) -> None:
        self.relu = TangentReLU()
        self.shortcut = (
            layers.conv(cin, cout, 1, cur, stride=stride)
            if stride != 1 or cin != cout
            else nn.Identity()
        )
        self.residual = PoincareResidual(c=cur, order=layers.residual_order)
        if scale == "learnable":
            self.alpha = nn.Parameter(torch.zeros(()))  # SkipInit
        else:
            self.alpha = None
            self.alpha_value = None if scale is None else float(scale)

    def _merge(self, f: Tensor, x: Tensor) -> Tensor:
        alpha = self.alpha if self.alpha is not None else self.alpha_value
        return self.relu(self.residual(f, self.shortcut(x), alpha))


class PoincareBasicBlock(_PoincareBlock):
    """``ReLU((α ⊗ f) ⊕ res)`` with ``f = BN(conv(ReLU(BN(conv(x)))))``, all on tangent maps."""

    expansion = 1

    def __init__(
        self,
        cin: int,
        cout: int,
        stride: int,
        curvature: Curvature,
        layers: PoincareLayers,
        scale: float | str | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = layers.conv(cin, cout, 3, curvature, stride=stride, padding=1)
        self.bn1 = layers.norm_layer(cout, curvature)
        self.conv2 = layers.conv(cout, cout, 3, curvature, padding=1)
        self.bn2 = layers.norm_layer(cout, curvature)
        self._setup_residual(cin, cout, stride, curvature, layers, scale)

    def forward(self, x: Tensor) -> Tensor:
        f = conv_norm(self.conv2, self.bn2, self.relu(conv_norm(self.conv1, self.bn1, x)))
        return self._merge(f, x)


class _PoincareNet(_ResNetBase):
    """Curvature, layer settings and head of the Poincaré ResNets."""

    def _setup_poincare(
        self,
        c: float,
        learnable_c: bool,
        layers: PoincareLayers | dict | None,
        options: dict[str, Any],
    ) -> PoincareLayers:
        self.layers = as_layers(PoincareLayers, layers, options)
        self.curvature = Curvature(c, learnable=learnable_c)
        return self.layers

    def _setup_head(self, features: int, num_classes: int) -> None:
        self.pool, self.fc = self.layers.head(features, num_classes, self.curvature)


class PoincareResNet(_PoincareNet):
    """Fully hyperbolic ResNet (van Spengler et al., ICCV 2023) of depth ``6n + 2``.

    Stem conv3×3 → BN → ReLU; three stages of ``n`` basic blocks with widths ``widths`` (the
    first block of stages 2 and 3 has stride 2 and a 1×1 stride-2 Poincaré conv on the
    shortcut); tangent average pooling; a Poincaré FC head.

    Inputs are images in [−1, 1], read as tangent vectors at the origin along the channel axis;
    every layer works on the ball of curvature −c (``c = 0.1`` in the paper), passing tangent
    maps between layers (SPEC §5). The logits are ``logmap0`` of the Poincaré FC head's output.

    Parameters
    ----------
    depth, widths, num_classes, in_chans
        The topology: depth ``6n + 2``, three stage widths, classes, input channels.
    c, learnable_c
        The ball's curvature −c, one shared by all layers; learnable: stored as
        ``softplus⁻¹(c)``.
    layers
        :class:`PoincareLayers` (or a dict of its fields): the layer settings.
    **options
        :class:`PoincareLayers` fields given flat (``init="center"``, ``bn_mean="frechet"``,
        ``norm="none"``, …); they override ``layers``. :data:`NORM_FREE` holds those of the
        registered ``poincare_resnet*_nf`` models: with the paper's identity init and uncentred
        weights a norm-free network trains markedly slower (``docs/results/norm-free/``).
    """

    layers_type = PoincareLayers

    def __init__(
        self,
        depth: int = 20,
        widths: tuple[int, int, int] = (8, 16, 32),
        num_classes: int = 10,
        in_chans: int = 3,
        c: float = 0.1,
        learnable_c: bool = False,
        layers: PoincareLayers | dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        n = blocks_per_stage(depth)
        self._set_topology(depth, widths, num_classes, in_chans)
        widths = self.widths
        lay = self._setup_poincare(c, learnable_c, layers, options)
        cur, scale = self.curvature, lay.block_scale(3 * n)
        self.stem = lay.stem(in_chans, widths[0], cur)
        self.layer1, self.layer2, self.layer3 = make_stages(
            widths, (n,) * 3, lambda cin, w, s: PoincareBasicBlock(cin, w, s, cur, lay, scale)
        )
        self._setup_head(widths[2], num_classes)


# ------------------------------------------------------------------------------ Euclidean


@dataclass(frozen=True)
class EuclideanLayers:
    """Settings of the layers inside a Euclidean (or hybrid) ResNet: ``nn.BatchNorm2d``'s
    ``momentum``, ``eps`` and ``track_running_stats``. Given as ``layers=`` (instance or dict)
    or as flat options, like :class:`PoincareLayers`."""

    bn_momentum: float | None = 0.1
    bn_eps: float = 1e-5
    bn_track_running_stats: bool = True

    def norm_layer(self, ch: int) -> nn.BatchNorm2d:
        return nn.BatchNorm2d(
            ch,
            eps=self.bn_eps,
            momentum=self.bn_momentum,
            track_running_stats=self.bn_track_running_stats,
        )

    def stem(
        self, in_chans: int, width: int, kernel: int = 3, stride: int = 1, max_pool: bool = False
    ) -> nn.Sequential:
        """conv ``kernel×kernel`` (stride) → BN → ReLU [→ max-pool 3×3 stride 2]."""
        parts = [
            nn.Conv2d(in_chans, width, kernel, stride, kernel // 2, bias=False),
            self.norm_layer(width),
            nn.ReLU(inplace=True),
        ]
        if max_pool:
            parts.append(nn.MaxPool2d(3, stride=2, padding=1))
        return nn.Sequential(*parts)

    def shortcut(self, cin: int, cout: int, stride: int) -> nn.Module:
        """1×1 conv + BN when the shape changes, else the identity."""
        if stride == 1 and cin == cout:
            return nn.Identity()
        return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), self.norm_layer(cout))


class EuclideanBasicBlock(nn.Module):
    """Standard basic block: ``ReLU(BN(conv(ReLU(BN(conv(x))))) + shortcut(x))``."""

    expansion = 1

    def __init__(
        self, cin: int, cout: int, stride: int, layers: EuclideanLayers | None = None
    ) -> None:
        super().__init__()
        layers = layers or EuclideanLayers()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = layers.norm_layer(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = layers.norm_layer(cout)
        self.shortcut = layers.shortcut(cin, cout, stride)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class _GlobalAvgPool(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mean((2, 3))


class _EuclideanNet(_ResNetBase):
    """Layer settings, head and He init of the Euclidean and hybrid ResNets."""

    layers_type = EuclideanLayers

    def _setup_layers(
        self, layers: EuclideanLayers | dict | None, options: dict[str, Any]
    ) -> EuclideanLayers:
        self.layers = as_layers(EuclideanLayers, layers, options)
        return self.layers

    def _setup_head(self, features: int, num_classes: int, head: nn.Module | None) -> None:
        self.pool = _GlobalAvgPool()
        self.fc = head if head is not None else nn.Linear(features, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class EuclideanResNet(_EuclideanNet):
    """Euclidean ResNet of depth ``6n + 2`` with the same topology as :class:`PoincareResNet`;
    ``layers``/``**options``: :class:`EuclideanLayers`."""

    def __init__(
        self,
        depth: int = 20,
        widths: tuple[int, int, int] = (8, 16, 32),
        num_classes: int = 10,
        in_chans: int = 3,
        head: nn.Module | None = None,
        layers: EuclideanLayers | dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        n = blocks_per_stage(depth)
        self._set_topology(depth, widths, num_classes, in_chans)
        widths = self.widths
        lay = self._setup_layers(layers, options)
        self.stem = lay.stem(in_chans, widths[0])
        self.layer1, self.layer2, self.layer3 = make_stages(
            widths, (n,) * 3, lambda cin, w, s: EuclideanBasicBlock(cin, w, s, lay)
        )
        self._setup_head(widths[2], num_classes, head)


#: The hybrid models' heads (``hybrid_head``): ``"mlr"``, the HNN++ multinomial logistic
#: regression (logits = signed hyperplane distances, :class:`~poincare_resnet.nn.PoincareMLR`),
#: and ``"fc"``, a Poincaré FC layer whose output tangent is the logits (their norm is capped).
HYBRID_HEADS = ("mlr", "fc")


def build_hybrid_head(
    features: int,
    num_classes: int,
    c: float,
    learnable_c: bool,
    kind: str = "mlr",
    init: str | None = None,
) -> tuple[nn.Module, Curvature]:
    """The hybrid models' Poincaré head and its curvature (SPEC §9): the pooled Euclidean
    features ``f`` are read as tangent vectors at the origin of a ball of curvature −c.

    ``kind="mlr"``: logits ``v_k(expmap0(f))``, the signed hyperplane distances of HNN++'s MLR
    (:class:`~poincare_resnet.nn.PoincareMLR`),
    ``v_k(x) = (2‖z_k‖/√c) asinh(√c λ_x ⟨x, ẑ_k⟩ cosh(2√c r_k) − (λ_x − 1) sinh(2√c r_k))``;
    they grow with ``‖z_k‖``, so the softmax can approach 1. ``kind="fc"`` (the models before
    this option): logits ``logmap0(FC(expmap0(f)))`` of a :class:`PoincareLinear`, whose norm
    the ball's clip bounds by ``artanh(1 − ε)/√c`` (≈ 3.11 at c = 1 in float32): the best
    softmax is then ``1/(1 + (K − 1) exp(−R √(K/(K − 1))))``, ≈ 0.75 for K = 10 and ≈ 0.19 for
    K = 100.

    Parameters
    ----------
    features, num_classes : int
        The pooled features ``D`` and the classes ``K``.
    c, learnable_c
        The curvature −c of the head's ball (learnable: stored as ``softplus⁻¹(c)``).
    kind : str
        One of :data:`HYBRID_HEADS`.
    init : str, optional
        The ``"fc"`` head's init (default ``"identity"``); the MLR head has its own (normal
        weights of std ``(2DK)^{-1/2}``, zero offsets) and takes none.

    Returns
    -------
    tuple
        ``(head, curvature)``; the head holds the curvature module.

    Shapes
    ------
    The head maps ``[B, D]`` → ``[B, K]``.
    """
    if kind not in HYBRID_HEADS:
        raise ValueError(f"unknown hybrid_head {kind!r}; choose one of {HYBRID_HEADS}")
    if kind == "mlr" and init is not None:
        raise ValueError(
            f"init={init!r} is the FC head's (hybrid_head='fc'); the MLR head has its own init"
        )
    curvature = Curvature(c, learnable=learnable_c)
    if kind == "mlr":
        return PoincareMLR(features, num_classes, c=curvature), curvature
    head = PoincareLinear(features, num_classes, c=curvature, init=init or "identity")
    return head, curvature


class HybridResNet(EuclideanResNet):
    """Euclidean backbone with a Poincaré head (SPEC §9): the pooled features are read as
    tangent vectors at the origin of a ball with learnable curvature (initialised at ``c``);
    ``hybrid_head`` chooses the head (:func:`build_hybrid_head`: ``"mlr"``, uncapped hyperplane
    distances; ``"fc"``, the capped FC head of the models before this option, which a config
    without the key rebuilds: :attr:`config_defaults_when_absent`)."""

    #: the value a stored model config without the key was built with (the option is newer)
    config_defaults_when_absent = {"hybrid_head": "fc"}

    def __init__(
        self,
        depth: int = 20,
        widths: tuple[int, int, int] = (8, 16, 32),
        num_classes: int = 10,
        in_chans: int = 3,
        c: float = 1.0,
        learnable_c: bool = True,
        hybrid_head: str = "mlr",
        init: str | None = None,
        layers: EuclideanLayers | dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        widths = check_widths(widths)
        head, curvature = build_hybrid_head(
            widths[2], num_classes, c, learnable_c, hybrid_head, init
        )
        super().__init__(depth, widths, num_classes, in_chans, head, layers, **options)
        self.curvature = curvature
