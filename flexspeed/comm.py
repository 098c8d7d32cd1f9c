"""Collectives with DeepSpeed's ``deepspeed.comm`` names, over ``torch.distributed``.

Rank and size queries answer for a single process (rank 0, size 1) when no group exists, so
library code can call them unconditionally.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from torch.distributed import ReduceOp

from flexspeed.distributed import init_distributed

__all__ = [
    "ReduceOp", "init_distributed", "is_initialized", "is_available", "get_rank", "get_world_size",
    "get_local_rank", "get_global_rank", "get_backend", "barrier", "monitored_barrier", "all_reduce",
    "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "reduce", "gather",
    "scatter", "all_to_all_single", "send", "recv", "isend", "irecv", "new_group", "destroy_process_group",
    "broadcast_object_list", "all_gather_object",
]

is_available = dist.is_available
is_initialized = dist.is_initialized
barrier = dist.barrier
monitored_barrier = dist.monitored_barrier
all_reduce = dist.all_reduce
broadcast = dist.broadcast
all_gather = dist.all_gather
all_gather_into_tensor = dist.all_gather_into_tensor
reduce_scatter_tensor = dist.reduce_scatter_tensor
reduce = dist.reduce
gather = dist.gather
scatter = dist.scatter
all_to_all_single = dist.all_to_all_single
send, recv, isend, irecv = dist.send, dist.recv, dist.isend, dist.irecv
new_group = dist.new_group
broadcast_object_list = dist.broadcast_object_list
all_gather_object = dist.all_gather_object
get_global_rank = dist.get_global_rank


def get_rank(group: dist.ProcessGroup | None = None) -> int:
    """This process's rank in ``group`` (0 when no process group exists)."""
    return dist.get_rank(group) if dist.is_initialized() else 0


def get_world_size(group: dist.ProcessGroup | None = None) -> int:
    """Size of ``group`` (1 when no process group exists)."""
    return dist.get_world_size(group) if dist.is_initialized() else 1


def get_local_rank() -> int:
    """Rank on this node, from the launcher's ``LOCAL_RANK`` (0 without one)."""
    return int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", 0))))


def get_backend(group: dist.ProcessGroup | None = None) -> str | None:
    """The backend of ``group``, or ``None`` without a process group."""
    return dist.get_backend(group) if dist.is_initialized() else None


def destroy_process_group(group: dist.ProcessGroup | None = None) -> None:
    """Tear down ``group`` (the default group when ``None``), if it exists."""
    if dist.is_initialized():
        dist.destroy_process_group(group)


def all_reduce_mean(tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """In-place mean over ``group``; a no-op for one process."""
    if get_world_size(group) > 1:
        dist.all_reduce(tensor, group=group)
        tensor.div_(get_world_size(group))
    return tensor
