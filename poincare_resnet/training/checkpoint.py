"""Crash-safe checkpoints: one ``.safetensors`` file per checkpoint plus a JSON sidecar.

Every checkpoint is written atomically (temporary file in the target directory, flush,
``fsync``, ``os.replace``, ``fsync`` of the directory), so a crash leaves either the old or
the new file, never a half-written one. Files hold only tensors and JSON: no Python objects
are ever deserialised, so loading an untrusted checkpoint cannot run code.

Layout of a checkpoint file: tensors are stored under ``model/``, ``optimizer/``,
``scheduler/``, ``rng/``, ``scaler/`` and ``extra/`` prefixes; the safetensors header metadata holds
``{"poincare_resnet": json.dumps(record)}`` where ``record`` is the user metadata plus
``format_version``, ``sha256`` (over the tensor payload) and ``_layout`` (the JSON
structures of the optimizer, scheduler, RNG and ``torch.amp.GradScaler`` states with tensor
placeholders; the scaler's state is plain numbers: its scale and growth tracker, exact in JSON);
from format 2 on also ``"poincare_resnet_sha256"``, the SHA-256 of that metadata string, so
that an altered byte anywhere in the file (payload or metadata) is detected.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as _st_load_bytes
from safetensors.torch import save as _st_save_bytes
from torch import Tensor, nn

__all__ = [
    "FORMAT_VERSION",
    "Checkpoint",
    "CheckpointError",
    "CheckpointManager",
    "atomic_output",
    "atomic_stem",
    "atomic_write_bytes",
    "atomic_write_text",
    "capture_rng_state",
    "flatten_state",
    "load_checkpoint",
    "load_model_state",
    "restore_rng_state",
    "save_checkpoint",
    "unflatten_state",
    "verify_checkpoint",
]

# 2: the metadata of model checkpoints carries ``model_config`` (every constructor argument)
FORMAT_VERSION = 2
_META_KEY = "poincare_resnet"
_META_SHA_KEY = "poincare_resnet_sha256"  # format 2: SHA-256 of the metadata string itself
_LAYOUT_KEY = "_layout"
_RESERVED_META = ("format_version", "sha256", _LAYOUT_KEY)
_TENSOR = "__tensor__"
_TUPLE = "__tuple__"
_ITEMS = "__dict_items__"
_MARKERS = frozenset({_TENSOR, _TUPLE, _ITEMS})
_PARTS = ("model", "optimizer", "scheduler", "rng", "scaler", "extra")
_STATE_PARTS = ("optimizer", "scheduler", "rng", "scaler")
_MAX_LISTED = 5

PathLike = str | os.PathLike[str]


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, corrupt, or does not fit the model."""


# --------------------------------------------------------------------------- atomic I/O


