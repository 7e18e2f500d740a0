"""Poincaré, Euclidean and hybrid ResNets and their registry."""

from .registry import DEPTHS, create_model, list_models, register_model, resolve_model_name
from .resnet import (
    EuclideanResNet,
    HybridResNet,
    PoincareBasicBlock,
    PoincareResNet,
    blocks_per_stage,
)

__all__ = [
    "DEPTHS",
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
