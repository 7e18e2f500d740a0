"""``norm(conv(u))`` without keeping the convolution's output for the norm's backward.

A Poincaré convolution ends in the tangent FC map, whose autograd node keeps its inputs (the
convolution's ``dots``, the per-pixel ``‖p‖²``, ``‖z_k‖``) to recompute its chain in backward.
The batch norm after it keeps its own input, the FC map's output ``y``: a second full-size map
per convolution, which a Euclidean conv → BN pair does not have (its BN keeps the conv output,
its conv keeps only its input). :func:`conv_norm` drops that second map: inside the norm's
forward a saved-tensor hook (:func:`torch.autograd.graph.saved_tensors_hooks`) replaces every
tensor that shares ``y``'s storage by a slot, and the norm's backward gets ``y`` back by running
the FC map again on the inputs the FC node keeps anyway. The FC map is element-wise over
positions (a few passes over ``dots``), far cheaper than the convolution, which is not rerun.

The values and gradients are those of ``norm(conv(u))`` exactly: the recomputation runs the
same kernel on the same inputs (under the autocast state of the forward, with the grad mode of
the backward, so ``create_graph=True`` still differentiates through it). As with
:func:`torch.utils.checkpoint.checkpoint`, parameters changed in place between forward and
backward would change the recomputed ``y``. Under ``torch.compile`` the compiled backward
recomputes ``y`` instead (selective activation checkpointing, ``_compile_recompute.py``).
Without autograd, or when :func:`set_fc_recompute` turned it off, it is plain
``norm(conv(u))``. The environment variable ``POINCARE_RESNET_FC_RECOMPUTE=0`` sets the default to
off (for A/B measurements in fresh processes).

On the PyTorch path (the FC map is :class:`~poincare_resnet.ball._autograd.FullyConnectedTangent`,
recorded by :func:`~poincare_resnet.ball._autograd.record_fc_nodes` in the forward), the
recomputation also computes the terms the FC node's backward would recompute next
(:func:`~poincare_resnet.ball._autograd.fc_output_sharing_terms`) and leaves them for that node,
which runs right after the norm's backward and skips its own recomputation: the FC chain runs
twice per step instead of three times, with the same values and gradients bit for bit. The
terms sit on that node alone (checked against the tensors it saved), live until it consumes them
or the backward pass ends, and at most one layer's are alive at a time. Not under
``create_graph=True`` (the recomputation is differentiated then), nor where
:func:`set_fc_share` turned it off (``POINCARE_RESNET_FC_SHARE=0``).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..ball._autograd import fc_output_sharing_terms, record_fc_nodes

__all__ = ["conv_norm", "fc_recompute_enabled", "set_fc_recompute"]

_STATE = {
    "enabled": os.environ.get("POINCARE_RESNET_FC_RECOMPUTE", "1") != "0",
    "share": os.environ.get("POINCARE_RESNET_FC_SHARE", "1") != "0",
}
_LOCAL = threading.local()


def set_fc_recompute(enabled: bool) -> None:
    """Turn the recomputation of :func:`conv_norm` on (the default) or off (``y`` is kept)."""
    _STATE["enabled"] = bool(enabled)


def fc_recompute_enabled() -> bool:
    """Whether :func:`conv_norm` recomputes the FC output in the norm's backward."""
    return _STATE["enabled"]


def set_fc_share(enabled: bool) -> None:
    """On the PyTorch path, let the recomputation hand the FC node's backward its terms (the
    default) or not (the node recomputes them: for before/after measurements and tests)."""
    _STATE["share"] = bool(enabled)


def fc_share_enabled() -> bool:
    """Whether :func:`conv_norm`'s recomputation shares its terms with the FC node's backward."""
    return _STATE["share"]


def record_fc(layer: nn.Module, inputs: tuple[Tensor, ...], out: Tensor) -> None:
    """Called by :class:`~.PoincareConv2d` with its FC map's inputs and output; kept only while
    :func:`conv_norm` listens (one conv call), otherwise a no-op."""
    if torch.compiler.is_compiling():
        return
    listener = getattr(_LOCAL, "listener", None)
    if listener is not None:
        listener.append((layer, inputs, out))


class _Slot:
    """Stands for a saved view of ``y``: its ``(size, stride, storage_offset)``."""

    __slots__ = ("layout",)

    def __init__(self, t: Tensor) -> None:
        self.layout = (t.shape, t.stride(), t.storage_offset())


