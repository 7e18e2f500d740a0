"""TensorBoard logging for ``train --log tensorboard`` (through ``torch.utils.tensorboard``).

Once per epoch, at the global step the epoch ended on (the ``step`` of its ``metrics.jsonl``
row), :class:`TensorBoardLogger` writes the row's scalars (:data:`SCALAR_TAGS`: losses,
accuracies, learning rate, images/s), the curvature ``c`` of every learnable
:class:`~poincare_resnet.nn.Curvature` (tag ``curvature``, or ``curvature/<module>`` when there
are several), and histograms of the tangent norms ``‖v‖`` of each stage's output (tags
``tangent_norm/<stage>``; one value per pixel, the norm over the channel axis, for a fixed probe
batch of validation images in eval mode; ``pool`` is the pooled feature, whose hyperbolic
distance to the origin is ``2‖v‖``). For a Euclidean network these are the feature norms.
Everything is read once per epoch, so the training steps gain no host synchronisation.
``metrics.jsonl`` is written as without TensorBoard.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["SCALAR_TAGS", "STAGES", "TensorBoardLogger", "make_logger", "stage_tangent_norms"]

#: ``metrics.jsonl`` key → TensorBoard tag.
SCALAR_TAGS: dict[str, str] = {
    "train_loss": "train/loss",
    "train_top1": "train/accuracy",
    "val_loss": "val/loss",
    "val_top1": "val/accuracy",
    "val_top5": "val/top5",
    "lr": "lr",
    "images_per_s": "images_per_s",
}

#: The stage modules whose outputs get a tangent-norm histogram (those the model has).
STAGES = ("stem", "layer1", "layer2", "layer3", "pool")


@torch.no_grad()
def stage_tangent_norms(model: nn.Module, x: Tensor) -> dict[str, Tensor]:
    """Norms over the channel axis of each stage's output for the batch ``x``, in eval mode.

    Returns ``{stage: norms}`` with ``norms`` a flat CPU float64 tensor: ``‖v‖`` per pixel of
    a ``[B, C, H, W]`` map, per sample of a ``[B, C]`` output. Each module's ``training`` flag
    is restored afterwards.

    Parameters
    ----------
    model : nn.Module
        A ``PoincareResNet`` (or a model with the same stages).
    x : Tensor
        The probe batch.
    """
    from ..evaluation.ood import eval_mode

    out: dict[str, Tensor] = {}
    handles = []
    for name in STAGES:
        module = getattr(model, name, None)
        if isinstance(module, nn.Module):

            def hook(_m, _inp, y, name=name):
                out[name] = torch.linalg.vector_norm(y.double(), dim=1).flatten().cpu()

            handles.append(module.register_forward_hook(hook))
    try:
        with eval_mode(model):
            model(x)
    finally:
        for h in handles:
            h.remove()
    return out


def _learnable_curvatures(model: nn.Module) -> dict[str, nn.Module]:
    from ..nn import Curvature

    found = {n: m for n, m in model.named_modules() if isinstance(m, Curvature) and m.learnable}
    # a shared Curvature appears once in named_modules(); name it by its first path
    return found


class TensorBoardLogger:
    """Writes per-epoch scalars and tangent-norm histograms to ``log_dir``.

    Parameters
    ----------
    log_dir : str or Path
        Directory of the event files (the trainer uses ``<run>/tensorboard``).
    probe_x : Tensor
        Images ``[B, C, H, W]`` (on the model's device and dtype) whose stage outputs give the
        histograms.
    """

    def __init__(self, log_dir: str | Path, probe_x: Tensor) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ValueError(
                "--log tensorboard needs the tensorboard package (pip install tensorboard)"
            ) from e
        self.log_dir = Path(log_dir)
        self.writer = SummaryWriter(str(self.log_dir))
        self.probe_x = probe_x

    def log_epoch(self, row: dict[str, Any], model: nn.Module) -> None:
        """Log one ``metrics.jsonl`` row (at ``row["step"]``) and the model's state.

        Parameters
        ----------
        row : dict
            The epoch's metrics.
        model : nn.Module
            The network (its weight histograms and stage norms are logged).
        """
        step = int(row["step"])
        for key, tag in SCALAR_TAGS.items():
            if key in row and row[key] is not None:
                self.writer.add_scalar(tag, float(row[key]), step)
        curv = _learnable_curvatures(model)
        for name, module in curv.items():
            tag = "curvature" if len(curv) == 1 else f"curvature/{name}"
            self.writer.add_scalar(tag, float(torch.as_tensor(module()).detach()), step)
        for stage, norms in stage_tangent_norms(model, self.probe_x).items():
            self.writer.add_histogram(f"tangent_norm/{stage}", norms.numpy(), step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def make_logger(
    log: str, run: Path, probe_x: Tensor, probe_size: int = 256
) -> TensorBoardLogger | None:
    """A :class:`TensorBoardLogger` in ``run/tensorboard`` for ``log == "tensorboard"``, else
    ``None`` (``"jsonl"``: ``metrics.jsonl`` only).

    Parameters
    ----------
    log : str
        ``--log``: ``jsonl`` or ``tensorboard``.
    run : Path
        The run directory.
    probe_x : Tensor
        Validation images for the stage-norm histograms.
    probe_size : int
        How many of them are used.

    Returns
    -------
    TensorBoardLogger or None
        The logger, or ``None`` for ``jsonl``.
    """
    if log != "tensorboard":
        return None
    return TensorBoardLogger(run / "tensorboard", probe_x[:probe_size])