def _fsync_directory(directory: Path) -> None:
    """Flush a directory entry to disk (no-op where directories cannot be opened)."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)
    try:
        fd = os.open(directory, flags)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_stem(stem: PathLike, suffixes: Sequence[str] = ("",)) -> Iterator[Path]:
    """Write files atomically through a temporary stem in the same directory.

    Yields ``tmp`` (``.<stem name>.<16 hex>.tmp``); whatever the block writes to ``tmp + s``
    for ``s`` in ``suffixes`` is then flushed (``fsync``) and moved onto ``stem + s`` with
    ``os.replace``, and the directory entry is flushed. A reader therefore sees the old or the
    new file, never a half-written one; if the block raises, the temporary files are removed
    and the targets are untouched. This is the one writer every output of the library goes
    through (checkpoints, JSON, tables, figures).

    Parameters
    ----------
    stem : str or Path
        The targets' common path; each target is ``stem + suffix``.
    suffixes : sequence of str
        One target per suffix (default: ``stem`` itself).

    Yields
    ------
    Path
        The temporary stem to write ``<tmp><suffix>`` files under.
    """
    stem = Path(stem)
    directory = stem.parent if str(stem.parent) else Path(".")
    tmp = directory / f".{stem.name}.{secrets.token_hex(8)}.tmp"
    pairs = [(Path(f"{tmp}{s}"), Path(f"{stem}{s}")) for s in suffixes]
    try:
        yield tmp
        for written, target in pairs:
            if not written.is_file():
                raise FileNotFoundError(f"atomic write of {target}: nothing was written")
            mode = target.stat().st_mode & 0o777 if target.exists() else 0o644
            with open(written, "rb") as handle:
                os.fsync(handle.fileno())
            os.chmod(written, mode)
        for written, target in pairs:
            os.replace(written, target)
    finally:
        for written, _ in pairs:
            with contextlib.suppress(OSError):
                written.unlink()
    _fsync_directory(directory)


@contextlib.contextmanager
def atomic_output(path: PathLike) -> Iterator[Path]:
    """Atomically write one file: yields a temporary path with ``path``'s suffix (so that
    writers that infer the format from it, e.g. ``savefig``, still work); see
    :func:`atomic_stem`.

    Parameters
    ----------
    path : str or Path
        The file to replace.

    Yields
    ------
    Path
        The temporary file to write.
    """
    path = Path(path)
    with atomic_stem(path.with_name(path.stem), (path.suffix,)) as tmp:
        yield Path(f"{tmp}{path.suffix}")


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically: the file is either the old or the new content.

    Parameters
    ----------
    path : str or Path
        The file to replace.
    data : bytes
        Its new content.
    """
    with atomic_output(path) as tmp:
        with open(tmp, "xb") as handle:
            handle.write(data)


