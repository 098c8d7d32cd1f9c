"""Flat-buffer collectives over lists of tensors: one message per (device, dtype), not per tensor.

Used wherever a list of tensors must agree across a process group: the engines' initial weights
(rank 0's everywhere), the pipeline's tied and data-parallel gradients, ZeRO-1 parameter updates.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

__all__ = ["by_dtype", "all_reduce_", "broadcast_", "grads_or_zeros"]


def _locals(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The locally held part of each tensor (a DTensor's shard; plain tensors as they are)."""
    return [t.to_local() if hasattr(t, "to_local") else t for t in tensors]


def by_dtype(tensors: Sequence[torch.Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` grouped by (device, dtype), in first-seen order."""
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return list(groups.values())


def all_reduce_(tensors: Sequence[torch.Tensor], group: dist.ProcessGroup | None, *, average: bool = False) -> None:
    """Sum (or average) ``tensors`` in place over ``group``, one flat buffer per dtype."""
    size = dist.get_world_size(group)
    if size == 1 or not tensors:
        return
    tensors = _locals(tensors)
    for idx in by_dtype(tensors):
        chunk = [tensors[i] for i in idx]
        flat = _flatten_dense_tensors(chunk)
        dist.all_reduce(flat, group=group)
        if average:
            flat.div_(size)
        for t, new in zip(chunk, _unflatten_dense_tensors(flat, chunk)):
            t.copy_(new)


def broadcast_(tensors: Sequence[torch.Tensor], group: dist.ProcessGroup | None, group_src: int) -> None:
    """Overwrite ``tensors`` with those of rank ``group_src`` of ``group``, one buffer per dtype."""
    if dist.get_world_size(group) == 1 or not tensors:
        return
    src = dist.get_global_rank(group, group_src) if group is not None else group_src
    with torch.no_grad():
        tensors = _locals(tensors)
    for idx in by_dtype(tensors):
        chunk = [tensors[i] for i in idx]
        flat = _flatten_dense_tensors([t.detach() for t in chunk])
        dist.broadcast(flat, src=src, group=group)
        with torch.no_grad():
            for t, new in zip(chunk, _unflatten_dense_tensors(flat, chunk)):
                t.copy_(new)


def grads_or_zeros(params: Sequence[torch.nn.Parameter]) -> list[torch.Tensor]:
    """Each parameter's gradient, creating a zero one where backward produced none.

    Every rank of a collective must contribute the same tensors, also for a parameter this
    rank's micro-batches did not reach.
    """
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    return [p.grad for p in params]