class _Recompute:
    """The pack/unpack hooks that swap ``y`` for a slot and recompute it on first unpack."""

    def __init__(self, fc: Callable[[], Tensor], y: Tensor, node: tuple | None = None) -> None:
        self.fc = fc
        self.node = node  # (ctx, inputs) of y's FullyConnectedTangent node (PyTorch path)
        self.ptr, self.dtype, self.device = y.untyped_storage().data_ptr(), y.dtype, y.device
        self.shape, self.stride = y.shape, y.stride()
        dev = y.device.type
        self.autocast = (dev, torch.get_autocast_dtype(dev), torch.is_autocast_enabled(dev))
        self.cache: Tensor | None = None
        self.packed = self.left = 0

    def pack(self, t: Tensor) -> Tensor | _Slot:
        same = t.dtype == self.dtype and t.device == self.device
        if same and t.untyped_storage().data_ptr() == self.ptr:
            self.packed += 1
            self.left = self.packed
            return _Slot(t)
        # detached, as torch's docs advise: the tensor itself, when it is the saving node's
        # output, would close a cycle (node → saved variable → tensor → node) that the garbage
        # collector cannot see; a node the backward never runs (a parameter-only branch under
        # ``autograd.grad(loss, x)``: the attacks) then keeps it, these hooks and through them
        # the whole graph alive. Lossless: autograd puts the grad_fn back on unpack.
        return t.detach()

    def unpack(self, saved: Tensor | _Slot) -> Tensor:
        if isinstance(saved, Tensor):
            return saved
        if self.cache is None:
            self.cache = self._recompute()
        y = self.cache
        self.left -= 1
        if self.left == 0:  # every slot of this backward served: drop y (retain_graph refills)
            self.cache, self.left = None, self.packed
        return y.as_strided(*saved.layout)

    def _recompute(self) -> Tensor:
        dev, dtype, enabled = self.autocast
        y = None
        if self.node is not None and fc_share_enabled():
            with torch.autocast(dev, enabled=False):  # as inside the FC map's forward
                y = fc_output_sharing_terms(*self.node)
        if y is None:
            with torch.autocast(dev, dtype=dtype, enabled=enabled):
                y = self.fc()
        if y.dtype != self.dtype or y.shape != self.shape or y.stride() != self.stride:
            raise RuntimeError(
                "conv_norm: the recomputed FC output differs in dtype, shape or layout from the "
                f"forward's ({y.dtype}, {tuple(y.shape)}, {y.stride()} vs {self.dtype}, "
                f"{tuple(self.shape)}, {self.stride})"
            )
        return y


def _applies(norm: nn.Module) -> bool:
    return (
        fc_recompute_enabled()
        and torch.is_grad_enabled()
        and not isinstance(norm, nn.Identity)
        and not torch.compiler.is_compiling()
    )


def conv_norm(conv: nn.Module, norm: nn.Module, u: Tensor) -> Tensor:
    """``norm(conv(u))``, with ``conv``'s FC output recomputed in ``norm``'s backward.

    ``conv`` is called as a module (its hooks run); if a forward hook replaced its output, or
    ``conv`` is not a :class:`~.PoincareConv2d`, the output is kept as usual.

    Parameters
    ----------
    conv : nn.Module
        Usually a :class:`~.PoincareConv2d`.
    norm : nn.Module
        The layer applied to its output (e.g. :class:`~.PoincareBatchNorm2d`).
    u : Tensor
        ``conv``'s input.

    Returns
    -------
    Tensor
        ``norm(conv(u))``.
    """
    if torch.compiler.is_compiling():  # the hooks below do not trace: selective checkpointing
        from ._compile_recompute import compiled_conv_norm

        return compiled_conv_norm(conv, norm, u)
    if not _applies(norm):
        return norm(conv(u))
    records: list = []
    outer = getattr(_LOCAL, "listener", None)
    _LOCAL.listener = records
    try:
        with record_fc_nodes() as nodes:
            y = conv(u)
    finally:
        _LOCAL.listener = outer
    match = [(layer, inputs) for layer, inputs, out in records if out is y and layer is conv]
    if len(match) != 1:
        return norm(y)
    layer, inputs = match[0]
    node = [(ctx, args) for ctx, args in nodes if ctx is y.grad_fn]
    hooks = _Recompute(lambda: layer._fc(*inputs, dim=1), y, node[0] if len(node) == 1 else None)
    with torch.autograd.graph.saved_tensors_hooks(hooks.pack, hooks.unpack):
        return norm(y)
