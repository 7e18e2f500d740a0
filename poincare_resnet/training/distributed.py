"""``torch.distributed`` plumbing for ``torchrun`` launches (DDP; NCCL on GPUs, Gloo on CPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (if any).

    Parameters
    ----------
    device : torch.device
        The training device (NCCL for CUDA, Gloo for the CPU).

    Returns
    -------
    DistInfo
        This process's rank, the world size and the local rank (one process: the defaults).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def cleanup_distributed() -> None:
    """Leave the process group, if this process joined one (a no-op otherwise)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait until every process reaches this point.

    Parameters
    ----------
    info : DistInfo
        The run's processes; one process does not wait.
    """
    if info.enabled:
        dist.barrier()


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """Sum ``t`` over processes (a no-op for one process).

    Parameters
    ----------
    t : Tensor
        This process's value (not modified).
    info : DistInfo
        The run's processes.

    Returns
    -------
    Tensor
        The sum over processes (``t`` itself for one process).
    """
    if info.enabled:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, info: DistInfo, src: int = 0):
    """Send a picklable control object (never tensors of a checkpoint) from ``src`` to all.

    Parameters
    ----------
    obj : Any
        The object on rank ``src`` (ignored elsewhere).
    info : DistInfo
        The run's processes.
    src : int
        The sending rank.

    Returns
    -------
    Any
        ``src``'s object, on every rank.
    """
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
