"""A second ``initialize()`` at ZeRO stage 3 on a model an earlier one already sharded.

FSDP2 shards a module once (``fully_shard`` refuses a second application). DeepSpeed lets a script
build a new engine on the same model (its checkpoint tests do: train, save, build a second engine,
load). At stage 3 the module's FSDP2 state is the sharding itself, so the new engine adopts it as
it is: the same parameters (DTensor shards, and the whole ones below the persistence threshold),
the same blocks and hooks; only the optimizer, scheduler and counters are new. The first engine
should no longer be used (both would drive the one set of parameters).

Adopting is refused, with the fix, when the new config asks for a different sharding: another
data-parallel size, or another ``stage3_param_persistence_threshold`` split.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn

from flexspeed.runtime.fsdp import FullyShardedDP, dp_mesh, find_blocks, persistent_params, unit_handles
from flexspeed.runtime.zero import ZeroSettings, ZeroStrategy

__all__ = ["is_fsdp_sharded", "AdoptedFullyShardedDP"]


def is_fsdp_sharded(module: nn.Module) -> bool:
    """Whether FSDP2 (an earlier ``initialize()`` at stage 3, or the user) sharded ``module`` or a part of it."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in module.modules())


def _refusal(detail: str) -> ValueError:
    return ValueError(f"initialize() got a model an earlier initialize() already sharded at ZeRO stage 3, and "
                      f"{detail}. FSDP2 shards a module once. Fix: build a fresh model for the second engine, or "
                      "give it the first engine's zero_optimization settings (stage 3, same data-parallel size and "
                      "stage3_param_persistence_threshold)")


class AdoptedFullyShardedDP(FullyShardedDP):
    """Stage 3 over a module FSDP2 already sharded: the sharding is taken as it is (see the module doc)."""

    def __init__(self, module: nn.Module, *, stage: int, device: torch.device, group: dist.ProcessGroup | None,
                 settings: ZeroSettings, notes: list[str] | None = None) -> None:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        if stage != 3 or not isinstance(module, FSDPModule):
            raise _refusal(f"the new config asks for zero_optimization.stage={stage}" if stage != 3 else
                           "its root module is not sharded (only a part of it is)")
        ZeroStrategy.__init__(self, stage=stage, module=module, model=module, group=group, notes=list(notes or []),
                              grad_accum_dtype=settings.grad_accum_dtype)
        sharded = [p for p in module.parameters() if isinstance(p, DTensor)]
        # every parameter below the persistence threshold: nothing sharded, a mesh over the same group
        self.mesh = sharded[0].device_mesh if sharded else dp_mesh(device, group)
        self._world = self.mesh.size()
        want = dist.get_world_size(group) if dist.is_initialized() else 1
        if self._world != want:
            raise _refusal(f"it was sharded over {self._world} ranks, the new engine's data-parallel group has {want}")
        whole = [p for p in module.parameters() if not isinstance(p, DTensor)]
        expected = persistent_params(module, settings.persistence_threshold, settings.persistence_cap)
        if {id(p) for p in whole} != {id(p) for p in expected}:
            raise _refusal(f"its {len(whole)} whole (persistent) parameter(s) differ from the "
                           f"{len(expected)} that stage3_param_persistence_threshold="
                           f"{settings.persistence_threshold} keeps whole")
        self._comm_dtype = settings.comm_dtype
        self._sync = True
        self._persistent = whole
        self._param_map = {}  # the parameters are already the sharded ones
        self.blocks = find_blocks(module)
        self.units = unit_handles(self.blocks)
        self._explain_ignored_knobs(settings)
        self.notes.append("adopted the FSDP2 sharding an earlier initialize() made (the first engine should no "
                          "longer be used)")
        if settings.prefetch_bucket_size is not None:
            self._set_prefetch(settings.prefetch_bucket_size)
