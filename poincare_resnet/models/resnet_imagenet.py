"""ResNet-18/34/50 (He et al. 2016's ImageNet topology): Poincaré, Euclidean and hybrid.

Four stages of widths ``64-128-256-512`` (``widths``); basic blocks for depths 18 and 34,
bottleneck blocks (expansion 4: a stage of width ``w`` outputs ``4w`` channels) for 50, 101 and
152; the first block of stages 2-4 has stride 2 (on its 3×3 conv) and a 1×1 projection
shortcut, as does any block whose channel count changes. Two stems:

* ``stem="cifar"`` (default, for 32×32 CIFAR and 64×64 Tiny-ImageNet): conv3×3 stride 1 → BN →
  ReLU, no pooling; the last feature map is ``H/8 × W/8``.
* ``stem="imagenet"``: conv7×7 stride 2 → BN → ReLU → max-pool 3×3 stride 2; ``H/32 × W/32``.

The Poincaré models use the layers of :mod:`poincare_resnet.models.resnet` (the Poincaré conv,
midpoint batch norm, tangent ReLU, Möbius residual; settings :class:`PoincareLayers`) and
:class:`PoincareBottleneck`; their max-pool is :class:`TangentMaxPool2d`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from ..nn import Curvature, conv_norm
from .resnet import (
    EuclideanBasicBlock,
    EuclideanLayers,
    HybridResNet,
    PoincareBasicBlock,
    PoincareLayers,
    _EuclideanNet,
    _PoincareBlock,
    _PoincareNet,
    _ResNetBase,
    build_hybrid_head,
    check_widths,
    make_stages,
)

#: depth → (block kind, blocks per stage)
ARCHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
STEMS = ("cifar", "imagenet")
WIDTHS = (64, 128, 256, 512)


def arch(depth: int) -> tuple[str, tuple[int, int, int, int]]:
    """(block kind, blocks per stage) of a ResNet-``depth``; raises ``ValueError`` otherwise."""
    if depth not in ARCHS:
        raise ValueError(f"depth must be one of {sorted(ARCHS)}, got {depth!r}")
    return ARCHS[depth]


def stem_geometry(stem: str) -> dict[str, Any]:
    """The stem's conv kernel, stride and whether a max-pool follows, for ``stem``."""
    if stem == "cifar":
        return {"kernel": 3, "stride": 1, "max_pool": False}
    if stem == "imagenet":
        return {"kernel": 7, "stride": 2, "max_pool": True}
    raise ValueError(f"unknown stem {stem!r}; choose one of {STEMS}")


class PoincareBottleneck(_PoincareBlock):
    """``ReLU((α ⊗ f) ⊕ res)`` with ``f = BN(conv1×1(ReLU(BN(conv3×3_s(ReLU(BN(conv1×1(x)))))))``.

    The bottleneck of ResNet-50 on tangent maps: a 1×1 Poincaré conv to the width ``w``, a 3×3
    Poincaré conv with the block's stride, a 1×1 Poincaré conv to ``4w``, each followed by
    Poincaré batch norm, with tangent ReLUs between; the shortcut is the identity or, when the
    shape changes, a 1×1 Poincaré conv with the stride (the Möbius addition needs both operands
    on the same ``4w``-dimensional ball; the Poincaré conv is the map between balls that the
    Euclidean projection shortcut is between vector spaces; no batch norm on it, as in the CIFAR
    Poincaré ResNet, SPEC §7).
    """

    expansion = 4

    def __init__(
        self,
        cin: int,
        width: int,
        stride: int,
        curvature: Curvature,
        layers: PoincareLayers,
        scale: float | str | None = None,
    ) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = layers.conv(cin, width, 1, curvature)
        self.bn1 = layers.norm_layer(width, curvature)
        self.conv2 = layers.conv(width, width, 3, curvature, stride=stride, padding=1)
        self.bn2 = layers.norm_layer(width, curvature)
        self.conv3 = layers.conv(width, cout, 1, curvature)
        self.bn3 = layers.norm_layer(cout, curvature)
        self._setup_residual(cin, cout, stride, curvature, layers, scale)

    def forward(self, x: Tensor) -> Tensor:
        f = self.relu(conv_norm(self.conv1, self.bn1, x))
        f = self.relu(conv_norm(self.conv2, self.bn2, f))
        return self._merge(conv_norm(self.conv3, self.bn3, f), x)


