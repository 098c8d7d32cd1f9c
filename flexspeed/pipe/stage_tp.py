"""Tensor parallelism inside pipeline stages: per-stage plans (validated before any collective) and their application.

Each of a rank's stage modules (:class:`~flexspeed.pipe.module.StageModule`, layers under
``layers.<index>``) is sharded over the tp mesh by the training TP path
(:func:`~flexspeed.distributed.tensor_parallel.apply_tensor_parallel`), then wrapped by ZeRO over
dp like a whole model (:mod:`flexspeed.pipe.zero_stages`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch.nn as nn
from torch.distributed.tensor.parallel import ParallelStyle

from flexspeed.config.errors import ConfigError
from flexspeed.distributed.collectives import broadcast_
from flexspeed.distributed.tensor_parallel import apply_tensor_parallel, derive_tp_plan, validate_tp_plan
from flexspeed.distributed.tp_discovery import find_layers

__all__ = ["stage_tp_plans", "apply_tensor_parallel_to_stages"]


def stage_tp_plans(stage_modules: list[nn.Module], tp_size: int, plan: Mapping[str, Any] | None = None,
                   num_layers: int | None = None) -> list[dict[str, Any] | None]:
    """The plan for each of a rank's pipeline stage modules (validated; nothing moves).

    A stage module holds its layers as ``layers.<index>``; a user ``plan`` names the
    ``PipelineModule``'s own (canonical) names, ``"<index>.<submodule>"``, and each stage takes
    the entries of its layers. Without a plan each stage's is derived; a stage with no splittable
    layer (e.g. only an output head) runs replicated over tp (``None``).

    Raises:
        ConfigError: a plan entry that does not start with a layer index, or a stage whose layers
            tp does not divide (naming the module, the numbers and the fix) - before any collective.
    """
    if plan is not None:
        for name in plan:
            head = str(name).partition(".")[0]
            if not head.isdigit() or (num_layers is not None and int(head) >= num_layers):
                raise ConfigError(f"the tensor-parallel plan names {name!r}; with a PipelineModule plan names are "
                                  f"'<layer index>.<submodule>' (layer index 0..{(num_layers or 1) - 1}), as in "
                                  "PipelineModule.named_modules()", key=f"plan[{name!r}]")
        # what a stage sends to the next must be whole: a layer that splits (column) must also join (row)
        kinds: dict[str, set[str]] = {}
        for name, style in plan.items():
            kind = str(style).lower() if not isinstance(style, ParallelStyle) else type(style).__name__.lower()
            kinds.setdefault(str(name).partition(".")[0], set()).add("col" if "col" in kind else "row")
        for layer, seen in sorted(kinds.items()):
            if seen == {"col"}:
                raise ConfigError(f"the tensor-parallel plan splits layer {layer}'s outputs (colwise) but joins none "
                                  "of them (no rowwise module in that layer), so the layer would hand a tp shard to "
                                  "the next one, possibly on another pipeline stage. Fix: pair each colwise entry "
                                  f"with the rowwise module that consumes it inside layer {layer}",
                                  key=f"plan[{layer!r}]")
    out: list[dict[str, Any] | None] = []
    for sm in stage_modules:
        if plan is not None:
            own = {f"layers.{k}": v for k, v in plan.items() if str(k).partition(".")[0] in sm.layers}
            if own:
                validate_tp_plan(sm, own, tp_size)  # validates
            out.append(own or None)
            continue
        _, rows = find_layers(sm, None)
        if not rows:
            out.append(None)
            continue
        derive_tp_plan(sm, tp_size)  # validates
        out.append({})  # derive again when applying (the styles are stateful objects)
    return out


def apply_tensor_parallel_to_stages(stage_modules: list[nn.Module], tp_mesh: Any,
                                    plans: list[dict[str, Any] | None]) -> list[str]:
    """Shard each stage module over ``tp_mesh`` with its plan from :func:`stage_tp_plans`; one note per stage."""
    notes = []
    for sm, plan in zip(stage_modules, plans):
        if plan is None:
            # nothing to split: the stage runs replicated over tp, from tp rank 0's weights
            broadcast_([*sm.parameters(), *sm.buffers()], tp_mesh.get_group(), group_src=0)
            notes.append(f"pipeline stage {sm.stage_id}: no splittable layer, replicated over tp={tp_mesh.size()}")
            continue
        applied = apply_tensor_parallel(sm, tp_mesh, plan or None)
        notes.append(f"pipeline stage {sm.stage_id}: tensor parallelism {applied.describe()}")
    return notes
