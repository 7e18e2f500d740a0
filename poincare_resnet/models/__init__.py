"""Poincaré, Euclidean and hybrid ResNets and their registry."""

from .registry import DEPTHS, create_model, list_models, register_model, resolve_model_name
from .resnet import (
    NORM_FREE,
    EuclideanResNet,
    HybridResNet,
    PoincareBasicBlock,
    PoincareResNet,
    blocks_per_stage,
)

__all__ = [
    "DEPTHS",
    "NORM_FREE",
    "create_model",
    "list_models",
    "register_model",
    "resolve_model_name",
    "EuclideanResNet",
    "HybridResNet",
    "PoincareBasicBlock",
    "PoincareResNet",
    "blocks_per_stage",
]
