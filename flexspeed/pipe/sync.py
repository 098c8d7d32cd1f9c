"""Collectives the pipeline engine runs between ``train_batch`` schedule and optimizer step.

- tied weights: summed over the stages of one pipeline that hold a copy (``TiedLayerSpec``);
- data parallel: gradients averaged over the ``dp`` mesh dimension;
- global gradient norm: squared norms summed over the ``pp`` dimension (each tied weight
  counted once), so clipping sees the norm of the whole model;
- ZeRO stage 1: each data-parallel rank keeps optimizer state only for the parameters it owns,
  steps those, and broadcasts them to the other replicas.

Tensors are flattened per dtype into one buffer per collective (:mod:`flexspeed.distributed.collectives`),
so the message count does not grow with the number of layers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from flexspeed.distributed.collectives import all_reduce_, broadcast_, by_dtype, grads_or_zeros

__all__ = ["by_dtype", "all_reduce_", "broadcast_", "grads_or_zeros", "ZeroOneSharding"]


class ZeroOneSharding:
    """ZeRO stage 1 over the data-parallel group: optimizer state for owned parameters only.

    Parameters are assigned to data-parallel ranks greedily by size (largest first to the
    least loaded rank), the same on every rank. ``restrict(optimizer)`` removes the parameters
    this rank does not own from the optimizer's param groups in place (so its ``step()``
    creates and updates state only for its shard and LR schedulers keep working on the same
    object); ``broadcast_updates()`` sends each shard's new values to the other replicas.
    """

    def __init__(self, params: Sequence[torch.nn.Parameter], group: dist.ProcessGroup) -> None:
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.params = list(params)
        order = sorted(range(len(self.params)), key=lambda i: (-self.params[i].numel(), i))
        load = [0] * self.size
        self.owner: dict[int, int] = {}
        for i in order:
            r = min(range(self.size), key=lambda k: (load[k], k))
            self.owner[id(self.params[i])] = r
            load[r] += self.params[i].numel()
        self.load = load

    def owns(self, p: torch.Tensor) -> bool:
        return self.owner.get(id(p), self.rank) == self.rank

    def restrict(self, optimizer: torch.optim.Optimizer) -> None:
        """Keep only owned parameters in ``optimizer`` (and drop any state of the others)."""
        for group in optimizer.param_groups:
            kept = [p for p in group["params"] if self.owns(p)]
            for p in group["params"]:
                if not self.owns(p):
                    optimizer.state.pop(p, None)
            group["params"] = kept

    def broadcast_updates(self) -> None:
        """After the step: every replica receives every shard's updated values."""
        if self.size == 1:
            return
        for r in range(self.size):
            shard = [p for p in self.params if self.owner[id(p)] == r]
            broadcast_(shard, self.group, group_src=r)
