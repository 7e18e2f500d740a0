"""Model registry: ``create_model(name, num_classes=..., in_chans=..., **kwargs)`` and
``list_models(pattern)``, timm-style. The official code's names
(``hyperbolic-8-16-32-resnet-20``, ``euclidean-…``, ``euclideanwhypclass-…``) are accepted."""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import inspect
import re
import warnings
from collections.abc import Callable
from typing import Any

from torch import nn

from .resnet import (
    NORM_FREE,
    EuclideanResNet,
    HybridResNet,
    PoincareResNet,
    as_layers,
    blocks_per_stage,
)
from .resnet_imagenet import EuclideanImageNetResNet, HybridImageNetResNet, PoincareImageNetResNet

DEPTHS = (20, 32, 44, 56, 110)
#: the registered depths of the ImageNet-topology ResNets (widths 64-128-256-512)
IMAGENET_DEPTHS = (18, 34, 50)
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
_IMAGENET_FAMILIES: dict[str, type[nn.Module]] = {
    "poincare": PoincareImageNetResNet,
    "euclidean": EuclideanImageNetResNet,
    "hybrid": HybridImageNetResNet,
}
for _family, _cls in _IMAGENET_FAMILIES.items():
    for _depth in IMAGENET_DEPTHS:
        register_model(f"{_family}_resnet{_depth}", _cls, depth=_depth)


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


# set by create_model: the two arguments every constructor takes from the dataset
_DATA_ARGS = ("num_classes", "in_chans")


def _constructor_params(cls: type[nn.Module]) -> dict[str, inspect.Parameter]:
    """The keyword arguments of ``cls.__init__`` (``self`` and ``*args``/``**kw`` left out)."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    params = inspect.signature(cls.__init__).parameters
    return {k: p for k, p in list(params.items())[1:] if p.kind in kinds}


def _layer_fields(cls: type[nn.Module]) -> tuple[str, ...]:
    """The fields of ``cls.layers_type`` (its layer settings, e.g. ``PoincareLayers``), which
    the constructor also takes flat; ``()`` for a model without one."""
    kind = getattr(cls, "layers_type", None)
    return tuple(f.name for f in dataclasses.fields(kind)) if kind is not None else ()


def _options(cls: type[nn.Module]) -> tuple[str, ...]:
    """Every keyword ``cls`` takes: its constructor's arguments and its flat layer fields."""
    return (*_constructor_params(cls), *_layer_fields(cls))


def model_options(name: str) -> tuple[str, ...]:
    """The option names ``--model-kwargs`` accepts for model ``name`` (its constructor's
    arguments and layer settings, less ``num_classes`` and ``in_chans``, which come from the
    dataset)."""
    base, _ = resolve_model_name(name)
    return tuple(k for k in _options(_REGISTRY[base]) if k not in _DATA_ARGS)


def check_model_kwargs(name: str, kwargs: dict[str, Any]) -> None:
    """Raise ``ValueError`` for an unknown model ``name`` or an option its constructor lacks,
    listing the valid ones."""
    valid = model_options(name)
    if not isinstance(kwargs, dict):
        raise ValueError(f"model options must be a dict of KEY=VALUE, got {kwargs!r}")
    given = [k for k in kwargs if k in _DATA_ARGS]
    if given:
        raise ValueError(
            f"model option(s) {', '.join(given)} come from the dataset and cannot be set; "
            f"valid options of {name}: {', '.join(valid)}"
        )
    unknown = [k for k in kwargs if k not in valid]
    if unknown:
        raise ValueError(
            f"unknown model option(s) {', '.join(map(repr, unknown))} for {name}; "
            f"valid options: {', '.join(valid)}"
        )


def _jsonable(value: Any) -> Any:
    """Tuples → lists, recursively (what ``json`` would store)."""
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def _build(base: str, args: dict[str, Any]) -> nn.Module:
    """``cls(**args)``; a bad option value is a ``ValueError`` naming the model."""
    try:
        return _REGISTRY[base](**args)
    except (TypeError, OverflowError) as exc:
        raise ValueError(f"invalid options for model {base}: {exc}") from exc


