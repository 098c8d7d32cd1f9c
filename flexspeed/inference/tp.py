"""Automatic tensor parallelism for models built from ``nn.Linear`` (and HF ``Conv1D``).

Megatron-style splitting, found from the module tree instead of a per-architecture policy:
inside an attention or MLP module, the layers that read the replicated hidden state are
*column-parallel* (each rank keeps a contiguous block of output features, i.e. whole heads),
and the layer that writes back to the residual stream is *row-parallel* (each rank keeps the
matching block of input features; the partial outputs are summed by one all-reduce). Nothing
else changes: embeddings, norms and ``lm_head`` stay replicated, and the module tree, names and
classes are kept, so later passes (quantization, kernel injection, layer-by-layer streaming)
see ordinary ``nn.Linear`` modules holding ordinary (local) tensors.

Why local tensors plus an explicit all-reduce instead of DTensor's ``parallelize_module``:
the result is exact on gloo/CPU, every parameter stays a plain tensor that quantization can
replace, and checkpoint slices can be loaded straight into it. The TP group still comes from
a :class:`~torch.distributed.device_mesh.DeviceMesh` (see ``engine.py``).

The plan comes from the discovery shared with training TP, :mod:`flexspeed.distributed.tp_discovery`
(detection rules, head bookkeeping, validation); this module shards local tensors from it.
See docs/inference.md.
"""

from __future__ import annotations

import weakref
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from flexspeed.distributed.tp_discovery import (
    COLUMN_NAMES,
    ROW_NAMES,
    AttentionShard,
    Placement,
    TensorParallelPlan,
    is_conv1d,
    is_linear,
    linear_features,
    localize_attention,
    plan_tensor_parallel,
)

__all__ = [
    "COLUMN_NAMES",
    "ROW_NAMES",
    "Placement",
    "AttentionShard",
    "TensorParallelPlan",
    "plan_tensor_parallel",
    "shard_module",
    "apply_tensor_parallel",
    "localize_attention",
    "is_linear",
    "take",
    "tp_size_of",
]

# ----------------------------------------------------------------------------------------- sharding

_SHARDED: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()


def tp_size_of(model: nn.Module) -> int:
    """The tensor-parallel degree :func:`shard_module` split ``model`` for (1 if it did not)."""
    try:
        return _SHARDED.get(model, 1)
    except TypeError:
        return 1


def take(tensor: torch.Tensor, placement: Placement, rank: int, tp: int) -> torch.Tensor:
    """This rank's part of a full ``tensor`` (a new tensor; meta stays meta)."""
    if placement.kind == "rank0":
        return tensor.clone() if rank == 0 else torch.zeros_like(tensor)
    if tensor.is_meta:
        return torch.empty(placement.local_shape(tensor.shape, tp), dtype=tensor.dtype, device="meta")
    parts = [tensor.narrow(placement.dim, a, b - a) for a, b in placement.ranges(rank, tp)]
    return torch.cat(parts, dim=placement.dim).contiguous()


def shard_module(model: nn.Module, plan: TensorParallelPlan, rank: int) -> None:
    """Replace the planned parameters by this rank's parts and fix the per-rank attributes.

    Safe on a meta model (parameters become meta tensors of the local shape, to be filled by
    :func:`flexspeed.inference.loading.load_checkpoint`).
    """
    if plan.tp_size == 1:
        return
    if tp_size_of(model) != 1:
        raise RuntimeError("this model is already split for tensor parallelism; build a fresh one")
    replaced: dict[int, nn.Parameter] = {}
    for fqn, placement in plan.params.items():
        owner_name, _, pname = fqn.rpartition(".")
        owner = model.get_submodule(owner_name)
        old = owner._parameters[pname]
        assert old is not None, fqn
        if id(old) not in replaced:
            replaced[id(old)] = nn.Parameter(take(old.data, placement, rank, plan.tp_size),
                                             requires_grad=old.requires_grad)
        owner._parameters[pname] = replaced[id(old)]
    for name in plan.column + plan.row:
        mod = model.get_submodule(name)
        n_in, n_out = linear_features(mod)
        if is_conv1d(mod):
            mod.nx, mod.nf = n_in, n_out
        else:
            mod.in_features, mod.out_features = n_in, n_out
    localize_attention(model, plan)
    _SHARDED[model] = plan.tp_size  # flexspeed's weak table, not an attribute of the model


def apply_tensor_parallel(model: nn.Module, tp_size: int, *, rank: int | None = None,
                          group: dist.ProcessGroup | None = None,
                          injection_policy: Mapping[Any, tuple[str, ...]] | None = None) -> TensorParallelPlan:
    """Plan, shard and hook ``model`` in place for ``tp_size`` ranks of ``group``.

    Args:
        model: a model holding its full weights (all ranks hold the same values).
        tp_size: TP degree; must equal the size of ``group``.
        rank: this process's rank in ``group`` (default: from ``group``).
        group: the TP process group (default: the world).
        injection_policy: optional ``{block class: (row-parallel child names)}``.
    Returns:
        the plan (its :meth:`TensorParallelPlan.attach` re-hooks replaced modules).
    """
    plan = plan_tensor_parallel(model, tp_size, injection_policy)
    if tp_size > 1:
        rank = dist.get_rank(group) if rank is None else rank
        shard_module(model, plan, rank)
        plan.attach(model, group)
    return plan
