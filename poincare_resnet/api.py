"""The Python API behind the CLI, for notebooks: load a trained model, evaluate it."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from torch import nn

from .data import load_dataset, trained_image_size
from .models.registry import build_from_config, create_model, defaults_when_absent
from .training.checkpoint import (
    CheckpointError,
    atomic_output,
    atomic_write_text,
    load_checkpoint,
    load_model_state,
)
from .training.config import DTYPES, resolve_device
from .training.evaluate import evaluate_split
from .training.rundir import check_output_dir


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory (its ``best.safetensors``).

    Parameters
    ----------
    path : str or Path
        A ``.safetensors`` file or a run directory.

    Returns
    -------
    Path
        The checkpoint file (``FileNotFoundError`` naming what is missing).
    """
    p = Path(path)
    if p.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(f"{p}: no best.safetensors or last.safetensors in this directory")
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    return p


SPLITS = ("val", "test")


def _meta_int(meta: dict[str, Any], key: str, source: str) -> int:
    value = (meta.get("model_kwargs") or {}).get(key, meta.get(key))
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(f"{source}: checkpoint metadata has no valid {key} ({value!r})")
    return value


def rebuild_model(meta: dict[str, Any], source: str = "checkpoint") -> nn.Module:
    """The network a checkpoint's metadata describes, before its weights are loaded.

    From format 2 on the metadata holds ``model_config``, every constructor argument of the
    trained network; it is rebuilt from exactly that, whatever the registry's defaults are
    today. Older checkpoints only hold the options given at training time (``model_kwargs``):
    they are rebuilt with today's registry defaults, with a warning saying so.

    Parameters
    ----------
    meta : dict
        The checkpoint's metadata.
    source : str
        The checkpoint's name in messages.

    Returns
    -------
    nn.Module
        The untrained network of the checkpoint's architecture.
    """
    name = meta.get("model_name")
    if not isinstance(name, str) or not name:
        raise CheckpointError(f"{source}: checkpoint metadata names no model")
    config = meta.get("model_config")
    if config is not None:
        if not isinstance(config, dict):
            raise CheckpointError(f"{source}: model_config in the metadata is not a dict")
        return build_from_config(name, config)
    warnings.warn(
        f"{source}: checkpoint has no resolved model config (format < 2): rebuilding {name} "
        "with today's registry defaults plus its stored model_kwargs; if a default of "
        f"{name} changed since it was trained, this is a different network",
        stacklevel=3,
    )
    # an option added since has the value such a checkpoint was built with, not today's default
    kwargs = {**defaults_when_absent(name), **(meta.get("model_kwargs") or {})}
    num_classes = _meta_int(meta, "num_classes", source)
    in_chans = _meta_int(meta, "in_chans", source)
    kwargs.pop("num_classes", None)
    kwargs.pop("in_chans", None)
    return create_model(name, num_classes=num_classes, in_chans=in_chans, **kwargs)


def load_model(path: str | Path, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint describes and load its weights (no unpickling).

    Parameters
    ----------
    path : str or Path
        A checkpoint file or a run directory.
    device : str
        Where the model goes.

    Returns
    -------
    tuple
        ``(model in eval mode, metadata)``.
    """
    ck = load_checkpoint(resolve_checkpoint(path))
    meta = ck.meta
    model = rebuild_model(meta, str(ck.path))
    dtype = meta.get("dtype", "float32")
    if dtype not in DTYPES:
        raise CheckpointError(f"{ck.path}: unknown dtype {dtype!r} in the metadata")
    model = model.to(DTYPES[dtype])
    load_model_state(model, ck.model_state, source=str(ck.path))
    model.eval()
    return model.to(resolve_device(device)), meta


def check_split(split: str) -> str:
    """``split`` if it is one of :data:`SPLITS`, else ``ValueError`` naming the valid ones.

    Parameters
    ----------
    split : str
        ``"val"`` or ``"test"``.

    Returns
    -------
    str
        ``split``.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose one of {', '.join(SPLITS)}")
    return split


def evaluate_checkpoint(
    path: str | Path,
    dataset: str | None = None,
    data_dir: str | None = None,
    split: str = "test",
    device: str = "cpu",
    out: str | Path | None = None,
    batch_size: int = 512,
) -> dict[str, Any]:
    """Top-1/top-5 and per-class accuracy of a checkpoint on a dataset split (``"val"`` or
    ``"test"``; default: the test split of the dataset it was trained on); writes
    ``evaluation.json`` and a confusion-matrix PNG (atomically) when ``out`` is given.

    Parameters
    ----------
    path : str or Path
        A checkpoint file or a run directory.
    dataset, data_dir : str, optional
        The dataset (default: the checkpoint's) and where it lives.
    split : str
        ``"val"`` or ``"test"``.
    device : str
        Where the model runs.
    out : str or Path, optional
        Directory for ``evaluation.json`` and the PNG.
    batch_size : int
        Images per forward pass.

    Returns
    -------
    dict
        ``checkpoint``, ``dataset``, ``split``, ``n``, ``<split>_loss``, ``<split>_top1``,
        ``<split>_top5`` and ``per_class_accuracy``.
    """
    from .evaluation.metrics import confusion_matrix, per_class_accuracy
    from .evaluation.plots import plot_confusion_matrix

    check_split(split)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    resolve_device(device)
    if out is not None:
        check_output_dir(out, "--out")
    model, meta = load_model(path, device)
    name = dataset or meta.get("dataset")
    if name is None:
        raise ValueError("the checkpoint names no dataset; pass --dataset")
    data = load_dataset(name, data_dir, image_size=trained_image_size(name, meta))
    if data.in_chans != model.in_chans:
        raise ValueError(
            f"dataset {name} has {data.in_chans} channels but the model expects {model.in_chans}"
        )
    if data.num_classes != model.num_classes:
        raise ValueError(
            f"dataset {name} has {data.num_classes} classes but the model was "
            f"trained for {model.num_classes}"
        )
    x, y = (data.test_x, data.test_y) if split == "test" else (data.val_x, data.val_y)
    res = evaluate_split(model, x, y, batch_size, device, return_logits=True)
    logits = res.pop("logits")
    per_class = per_class_accuracy(logits, y, data.num_classes)
    result = {
        "checkpoint": str(path),
        "dataset": name,
        "split": split,
        "n": len(y),
        **{f"{split}_{k}": v for k, v in res.items()},
        "per_class_accuracy": {
            c: float(a) for c, a in zip(data.class_names, per_class, strict=True)
        },
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        cm = confusion_matrix(logits, y, data.num_classes)
        with atomic_output(out / "confusion_matrix.png") as tmp:
            plot_confusion_matrix(cm, data.class_names, tmp)
        atomic_write_text(out / "evaluation.json", json.dumps(result, indent=2))
    return result