def resolved_config(base: str, args: dict[str, Any]) -> dict[str, Any]:
    """Every constructor argument of registered model ``base`` called with ``args``: the
    constructor's signature defaults, overridden by ``args`` (registry defaults + user kwargs),
    as JSON-able values. ``build_from_config(base, resolved_config(base, args))`` rebuilds the
    same network whatever the registry's defaults later become."""
    cls = _REGISTRY[base]
    params = _constructor_params(cls)
    config = {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty}
    config.update(args)
    fields = _layer_fields(cls)
    if fields:  # the layer settings, flat and complete: one key per field, no ``layers``
        flat = {k: config.pop(k) for k in fields if k in config}
        config.update(dataclasses.asdict(as_layers(cls.layers_type, config.pop("layers"), flat)))
    return {k: _jsonable(v) for k, v in config.items()}


def create_model(name: str, num_classes: int = 10, in_chans: int = 3, **kwargs: Any) -> nn.Module:
    """Build a registered model. The resolved name and arguments are kept on the model as
    ``model.model_name``, ``model.model_kwargs`` (the options given) and ``model.model_config``
    (every constructor argument after the registry's defaults; checkpoints rebuild from it).

    Raises ``ValueError`` for an unknown name or option (listing the valid ones) and for an
    option value the constructor rejects.
    """
    base, extra = resolve_model_name(name)
    check_model_kwargs(name, kwargs)
    args = {**_DEFAULTS[base], **extra, **kwargs, "num_classes": num_classes, "in_chans": in_chans}
    model = _build(base, args)
    model.model_name = base
    # what to pass to create_model(base, ...) to rebuild it: the name's own defaults are implied
    model.model_kwargs = {k: _jsonable(v) for k, v in {**extra, **kwargs}.items()}
    model.model_kwargs.update(num_classes=num_classes, in_chans=in_chans)
    model.model_config = resolved_config(base, args)
    return model


def build_from_config(name: str, config: dict[str, Any]) -> nn.Module:
    """Rebuild model ``name`` from a resolved ``config`` (:func:`resolved_config`), ignoring
    today's registry defaults: the constructor gets exactly ``config``. An argument the
    constructor has gained since is left at its signature default, with a warning.

    Raises ``ValueError`` for an unknown name, a key the constructor does not take, or a
    value it rejects.
    """
    if name not in _REGISTRY:
        resolve_model_name(name)  # raises, suggesting close names
        raise ValueError(f"model {name!r} is not a registered name; cannot rebuild it")
    if not isinstance(config, dict):
        raise ValueError(f"model config of {name} must be a dict, got {type(config).__name__}")
    cls = _REGISTRY[name]
    valid = _options(cls)
    unknown = [k for k in config if k not in valid]
    if unknown:
        raise ValueError(
            f"model config of {name} has argument(s) {', '.join(map(repr, unknown))} that "
            f"{cls.__name__} does not take (valid: {', '.join(valid)})"
        )
    given = {*config, *(config.get("layers") or {})}
    implied = {k: v for k, v in defaults_when_absent(name).items() if k not in given}
    new = [k for k in valid if k not in given and k != "layers" and k not in implied]
    if new:
        warnings.warn(
            f"model config of {name} lacks argument(s) {', '.join(new)} (added to "
            f"{cls.__name__} since); using their defaults",
            stacklevel=2,
        )
    if implied:
        warnings.warn(
            f"model config of {name} lacks argument(s) {', '.join(implied)} (added to "
            f"{cls.__name__} since); using what a config without them was built with: "
            + ", ".join(f"{k}={v!r}" for k, v in implied.items()),
            stacklevel=2,
        )
    model = _build(name, {**implied, **config})
    model.model_name = name
    model.model_kwargs = {**implied, **config}
    model.model_config = resolved_config(name, model.model_kwargs)
    return model


def defaults_when_absent(name: str) -> dict[str, Any]:
    """The options model ``name`` gained after checkpoints of it were written, each with the
    value that a stored config (or a format-1 checkpoint's ``model_kwargs``) without the key
    was built with: its class's ``config_defaults_when_absent`` (e.g. the hybrids'
    ``{"hybrid_head": "fc"}``, whose default for new models is ``"mlr"``).

    Parameters
    ----------
    name : str
        A registered or official model name.

    Returns
    -------
    dict
        ``{option: value}``; empty for a model whose options all predate its checkpoints.
    """
    base, _ = resolve_model_name(name)
    return dict(getattr(_REGISTRY[base], "config_defaults_when_absent", {}))