def atomic_write_text(path: PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically, as :func:`atomic_write_bytes` does bytes.

    Parameters
    ----------
    path, text : str or Path, str
        The file to replace and its new text.
    """
    atomic_write_bytes(path, text.encode("utf-8"))


# --------------------------------------------------------------- nested state <-> tensors


def _join(prefix: str, parts: list[str]) -> str:
    """Tensor name for a path inside a nested structure."""
    name = "/".join([prefix, *parts]) if prefix else "/".join(parts)
    return name or "tensor"


def flatten_state(obj: Any, prefix: str = "") -> tuple[dict[str, Tensor], Any]:
    """Split a nested state into a flat ``{name: tensor}`` dict and a JSON-able structure.

    Supports dict/list/tuple/int/float/str/bool/None and tensors (numpy scalars become
    Python scalars). Tensors are replaced by ``{"__tensor__": name}``, tuples by
    ``{"__tuple__": [...]}``, and dicts whose keys are not all strings (such as optimizer
    state keyed by parameter index) by ``{"__dict_items__": [[key, value], ...]}``.

    Parameters
    ----------
    obj : Any
        A nested state (``state_dict()`` of a model, optimizer, scheduler, ...).
    prefix : str
        The tensor names' prefix.

    Returns
    -------
    tuple
        ``(tensors, structure)``: ``{name: tensor}`` and the JSON-serialisable rest.
    """
    tensors: dict[str, Tensor] = {}

    def encode(value: Any, parts: list[str]) -> Any:
        if isinstance(value, Tensor):
            name = base = _join(prefix, parts)
            counter = 1
            while name in tensors:
                name = f"{base}#{counter}"
                counter += 1
            tensors[name] = value
            return {_TENSOR: name}
        if isinstance(value, np.generic):
            return encode(value.item(), parts)
        if value is None or isinstance(value, bool | int | float | str):
            return value
        if isinstance(value, list):
            return [encode(v, [*parts, str(i)]) for i, v in enumerate(value)]
        if isinstance(value, tuple):
            return {_TUPLE: [encode(v, [*parts, str(i)]) for i, v in enumerate(value)]}
        if isinstance(value, Mapping):
            keys = list(value)
            if all(isinstance(k, str) for k in keys) and not _MARKERS.intersection(keys):
                return {k: encode(v, [*parts, k]) for k, v in value.items()}
            return {
                _ITEMS: [
                    [encode(k, [*parts, "key", str(i)]), encode(v, [*parts, str(k)])]
                    for i, (k, v) in enumerate(value.items())
                ]
            }
        where = _join(prefix, parts)
        raise TypeError(f"cannot serialise {type(value).__name__} at {where!r} in a checkpoint")

    structure = encode(obj, [])
    return tensors, structure


def unflatten_state(structure: Any, tensors: Mapping[str, Tensor]) -> Any:
    """Inverse of :func:`flatten_state`: rebuild the nested state from its structure.

    Parameters
    ----------
    structure : Any
        The JSON structure :func:`flatten_state` returned.
    tensors : mapping of str to Tensor
        The tensors by name.

    Returns
    -------
    Any
        The nested state.
    """

    def decode(value: Any) -> Any:
        if isinstance(value, list):
            return [decode(v) for v in value]
        if isinstance(value, dict):
            if len(value) == 1:
                ((key, inner),) = value.items()
                if key == _TENSOR:
                    if inner not in tensors:
                        raise CheckpointError(
                            f"checkpoint structure refers to missing tensor {inner!r}"
                        )
                    return tensors[inner]
                if key == _TUPLE:
                    return tuple(decode(v) for v in inner)
                if key == _ITEMS:
                    return {_hashable(decode(k)): decode(v) for k, v in inner}
            return {k: decode(v) for k, v in value.items()}
        return value

    return decode(structure)


def _hashable(key: Any) -> Any:
    """Dict keys decoded from JSON lists become tuples so they stay hashable."""
    if isinstance(key, list):
        return tuple(_hashable(k) for k in key)
    return key


# ------------------------------------------------------------------------------ RNG state


def capture_rng_state() -> dict[str, Any]:
    """Snapshot torch CPU/CUDA, Python ``random`` and numpy global RNG states.

    Returns
    -------
    dict
        ``torch`` (and ``cuda`` where present), ``python`` and ``numpy`` states.
    """
    version, internal, gauss_next = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)  # noqa: NPY002
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": {
            "version": int(version),
            "state": torch.tensor(internal, dtype=torch.int64),
            "gauss_next": gauss_next,
        },
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Restore RNG states captured by :func:`capture_rng_state` (missing parts are skipped).

    Parameters
    ----------
    state : mapping
        What :func:`capture_rng_state` returned (possibly through a checkpoint).
    """
    if "torch" in state:
        torch.set_rng_state(state["torch"].detach().cpu().to(torch.uint8))
    cuda_states = state.get("cuda")
    if cuda_states and torch.cuda.is_available():
        count = min(len(cuda_states), torch.cuda.device_count())
        for index in range(count):
            torch.cuda.set_rng_state(cuda_states[index].detach().cpu().to(torch.uint8), index)
    if "python" in state:
        py = state["python"]
        internal = tuple(int(v) for v in py["state"].tolist())
        random.setstate((int(py["version"]), internal, py["gauss_next"]))
    if "numpy" in state:
        npst = state["numpy"]
        keys = npst["keys"].detach().cpu().numpy().astype(np.uint32)
        np.random.set_state(  # noqa: NPY002
            (
                npst["name"],
                keys,
                int(npst["pos"]),
                int(npst["has_gauss"]),
                float(npst["cached_gaussian"]),
            )
        )


# ---------------------------------------------------------------------------- checkpoints


@dataclass
class Checkpoint:
    """Contents of a loaded checkpoint; ``meta`` includes ``format_version`` and ``sha256``."""

    model_state: dict[str, Tensor]
    meta: dict[str, Any]
    optimizer_state: dict[str, Any] | None = None
    scheduler_state: dict[str, Any] | None = None
    rng_state: dict[str, Any] | None = None
    extra_tensors: dict[str, Tensor] = field(default_factory=dict)
    path: Path | None = None
    scaler_state: dict[str, Any] | None = None


def _payload_sha256(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 over the sorted tensors' name, dtype, shape and raw bytes."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        head = json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode("utf-8")
        raw = tensor.reshape(-1).view(torch.uint8).numpy()
        digest.update(len(head).to_bytes(8, "little"))
        digest.update(head)
        digest.update(raw.size.to_bytes(8, "little"))
        digest.update(raw.data)
    return digest.hexdigest()


def _sidecar_path(path: Path) -> Path:
    """``<name>.json`` next to ``<name>.safetensors``."""
    if path.suffix == ".safetensors":
        return path.with_suffix(".json")
    if path.suffix == ".json":
        raise ValueError(f"checkpoint path must not end in .json: {path}")
    return path.with_name(path.name + ".json")


def _owned_copy(tensor: Tensor) -> Tensor:
    """Detached, contiguous CPU tensor with its own storage (as safetensors requires)."""
    if not isinstance(tensor, Tensor):
        raise TypeError(f"expected a tensor, got {type(tensor).__name__}")
    return tensor.detach().to("cpu").clone(memory_format=torch.contiguous_format)


def save_checkpoint(
    path: PathLike,
    *,
    model_state: Mapping[str, Tensor],
    meta: Mapping[str, Any],
    optimizer_state: Mapping[str, Any] | None = None,
    scheduler_state: Mapping[str, Any] | None = None,
    rng_state: Mapping[str, Any] | None = None,
    extra_tensors: Mapping[str, Tensor] | None = None,
    scaler_state: Mapping[str, Any] | None = None,
) -> Path:
    """Atomically write a checkpoint (and its JSON sidecar); return the checkpoint path.

    ``scaler_state`` is a ``torch.amp.GradScaler.state_dict()`` (fp16 training): the scale
    (a float32 value, exact as a JSON number) and the growth tracker, restored bit for bit.

    Parameters
    ----------
    path : str or Path
        The ``.safetensors`` file to write.
    model_state : mapping of str to Tensor
        ``model.state_dict()``.
    meta : mapping
        JSON metadata (model name, resolved config, dataset, ...).
    optimizer_state, scheduler_state, rng_state, scaler_state : mapping, optional
        The training state of a resume checkpoint.
    extra_tensors : mapping of str to Tensor, optional
        Further tensors to store.

    Returns
    -------
    Path
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    for key, value in model_state.items():
        tensors[f"model/{key}"] = _owned_copy(value)
    for key, value in (extra_tensors or {}).items():
        tensors[f"extra/{key}"] = _owned_copy(value)
    layout: dict[str, Any] = {}
    for part, state in (
        ("optimizer", optimizer_state),
        ("scheduler", scheduler_state),
        ("rng", rng_state),
        ("scaler", scaler_state),
    ):
        if state is None:
            layout[part] = None
            continue
        flat, structure = flatten_state(dict(state), part)
        tensors.update({name: _owned_copy(t) for name, t in flat.items()})
        layout[part] = structure

    record = {k: v for k, v in meta.items() if k not in _RESERVED_META}
    record["format_version"] = FORMAT_VERSION
    record["sha256"] = _payload_sha256(tensors)
    record[_LAYOUT_KEY] = layout
    encoded = json.dumps(record)

    metadata = {_META_KEY: encoded, _META_SHA_KEY: _text_sha256(encoded)}
    atomic_write_bytes(path, _st_save_bytes(tensors, metadata=metadata))
    atomic_write_text(_sidecar_path(path), json.dumps(record, indent=2, sort_keys=True) + "\n")
    return path


def _text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _corrupt(path: Path, why: str) -> CheckpointError:
    """Error for an unreadable checkpoint file."""
    return CheckpointError(f"truncated/corrupt checkpoint {path}: {why}")


def _read_checkpoint(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read and fully verify a checkpoint file; return its tensors and metadata record."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"missing checkpoint {path}: file not found") from None
    except OSError as exc:
        raise CheckpointError(f"unreadable checkpoint {path}: {exc}") from exc
    if len(data) < 8:
        raise _corrupt(path, f"file has {len(data)} bytes, too short for a safetensors header")
    header_len = int.from_bytes(data[:8], "little")
    if 8 + header_len > len(data):
        raise _corrupt(path, f"header claims {header_len} bytes but file has {len(data) - 8}")
    try:
        header = json.loads(data[8 : 8 + header_len].decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
        ends = [
            int(info["data_offsets"][1]) for name, info in header.items() if name != "__metadata__"
        ]
        metadata = header.get("__metadata__") or {}
        encoded = metadata.get(_META_KEY)
        if not isinstance(encoded, str):
            raise _corrupt(path, "no poincare_resnet metadata in the header")
        record = json.loads(encoded)
        if not isinstance(record, dict):
            raise ValueError("metadata is not a JSON object")
    except CheckpointError:
        raise
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise _corrupt(path, f"unreadable header ({exc})") from exc
    expected_size = 8 + header_len + max(ends, default=0)
    if expected_size != len(data):
        raise _corrupt(path, f"file has {len(data)} bytes, header describes {expected_size}")
    version = record.get("format_version")
    stored_meta = metadata.get(_META_SHA_KEY)
    if stored_meta is not None and stored_meta != _text_sha256(encoded):
        raise _corrupt(path, "metadata sha256 mismatch (the metadata was altered)")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path}: unsupported format_version {version!r} "
            f"(this library reads up to {FORMAT_VERSION})"
        )
    if version >= 2 and stored_meta is None:
        raise _corrupt(path, "format 2 checkpoint without its metadata sha256")
    try:
        tensors = _st_load_bytes(data)
    except Exception as exc:  # safetensors raises its own error types
        raise _corrupt(path, f"cannot decode tensors ({exc})") from exc
    stored, actual = record.get("sha256"), _payload_sha256(tensors)
    if stored != actual:
        raise _corrupt(path, f"sha256 mismatch (stored {stored}, computed {actual})")
    return tensors, record


def verify_checkpoint(path: PathLike) -> None:
    """Raise :class:`CheckpointError` unless ``path`` is a complete, intact checkpoint.

    Parameters
    ----------
    path : str or Path
        The checkpoint file.
    """
    _read_checkpoint(Path(path))


def load_checkpoint(path: PathLike, map_location: str | torch.device = "cpu") -> Checkpoint:
    """Load and verify a checkpoint; tensors (except RNG states) go to ``map_location``.

    Parameters
    ----------
    path : str or Path
        The checkpoint file.
    map_location : str or torch.device
        Where the tensors go.

    Returns
    -------
    Checkpoint
        Its model state, metadata and (resume checkpoints) training state.
    """
    path = Path(path)
    tensors, record = _read_checkpoint(path)
    layout = record.pop(_LAYOUT_KEY, None) or {}
    device = torch.device(map_location)
    moved = {
        name: t if name.startswith("rng/") or device.type == "cpu" else t.to(device)
        for name, t in tensors.items()
    }
    parts: dict[str, dict[str, Tensor]] = {part: {} for part in _PARTS}
    for name, tensor in moved.items():
        part, _, key = name.partition("/")
        if part not in parts:
            raise _corrupt(path, f"unexpected tensor {name!r}")
        parts[part][key] = tensor
    states: dict[str, Any] = {}
    for part in _STATE_PARTS:
        structure = layout.get(part)
        try:
            states[part] = None if structure is None else unflatten_state(structure, moved)
        except (CheckpointError, TypeError, ValueError) as exc:
            raise _corrupt(path, f"{part} state does not match stored tensors ({exc})") from exc
    return Checkpoint(
        model_state=parts["model"],
        meta=record,
        optimizer_state=states["optimizer"],
        scheduler_state=states["scheduler"],
        rng_state=states["rng"],
        extra_tensors=parts["extra"],
        path=path,
        scaler_state=states["scaler"],
    )


def _listing(items: list[str]) -> str:
    """First few items, comma-separated, with a count of the rest."""
    shown = ", ".join(items[:_MAX_LISTED])
    rest = len(items) - _MAX_LISTED
    return shown + (f", ... and {rest} more" if rest > 0 else "")


def load_model_state(
    model: nn.Module, state: Mapping[str, Tensor], *, source: str = "checkpoint"
) -> None:
    """Load ``state`` into ``model`` after checking keys and shapes; cast differing dtypes.

    Parameters
    ----------
    model : nn.Module
        The network to load into.
    state : mapping of str to Tensor
        The checkpoint's model state.
    source : str
        The checkpoint's name in error messages.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: {source} {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in expected
        if k in state
        and isinstance(expected[k], Tensor)
        and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    if missing or unexpected or mismatched:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing key(s): {_listing(missing)}")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatch(es): {_listing(mismatched)}")
        raise CheckpointError(
            f"{source} does not fit model {type(model).__name__}: " + "; ".join(problems)
        )
    cast = {
        k: v.to(dtype=expected[k].dtype)
        if isinstance(expected[k], Tensor) and v.dtype != expected[k].dtype
        else v
        for k, v in state.items()
    }
    model.load_state_dict(cast, strict=True)


# ------------------------------------------------------------------------------- manager


class CheckpointManager:
    """Numbered checkpoints ``<prefix>-<step:08d>.safetensors`` in one directory."""

    def __init__(self, directory: PathLike, keep: int = 3, prefix: str = "ckpt") -> None:
        """Use ``directory`` (created if needed), keeping the newest ``keep`` checkpoints."""
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keep = keep
        self.prefix = prefix
        self._pattern = re.compile(rf"{re.escape(prefix)}-(\d+)\.safetensors")

    def path_for(self, step: int) -> Path:
        """File name of the checkpoint for ``step``.

        Parameters
        ----------
        step : int
            The optimisation step.

        Returns
        -------
        Path
            ``<directory>/<prefix>-<step>.safetensors``.
        """
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        return self.directory / f"{self.prefix}-{step:08d}.safetensors"

    def paths(self) -> list[Path]:
        """Checkpoint files in the directory, oldest (lowest step) first.

        Returns
        -------
        list of Path
            The checkpoint files.
        """
        found = []
        for entry in self.directory.iterdir():
            match = self._pattern.fullmatch(entry.name)
            if match and entry.is_file():
                found.append((int(match.group(1)), entry))
        return [p for _, p in sorted(found)]

    def save(self, step: int, **kwargs: Any) -> Path:
        """Write the checkpoint for ``step`` atomically, then prune old ones beyond ``keep``.

        Parameters
        ----------
        step : int
            The optimisation step.
        **kwargs
            The arguments of :func:`save_checkpoint` after ``path``.

        Returns
        -------
        Path
            The new checkpoint.
        """
        path = save_checkpoint(self.path_for(step), **kwargs)
        others = [p for p in self.paths() if p != path]
        for old in others[: max(0, len(others) - (self.keep - 1))]:
            for victim in (old, _sidecar_path(old)):
                with contextlib.suppress(FileNotFoundError):
                    victim.unlink()
        return path

    def latest_valid(
        self, log: Callable[[str], Any] = print, map_location: str | torch.device = "cpu"
    ) -> Checkpoint | None:
        """Newest checkpoint that verifies; bad ones are logged and skipped.

        Parameters
        ----------
        log : callable
            Where a skipped checkpoint is reported.
        map_location : str or torch.device
            Where the tensors go.

        Returns
        -------
        Checkpoint or None
            ``None`` when no checkpoint verifies.
        """
        for path in reversed(self.paths()):
            try:
                return load_checkpoint(path, map_location=map_location)
            except CheckpointError as exc:
                log(f"skipping unusable checkpoint {path}: {exc}; falling back to the previous one")
        return None
