"""ZeRO for a pipeline: each stage module gets ``apply_zero(..., group=dp)``, as a whole model would.

A rank of a pipeline runs one ``StageModule`` per local chunk (more than one with the interleaved
schedule). Each is wrapped by :func:`flexspeed.runtime.zero.apply_zero` over the data-parallel
group - DDP at stage 0, DDP plus the sharded optimizer at stage 1, FSDP2 at stages 2 and 3 - and
``torch.distributed.pipelining`` drives the wrappers as it documents: no gradient reduction until
the last micro-batch's backward (DDP), or accumulation of unsharded gradients and one
reduce-scatter per step (FSDP2). :class:`StageStrategies` presents the per-chunk strategies to
the engine as one ``ZeroStrategy`` over the ``PipelineModule``: the parameters, the optimizer
(built once over all chunks), the hooks.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from flexspeed.config.errors import ConfigError
from flexspeed.runtime.fsdp import FullyShardedDP
from flexspeed.runtime.zero import OptimizerFactory, ShardedOptimizerDP, ZeroStrategy, apply_zero, check_shardable

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from flexspeed.config.schema import FlexConfig
    from flexspeed.pipe.module import PipelineModule

__all__ = ["StageStrategies", "apply_zero_to_stages"]


def _refuse_chunk_sharing(module: PipelineModule, stage: int, dp: int) -> None:
    """A parameter held by two local chunks (a tied layer twice on one rank) cannot be wrapped twice."""
    chunks = module.stage_modules
    if len(chunks) < 2 or (stage < 2 and dp == 1):
        return
    seen: dict[int, int] = {}
    for sm in chunks:
        for name, p in sm.named_parameters():
            if id(p) in seen and seen[id(p)] != sm.stage_id:
                raise ConfigError(
                    f"parameter {name!r} is used by pipeline stages {seen[id(p)]} and {sm.stage_id}, which both run "
                    f"on this rank (virtual_stages={module.virtual_stages}); with zero_optimization.stage={stage} "
                    f"over {dp} data-parallel rank(s) each stage's module is wrapped once, so a parameter cannot be "
                    "in two of them. Fix: put the tied layers on different pipeline ranks (partition_method or "
                    "num_stages), use pipeline.virtual_stages=1, or zero_optimization.stage 0/1 with one replica",
                    key="zero_optimization.stage")
            seen[id(p)] = sm.stage_id


def apply_zero_to_stages(module: PipelineModule, *, config: FlexConfig, device: torch.device,
                         dp_mesh: DeviceMesh, tensor_parallel: bool = False) -> StageStrategies:
    """Wrap each local stage module with ``apply_zero(..., group=group)``.

    Args:
        module: the built ``PipelineModule`` (this rank's layers, on ``device``).
        config: the resolved config (``zero_optimization`` is read by ``apply_zero``).
        device: this rank's device.
        dp_mesh: the data-parallel sub-mesh of the job's ``ParallelDims`` (the ranks holding the same stages).
        tensor_parallel: the stage modules were sharded over tp (``apply_tensor_parallel``) before: stages 0-1
            take :class:`~flexspeed.distributed.tensor_parallel.TensorParallelDP` (DDP does not take DTensor
            parameters), stages 2-3 FSDP2 over ``dp_mesh`` on the 2-D DTensors, as the data-parallel engine does.
    Returns:
        one strategy over all local stages.
    Raises:
        ConfigError: a parameter shared by two local chunks at a stage that wraps each chunk.
    """
    stage = config.zero_optimization.stage
    group = dp_mesh.get_group()
    _refuse_chunk_sharing(module, stage, dist.get_world_size(group))
    if tensor_parallel and stage < 2:
        from flexspeed.distributed.tensor_parallel import TensorParallelDP
        from flexspeed.runtime.zero import ZeroSettings, check_offload

        settings = ZeroSettings.from_config(config)
        notes: list[str] = []
        check_offload(settings, device, notes)
        parts: list[ZeroStrategy] = [TensorParallelDP(sm, stage=stage, group=group, settings=settings, notes=notes)
                                     for sm in module.stage_modules]
    else:
        parts = [apply_zero(sm, config=config, device=device, mesh=dp_mesh) for sm in module.stage_modules]
    return StageStrategies(parts, module=module, group=group, tensor_parallel=tensor_parallel)


class StageStrategies(ZeroStrategy):
    """The ZeRO strategies of a rank's stage modules, driven as one (see the module docstring)."""

    # stages 2-3: the optimizer is re-pointed at the sharded parameters of every chunk with
    # FullyShardedDP's own logic, over the merged parameter map of the chunks
    _map_one = FullyShardedDP._map_one
    _current_ids = FullyShardedDP._current_ids
    _repoint = FullyShardedDP._repoint
    _fsdp_params = FullyShardedDP._fsdp_params

    def __init__(self, parts: list[ZeroStrategy], *, module: torch.nn.Module, group: dist.ProcessGroup,
                 tensor_parallel: bool = False) -> None:
        stage = parts[0].stage
        super().__init__(stage=stage, module=module, model=module, group=group,
                         notes=[n for p in parts for n in p.notes])
        self.parts = parts
        self.tensor_parallel = tensor_parallel
        self._param_map: dict[int, torch.Tensor] = {}
        self._persistent: list[torch.Tensor] = []
        for part in parts:
            self._param_map.update(getattr(part, "_param_map", {}))
            self._persistent += list(getattr(part, "_persistent", []))

    def stage_model(self, index: int) -> torch.nn.Module:
        """What ``PipelineStage`` runs for local chunk ``index``: the wrapped (or sharded) stage module."""
        return self.parts[index].model

    # ---- the engine's interface ------------------------------------------------------------------
    def set_requires_gradient_sync(self, enabled: bool) -> None:
        """The pipeline schedule switches reduction per micro-batch itself (see the module docstring)."""

    def after_backward(self) -> None:
        """After the whole schedule: the reductions the wrappers leave (whole parameters at stage 3), rounding."""
        for part in self.parts:
            part.set_requires_gradient_sync(True)
            part.after_backward()

    def grad_group(self) -> dist.ProcessGroup | None:
        return None  # every stage of every replica must agree on an overflow: the world

    def after_step(self) -> None:
        for part in self.parts:
            part.after_step()

    @contextlib.contextmanager
    def local_optimizer_steps(self) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for part in self.parts:
                stack.enter_context(part.local_optimizer_steps())
            yield

    # ---- the optimizer ---------------------------------------------------------------------------
    def map_params(self, params: Iterable) -> list:
        if self.stage >= 2:
            return FullyShardedDP.map_params(self, params)
        return list(params)

    def build_optimizer(self, client: torch.optim.Optimizer | None, factory: OptimizerFactory | None,
                        allow_untested: bool = False) -> torch.optim.Optimizer | None:
        """One optimizer over every local chunk's parameters (sharded as the stage says)."""
        if self.stage >= 2:
            optimizer = FullyShardedDP.build_optimizer(self, client, factory, allow_untested)
            return self._one_kind_per_foreach(optimizer)
        if client is not None:
            optimizer = client
        elif factory is not None:
            optimizer = factory(list(self.module.parameters()))
        else:
            return None
        check_shardable(optimizer, self.stage, allow_untested)
        first = self.parts[0]
        if self.stage == 1 and isinstance(first, ShardedOptimizerDP) and dist.get_world_size(self.group) > 1:
            first._shard(optimizer)  # partitions the optimizer's parameters of all chunks over the replicas
        return self._one_kind_per_foreach(optimizer)

    def _one_kind_per_foreach(self, optimizer: torch.optim.Optimizer | None) -> torch.optim.Optimizer | None:
        """Tensor-parallel stages mix DTensor (sharded) and plain (replicated) parameters, which one foreach
        kernel cannot take together (as the data-parallel engine's TP path does)."""
        if optimizer is not None and self.tensor_parallel:
            from flexspeed.runtime.fsdp import no_foreach_across_kinds

            no_foreach_across_kinds(optimizer)
        return optimizer

    # ---- memory ----------------------------------------------------------------------------------
    def memory_breakdown(self, optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
        if self.stage >= 2:
            return FullyShardedDP.memory_breakdown(self, optimizer)
        return super().memory_breakdown(optimizer)

    def describe(self) -> str:
        """One line: the stage and what wraps each local chunk."""
        kinds = ", ".join(type(p).__name__ for p in self.parts)
        return f"ZeRO stage {self.stage} over {dist.get_world_size(self.group)} replica(s); chunks: {kinds}"

