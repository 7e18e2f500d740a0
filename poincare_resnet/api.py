"""The Python API behind the CLI, for notebooks: load a trained model, evaluate it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import load_dataset
from .models import create_model
from .training.checkpoint import load_checkpoint, load_model_state
from .training.trainer import DTYPES, evaluate_split, resolve_device


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or a run directory (its ``best.safetensors``)."""
    p = Path(path)
    if p.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            if (p / name).is_file():
                return p / name
        raise FileNotFoundError(f"{p}: no best.safetensors or last.safetensors in this directory")
    if not p.is_file():
        raise FileNotFoundError(f"checkpoint {p} does not exist")
    return p


def load_model(path: str | Path, device: str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint describes and load its weights (no unpickling)."""
    ck = load_checkpoint(resolve_checkpoint(path))
    meta = ck.meta
    if "model_name" not in meta:
        raise ValueError(f"{path}: checkpoint metadata names no model")
    kwargs = dict(meta.get("model_kwargs", {}))
    num_classes, in_chans = kwargs.pop("num_classes"), kwargs.pop("in_chans")
    model = create_model(meta["model_name"], num_classes=num_classes, in_chans=in_chans, **kwargs)
    model = model.to(DTYPES.get(meta.get("dtype", "float32"), torch.float32))
    load_model_state(model, ck.model_state, source=str(ck.path))
    model.eval()
    return model.to(resolve_device(device)), meta


def evaluate_checkpoint(
    path: str | Path,
    dataset: str | None = None,
    data_dir: str | None = None,
    split: str = "test",
    device: str = "cpu",
    out: str | Path | None = None,
    batch_size: int = 512,
) -> dict[str, Any]:
    """Top-1/top-5 and per-class accuracy of a checkpoint on a dataset split (default: the one it
    was trained on); writes ``evaluation.json`` and a confusion-matrix PNG when ``out`` is given."""
    from .evaluation.metrics import confusion_matrix, per_class_accuracy
    from .evaluation.plots import plot_confusion_matrix

    model, meta = load_model(path, device)
    name = dataset or meta.get("dataset")
    if name is None:
        raise ValueError("the checkpoint names no dataset; pass --dataset")
    data = load_dataset(name, data_dir)
    if data.in_chans != meta["model_kwargs"]["in_chans"]:
        raise ValueError(
            f"dataset {name} has {data.in_chans} channels but the model expects "
            f"{meta['model_kwargs']['in_chans']}"
        )
    if data.num_classes != meta["model_kwargs"]["num_classes"]:
        raise ValueError(
            f"dataset {name} has {data.num_classes} classes but the model was "
            f"trained for {meta['model_kwargs']['num_classes']}"
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
        plot_confusion_matrix(cm, data.class_names, out / "confusion_matrix.png")
        (out / "evaluation.json").write_text(json.dumps(result, indent=2))
    return result
