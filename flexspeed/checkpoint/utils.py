"""``deepspeed.checkpoint.utils``: ``clone_tensors_for_torch_save``.

Accelerate calls it on ``model.state_dict()`` before saving at ZeRO stages 0-2, where DeepSpeed's
parameters are whole tensors, as flexspeed's are (stage 2 included). Where parameters are FSDP2
DTensor shards (stage 3, stage 2 with CPU offload on an accelerator, tensor parallelism), a
DTensor is gathered into its whole value first (a collective: every rank of its mesh calls this with
the same tensors, as every rank calls ``Accelerator.get_state_dict``).
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["clone_tensors_for_torch_save"]


def clone_tensors_for_torch_save(item: Any, device: torch.device | str = torch.device("cpu")) -> Any:
    """A copy of ``item`` with every tensor in it (nested lists, tuples, dicts) cloned onto ``device``.

    Args:
        item: a tensor, or a (possibly nested) list/tuple/dict holding tensors; other values are kept.
        device: where the copies live (default CPU).
    Returns:
        the same structure (dict subclasses keep their type) with detached copies that share no storage
        with the originals.
    """
    if torch.is_tensor(item):
        from torch.distributed.tensor import DTensor

        device = torch.device(device)
        if isinstance(item, DTensor):
            return item.detach().full_tensor().to(device)
        return item.detach().clone() if item.device == device else item.detach().to(device)
    if isinstance(item, list):
        return [clone_tensors_for_torch_save(v, device) for v in item]
    if isinstance(item, tuple):
        return tuple(clone_tensors_for_torch_save(v, device) for v in item)
    if isinstance(item, dict):
        return type(item)({k: clone_tensors_for_torch_save(v, device) for k, v in item.items()})
    return item