class EuclideanBottleneck(nn.Module):
    """torchvision's bottleneck (stride on the 3×3): ``ReLU(f + shortcut(x))``,
    ``f = BN(conv1×1(ReLU(BN(conv3×3_s(ReLU(BN(conv1×1(x))))))))``."""

    expansion = 4

    def __init__(
        self, cin: int, width: int, stride: int, layers: EuclideanLayers | None = None
    ) -> None:
        super().__init__()
        layers = layers or EuclideanLayers()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = layers.norm_layer(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = layers.norm_layer(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = layers.norm_layer(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = layers.shortcut(cin, cout, stride)

    def forward(self, x: Tensor) -> Tensor:
        f = self.relu(self.bn1(self.conv1(x)))
        f = self.bn3(self.conv3(self.relu(self.bn2(self.conv2(f)))))
        return self.relu(f + self.shortcut(x))


class _ImageNetTopology(_ResNetBase):
    """Depth, widths, stem and the stage layout shared by the three families."""

    num_stages = 4

    def _setup_topology(
        self, depth: int, widths, num_classes: int, in_chans: int, stem: str
    ) -> tuple[str, tuple[int, ...], dict[str, Any]]:
        kind, counts = arch(depth)
        geometry = stem_geometry(stem)
        self._set_topology(depth, widths, num_classes, in_chans)
        self.stem_kind = stem
        return kind, counts, geometry

    def _setup_stages(
        self, counts: tuple[int, ...], block: type[nn.Module], make_block: Callable
    ) -> int:
        """``layer1 … layer4`` of ``make_block(c_in, width, stride)`` blocks (``block``'s
        expansion); returns the channels of the last stage."""
        expansion = block.expansion
        stages = make_stages(self.widths, counts, make_block, expansion)
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        return self.widths[3] * expansion


class PoincareImageNetResNet(_ImageNetTopology, _PoincareNet):
    """Fully hyperbolic ResNet-18/34/50/101/152 (module docstring for the topology).

    Parameters
    ----------
    depth
        18, 34 (basic blocks), 50, 101, 152 (bottlenecks).
    widths
        The four stage widths (before the bottleneck expansion).
    num_classes, in_chans
        Classes and input channels.
    stem
        ``"cifar"`` (conv3×3, no pooling) or ``"imagenet"`` (conv7×7 stride 2 + tangent
        max-pool).
    c, learnable_c
        The curvature −c of the ball, one for all layers; learnable as ``softplus⁻¹(c)``.
    layers, **options
        :class:`PoincareLayers` (or a dict of its fields), flat fields on top
        (``init="kaiming"``, ``bn_eps=1e-3``, ``norm="none"``, ``residual_scale="auto"``, …).
    """

    layers_type = PoincareLayers

    def __init__(
        self,
        depth: int = 18,
        widths: tuple[int, int, int, int] = WIDTHS,
        num_classes: int = 10,
        in_chans: int = 3,
        stem: str = "cifar",
        c: float = 0.1,
        learnable_c: bool = False,
        layers: PoincareLayers | dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        kind, counts, geometry = self._setup_topology(depth, widths, num_classes, in_chans, stem)
        lay = self._setup_poincare(c, learnable_c, layers, options)
        cur, scale = self.curvature, lay.block_scale(sum(counts))
        block = PoincareBasicBlock if kind == "basic" else PoincareBottleneck
        self.stem = lay.stem(in_chans, self.widths[0], cur, **geometry)
        features = self._setup_stages(
            counts, block, lambda cin, w, s: block(cin, w, s, cur, lay, scale)
        )
        self._setup_head(features, num_classes)


class EuclideanImageNetResNet(_ImageNetTopology, _EuclideanNet):
    """Euclidean ResNet-18/34/50/101/152 of the same topology as
    :class:`PoincareImageNetResNet` (torchvision's, with the ``stem`` option);
    ``layers``/``**options``: :class:`EuclideanLayers`."""

    def __init__(
        self,
        depth: int = 18,
        widths: tuple[int, int, int, int] = WIDTHS,
        num_classes: int = 10,
        in_chans: int = 3,
        stem: str = "cifar",
        head: nn.Module | None = None,
        layers: EuclideanLayers | dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        super().__init__()
        kind, counts, geometry = self._setup_topology(depth, widths, num_classes, in_chans, stem)
        lay = self._setup_layers(layers, options)
        block = EuclideanBasicBlock if kind == "basic" else EuclideanBottleneck
        self.stem = lay.stem(in_chans, self.widths[0], **geometry)
        features = self._setup_stages(counts, block, lambda cin, w, s: block(cin, w, s, lay))
        self._setup_head(features, num_classes, head)


class HybridImageNetResNet(EuclideanImageNetResNet):
    """Euclidean ResNet-18/34/50 backbone with a Poincaré head (curvature −c, learnable,
    initialised at 1; ``hybrid_head`` ``"mlr"`` or the older, capped ``"fc"``), like
    :class:`~poincare_resnet.models.resnet.HybridResNet`."""

    config_defaults_when_absent = HybridResNet.config_defaults_when_absent

    def __init__(
        self,
        depth: int = 18,
        widths: tuple[int, int, int, int] = WIDTHS,
        num_classes: int = 10,
        in_chans: int = 3,
        stem: str = "cifar",
        c: float = 1.0,
        learnable_c: bool = True,
        hybrid_head: str = "mlr",
        init: str | None = None,
        layers: EuclideanLayers | dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        kind, _ = arch(depth)
        expansion = 1 if kind == "basic" else EuclideanBottleneck.expansion
        features = check_widths(widths, 4)[3] * expansion
        head, curvature = build_hybrid_head(
            features, num_classes, c, learnable_c, hybrid_head, init
        )
        super().__init__(depth, widths, num_classes, in_chans, stem, head, layers, **options)
        self.curvature = curvature
