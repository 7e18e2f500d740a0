"""Model registry: ``create_model(name, num_classes=..., in_chans=..., **kwargs)`` and
``list_models(pattern)``, timm-style. The official code's names
(``hyperbolic-8-16-32-resnet-20``, ``euclidean-…``, ``euclideanwhypclass-…``) are accepted."""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable
from typing import Any

from torch import nn

from .resnet import NORM_FREE, EuclideanResNet, HybridResNet, PoincareResNet, blocks_per_stage

DEPTHS = (20, 32, 44, 56, 110)
_FAMILIES: dict[str, type[nn.Module]] = {
    "poincare": PoincareResNet,
    "euclidean": EuclideanResNet,
    "hybrid": HybridResNet,
}
_OFFICIAL = {"hyperbolic": "poincare", "euclidean": "euclidean", "euclideanwhypclass": "hybrid"}
_OFFICIAL_RE = re.compile(
    r"^(hyperbolic|euclidean|euclideanwhypclass)-(\d+)-(\d+)-(\d+)-resnet-(\d+)$"
)

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_DEFAULTS: dict[str, dict[str, Any]] = {}


def register_model(name: str, cls: type[nn.Module], **defaults: Any) -> None:
    """Register ``name`` as ``cls(**defaults, **kwargs)``."""
    _REGISTRY[name] = cls
    _DEFAULTS[name] = defaults


for _family, _cls in _FAMILIES.items():
    for _depth in DEPTHS:
        register_model(f"{_family}_resnet{_depth}", _cls, depth=_depth)
        register_model(f"{_family}_resnet{_depth}_w16", _cls, depth=_depth, widths=(16, 32, 64))
for _depth in DEPTHS:
    register_model(f"poincare_resnet{_depth}_nf", PoincareResNet, depth=_depth, **NORM_FREE)


def list_models(pattern: str | None = None) -> list[str]:
    """Registered names, optionally filtered by a shell pattern (e.g. ``"*resnet20*"``)."""
    names = sorted(_REGISTRY)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def resolve_model_name(name: str) -> tuple[str, dict[str, Any]]:
    """Map ``name`` (registered or official) to (registered name, extra kwargs)."""
    if name in _REGISTRY:
        return name, {}
    m = _OFFICIAL_RE.match(name)
    if m:
        family = _OFFICIAL[m.group(1)]
        widths = (int(m.group(2)), int(m.group(3)), int(m.group(4)))
        depth = int(m.group(5))
        blocks_per_stage(depth)  # raises for a depth that is not 6n+2
        base = f"{family}_resnet{depth}"
        if base in _REGISTRY:
            return base, {"widths": widths}
        return f"{family}_resnet20", {"depth": depth, "widths": widths}
    close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.5)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown model {name!r}{hint} (see `poincare-resnet models`)")


def create_model(name: str, num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """Build a registered model. The resolved name and arguments are kept on the model as
    ``model.model_name`` and ``model.model_kwargs`` (checkpoints use them to rebuild it)."""
    base, extra = resolve_model_name(name)
    args = {**_DEFAULTS[base], **extra, **kwargs, "num_classes": num_classes, "in_chans": in_chans}
    model = _REGISTRY[base](**args)
    model.model_name = base
    # what to pass to create_model(base, ...) to rebuild it: the name's own defaults are implied
    model.model_kwargs = {
        k: (list(v) if isinstance(v, tuple) else v) for k, v in {**extra, **kwargs}.items()
    }
    model.model_kwargs.update(num_classes=num_classes, in_chans=in_chans)
    return model
