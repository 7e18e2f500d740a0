"""Poincaré, Euclidean and hybrid ResNets and their registry."""

from .registry import (
    DEPTHS,
    IMAGENET_DEPTHS,
    create_model,
    list_models,
    register_model,
    resolve_model_name,
)
from .resnet import (
    NORM_FREE,
    EuclideanLayers,
    EuclideanResNet,
    HybridResNet,
    PoincareBasicBlock,
    PoincareLayers,
    PoincareResNet,
    TangentMaxPool2d,
    blocks_per_stage,
)
from .resnet_imagenet import (
    EuclideanBottleneck,
    EuclideanImageNetResNet,
    HybridImageNetResNet,
    PoincareBottleneck,
    PoincareImageNetResNet,
)

__all__ = [
    "DEPTHS",
    "IMAGENET_DEPTHS",
    "NORM_FREE",
    "create_model",
    "list_models",
    "register_model",
    "resolve_model_name",
    "EuclideanBottleneck",
    "EuclideanImageNetResNet",
    "EuclideanLayers",
    "EuclideanResNet",
    "HybridImageNetResNet",
    "HybridResNet",
    "PoincareBasicBlock",
    "PoincareBottleneck",
    "PoincareImageNetResNet",
    "PoincareLayers",
    "PoincareResNet",
    "TangentMaxPool2d",
    "blocks_per_stage",
]
