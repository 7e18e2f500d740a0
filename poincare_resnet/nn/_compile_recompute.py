""":func:`~poincare_resnet.nn.conv_norm` under ``torch.compile``: the FC output recomputed in
the compiled backward, by selective activation checkpointing.

The saved-tensor hooks of the eager :func:`~poincare_resnet.nn.conv_norm` do not trace. In the
compiled graph the batch norm's backward reads the convolution's FC output ``y`` like any saved
tensor, and the min-cut partitioner keeps it: on the native path the FC map is an opaque
custom op (``poincare_resnet::fc_forward``), which the partitioner never recomputes; on the
PyTorch path it recomputes ``y`` but keeps per-pixel terms of the FC chain. Here the
convolution ``conv(u)`` runs inside :func:`torch.utils.checkpoint.checkpoint` with a selective
policy (:func:`torch.utils.checkpoint.create_selective_checkpoint_contexts`): the
``aten.convolution`` output (the FC node's ``dots``) is ``MUST_SAVE``, every other op of the
layer (the weight normalisation, ``‖p‖²``'s window sums, the FC map, native or PyTorch)
``PREFER_RECOMPUTE``, which the partitioner treats as "must recompute": the compiled backward
keeps ``dots`` and the layer's input (which the convolution's backward needs anyway) and reruns
the element-wise rest, as the eager backward does, where it is needed. The batch norm stays
outside the checkpointed region (its running statistics are updated once).

Only where the FC map takes the native kernel. On the PyTorch path (GPU tensors, native
kernels off) the partitioner already recomputes ``y`` from its element-wise chain, and the
checkpointed region made the compiled ResNet-20 step slower (5.79× → 7.09× the Euclidean one)
with a higher peak (1.95× → 2.74×; ``docs/performance.md``, session 9): there the pair is
compiled as plain ``norm(conv(u))``.
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from ._dispatch import full_precision
from ._native_fc import native_fc_tangent_applicable
from .conv import PoincareConv2d
from .recompute import fc_recompute_enabled

__all__ = ["compiled_conv_norm", "keep_convolution_policy"]

_CONVOLUTION = torch.ops.aten.convolution.default


def keep_convolution_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """The selective-checkpoint policy: keep the convolution's output, recompute the rest.

    Parameters
    ----------
    ctx : torch.utils.checkpoint.SelectiveCheckpointContext
        Unused.
    op : torch._ops.OpOverload
        The operator about to run in the checkpointed region.
    *args, **kwargs
        Its arguments (unused).

    Returns
    -------
    CheckpointPolicy
        ``MUST_SAVE`` for ``aten.convolution``, ``PREFER_RECOMPUTE`` otherwise.
    """
    if op is _CONVOLUTION:
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


_CONTEXT = functools.partial(create_selective_checkpoint_contexts, keep_convolution_policy)


def _applies(conv: nn.Module, norm: nn.Module, u: Tensor) -> bool:
    return (
        fc_recompute_enabled()
        and torch.is_grad_enabled()
        and isinstance(conv, PoincareConv2d)
        and not isinstance(norm, nn.Identity)
        and _native_fc(conv, u)
    )


def _native_fc(conv: PoincareConv2d, u: Tensor) -> bool:
    """Whether ``conv``'s FC map takes the native kernel (its ``dots`` has ``u``'s device,
    dtype after :func:`full_precision` and number of dims: an empty tensor of those stands in,
    so that the check casts nothing)."""
    if conv.legacy_lambda:
        return False
    dtype = full_precision(u[:0]).dtype
    probe = u.new_empty((0,) * u.dim(), dtype=dtype)
    return native_fc_tangent_applicable(probe, conv.curvature(), 1)


def compiled_conv_norm(conv: nn.Module, norm: nn.Module, u: Tensor) -> Tensor:
    """``norm(conv(u))`` with ``conv`` checkpointed by :func:`keep_convolution_policy`; called
    by :func:`~poincare_resnet.nn.conv_norm` while ``torch.compile`` traces it. Plain
    ``norm(conv(u))`` as in eager: for a ``conv`` other than a :class:`~.PoincareConv2d`, an
    identity ``norm``, an FC map off the native kernel (the PyTorch path), without autograd, or
    with :func:`~.set_fc_recompute` off.

    Parameters
    ----------
    conv : nn.Module
        Usually a :class:`~.PoincareConv2d`.
    norm : nn.Module
        The layer applied to its output, outside the checkpointed region.
    u : Tensor
        ``conv``'s input.

    Returns
    -------
    Tensor
        ``norm(conv(u))``, the same values and gradients.

    Shapes
    ------
    ``u [B, C_in, H, W]`` → ``conv``'s output shape ``[B, C_out, H', W']``.
    """
    if not _applies(conv, norm, u):
        return norm(conv(u))
    return norm(checkpoint(conv, u, use_reentrant=False, context_fn=_CONTEXT))
