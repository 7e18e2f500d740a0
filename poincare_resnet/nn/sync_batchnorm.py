"""Poincaré batch norm with statistics synchronised over ``torch.distributed`` processes."""

from __future__ import annotations

import torch.distributed as dist
from torch import Tensor, nn

from .batchnorm import PoincareBatchNorm2d


class PoincareSyncBatchNorm2d(PoincareBatchNorm2d):
    """:class:`PoincareBatchNorm2d` whose batch statistics are all-reduced across processes.

    The midpoint sums ``(Σγ²x, Σγ², N)`` and the variance sums ``(Σd², N)`` are summed over the
    default process group with a differentiable all-reduce, so N processes with per-process
    batch b normalise exactly as one process with batch N·b, in the forward and backward pass.
    Without an initialised process group it behaves like :class:`PoincareBatchNorm2d`.
    """

    synchronized = True

    def _all_reduce(self, t: Tensor) -> Tensor:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            from torch.distributed.nn.functional import all_reduce

            return all_reduce(t)
        return t


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Return ``module`` with every :class:`PoincareBatchNorm2d` replaced by its synchronised
    version (parameters, buffers and the shared curvature kept) and every Euclidean
    ``BatchNorm*d`` converted by ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``."""
    module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _convert_poincare(module)


def _convert_poincare(module: nn.Module) -> nn.Module:
    if isinstance(module, PoincareBatchNorm2d) and not isinstance(module, PoincareSyncBatchNorm2d):
        new = PoincareSyncBatchNorm2d.__new__(PoincareSyncBatchNorm2d)
        nn.Module.__init__(new)
        new.__dict__.update(
            {
                k: v
                for k, v in module.__dict__.items()
                if k not in ("_parameters", "_buffers", "_modules")
            }
        )
        new._parameters = module._parameters
        new._buffers = module._buffers
        new._modules = module._modules
        return new
    for name, child in module.named_children():
        setattr(module, name, _convert_poincare(child))
    return module


__all__ = ["PoincareSyncBatchNorm2d", "convert_sync_batchnorm"]
