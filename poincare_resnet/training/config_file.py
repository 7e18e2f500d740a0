"""Config files for ``train --config FILE``: TOML, YAML or JSON, checked against
:class:`~poincare_resnet.training.TrainConfig`.

The file holds :class:`TrainConfig` fields (``batch_size`` or ``batch-size``); the command line
overrides it flag by flag: the value of an option is, in order of precedence, the flag given on
the command line, the file's value, the default. The ``config.json`` a run writes is itself a
valid config file, so ``train --config runs/X/config.json --out runs/Y`` repeats run X.

A key that is not a field, or a value of the wrong type, raises :class:`ConfigFileError` (a
``ValueError``: the CLI exits with code 2) naming the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
import typing
from pathlib import Path
from typing import Any

from .config import TrainConfig

__all__ = ["ConfigFileError", "check_config_dict", "load_config_file", "merge_config"]

FORMATS = {".toml": "toml", ".yaml": "yaml", ".yml": "yaml", ".json": "json"}


class ConfigFileError(ValueError):
    """A config file that cannot be read, or holds an unknown key or a value of a wrong type."""


def _parser(kind: str, path: Path) -> tuple[Any, type[Exception]]:
    """The parse function of format ``kind`` and the error it raises on bad text (importing
    its module; :class:`ConfigFileError` naming the package when it is missing)."""
    if kind == "json":
        return json.loads, json.JSONDecodeError
    if kind == "yaml":
        try:
            import yaml
        except ImportError as e:
            raise ConfigFileError(f"{path}: reading YAML needs PyYAML (pip install pyyaml)") from e
        return yaml.safe_load, yaml.YAMLError
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        try:
            import tomli as tomllib
        except ImportError as e:
            raise ConfigFileError(f"{path}: reading TOML on Python 3.10 needs `tomli`") from e
    return tomllib.loads, tomllib.TOMLDecodeError


def _parse(text: str, path: Path, kind: str) -> Any:
    """The document in ``text``; :class:`ConfigFileError` naming the file on a parse error."""
    loads, error = _parser(kind, path)
    try:
        return loads(text)
    except error as e:
        raise ConfigFileError(f"{path}: not valid {kind.upper()}: {e}") from e


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read and check a config file; returns ``{field: value}`` with underscore names.

    Parameters
    ----------
    path : str or Path
        A ``.toml``, ``.yaml`` / ``.yml`` or ``.json`` file holding a table of
        :class:`TrainConfig` fields.

    Raises
    ------
    ConfigFileError
        Missing file, unknown suffix, a parse error, a key that is not a field, or a value whose
        type does not match the field's.

    Returns
    -------
    dict
        The checked values by field name.
    """
    p = Path(path)
    kind = FORMATS.get(p.suffix.lower())
    if kind is None:
        raise ConfigFileError(
            f"--config {p}: unknown format {p.suffix!r}; use .toml, .yaml, .yml or .json"
        )
    if not p.is_file():
        raise ConfigFileError(f"--config {p}: no such file")
    text = p.read_text(encoding="utf-8")
    data = _parse(text, p, kind)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigFileError(f"{p}: expected a table of options, got {type(data).__name__}")
    return check_config_dict(data, source=str(p))


_UnionType = type(int | None)


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _allowed(tp: Any) -> tuple[tuple[type, ...], bool]:
    """(accepted Python types, whether None is accepted) for a field annotation."""
    args = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, _UnionType) else (tp,)
    nullable = type(None) in args
    accepted: list[type] = []
    for a in args:
        if a is type(None):
            continue
        origin = typing.get_origin(a) or a
        accepted.append(origin)
        if origin is float:
            accepted.append(int)  # 5 is a fine learning rate of 5.0
    return tuple(accepted), nullable


def _type_name(tp: Any) -> str:
    accepted, nullable = _allowed(tp)
    names = [t.__name__ for t in accepted if not (t is int and float in accepted)]
    return " or ".join(names + (["null"] if nullable else []))


# what a run's own config.json holds besides the options: the tool's marker and the resolved
# model record (for --overwrite and --resume); a config file may carry them and they are skipped
RUN_RECORD_KEYS = frozenset({"tool", "format_version", "model_name", "model_config"})


def check_config_dict(data: dict[str, Any], source: str = "config") -> dict[str, Any]:
    """Check ``data`` against :class:`TrainConfig`'s fields and types.

    Keys may use ``-`` or ``_``. The run record's own keys (:data:`RUN_RECORD_KEYS`, written to
    ``config.json`` next to the options) are skipped: the repeated run builds its network from
    ``model`` and ``model_kwargs`` with today's registry defaults. ``bool`` is not accepted for
    numeric fields, nor a number for a ``bool`` field. Returns a new dict with underscore keys.

    Parameters
    ----------
    data : dict
        ``{key: value}`` as read from a file.
    source : str
        The file's name in error messages.

    Returns
    -------
    dict
        The checked values by field name.
    """
    types = _field_types()
    out: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key in RUN_RECORD_KEYS:
            continue
        if key not in types:
            close = difflib.get_close_matches(key, list(types), n=3, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ConfigFileError(f"{source}: unknown key {raw_key!r}{hint}")
        accepted, nullable = _allowed(types[key])
        ok = (value is None and nullable) or (
            isinstance(value, accepted) and not (isinstance(value, bool) and bool not in accepted)
        )
        if not ok:
            raise ConfigFileError(
                f"{source}: key {raw_key!r} must be {_type_name(types[key])}, "
                f"got {type(value).__name__} {value!r}"
            )
        out[key] = value
    return out


def merge_config(
    file_values: dict[str, Any], cli_values: dict[str, Any], given: set[str]
) -> dict[str, Any]:
    """``cli_values`` where the option was given on the command line, else the file's value,
    else ``cli_values`` (the defaults).

    Parameters
    ----------
    file_values : dict
        Checked file values (:func:`load_config_file`).
    cli_values : dict
        Every :class:`TrainConfig` field as the command line resolved it (defaults included).
    given : set of str
        The fields set explicitly on the command line.

    Returns
    -------
    dict
        Every field's value: the command line's where given, else the file's, else the default.
    """
    merged = dict(cli_values)
    for key, value in file_values.items():
        if key not in given:
            merged[key] = value
    return merged


def explicit_train_fields(argv: list[str]) -> set[str]:
    """The :class:`TrainConfig` fields that ``poincare-resnet train ARGV…`` sets explicitly.

    Re-parses ``argv`` with every default of the ``train`` parser replaced by
    ``argparse.SUPPRESS``, so only the options actually written appear.

    Parameters
    ----------
    argv : list of str
        The arguments after ``train``.

    Returns
    -------
    set of str
        Field names (underscore form).
    """
    import argparse

    from ..cli import build_parser

    parser = build_parser()
    train = next(
        a for a in parser._subparsers._group_actions if isinstance(a, argparse._SubParsersAction)
    ).choices["train"]
    for action in train._actions:
        action.default = argparse.SUPPRESS
    ns, _ = parser.parse_known_args(argv)
    given = set(vars(ns)) - {"command"}
    renames = {"no_progress": "progress"}
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return {renames.get(k, k) for k in given} & fields
