"""Where each rank sits in the pipeline x data-parallel grid.

The world is a ``(dp, pp)`` ``DeviceMesh``: ``rank = dp_index * num_stages + stage_id``, so the
stages of one pipeline are consecutive ranks (neighbours in a node exchange activations, the
high-volume traffic) and each data-parallel group strides across pipelines.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

__all__ = ["PipeTopology", "PipeDataParallelTopology", "resolve_topology", "build_pipe_mesh"]


@dataclass(frozen=True)
class PipeTopology:
    """A ``num_stages`` x ``num_dp`` grid of ranks (pipeline stages x data-parallel replicas)."""

    num_stages: int
    num_dp: int = 1

    def __post_init__(self) -> None:
        if self.num_stages < 1 or self.num_dp < 1:
            raise ValueError(f"PipeTopology(num_stages={self.num_stages}, num_dp={self.num_dp}): both must be >= 1")

    @property
    def world_size(self) -> int:
        return self.num_stages * self.num_dp

    def rank_of(self, stage_id: int, dp_index: int) -> int:
        """Global rank of pipeline stage ``stage_id`` in data-parallel replica ``dp_index``."""
        return dp_index * self.num_stages + stage_id

    def coords(self, rank: int) -> tuple[int, int]:
        """``(stage_id, dp_index)`` of a global rank."""
        return rank % self.num_stages, rank // self.num_stages

    # DeepSpeed's ProcessTopology query names, for scripts that ask the topology directly
    def get_dim(self, axis: str) -> int:
        """Size of ``axis``: "pipe" or "data"."""
        sizes = {"pipe": self.num_stages, "data": self.num_dp}
        if axis not in sizes:
            raise ValueError(f"axis={axis!r} is not 'pipe' or 'data'")
        return sizes[axis]


def PipeDataParallelTopology(num_pp: int, num_dp: int) -> PipeTopology:  # noqa: N802 - DeepSpeed's name
    """DeepSpeed's constructor name for a pipeline x data-parallel grid."""
    return PipeTopology(num_stages=num_pp, num_dp=num_dp)


def resolve_topology(num_stages: int | None, topology: PipeTopology | None, world_size: int) -> PipeTopology:
    """The grid for ``world_size`` ranks from ``num_stages`` or an explicit ``topology``.

    Raises:
        ValueError: neither or conflicting values are given, or the world does not divide.
    """
    if topology is not None:
        if not isinstance(topology, PipeTopology):
            raise ValueError(f"topology={topology!r} is not a flexspeed.pipe.PipeTopology; build one with "
                             "PipeTopology(num_stages=..., num_dp=...) or PipeDataParallelTopology(num_pp, num_dp)")
        if num_stages is not None and num_stages != topology.num_stages:
            raise ValueError(f"num_stages={num_stages} disagrees with topology.num_stages={topology.num_stages}; "
                             "pass only one of them")
        if topology.world_size != world_size:
            raise ValueError(f"topology {topology.num_stages} stages x {topology.num_dp} data-parallel = "
                             f"{topology.world_size} ranks, but the world size is {world_size}. Fix: launch "
                             f"{topology.world_size} processes or change the topology")
        return topology
    if num_stages is None:
        raise ValueError("PipelineModule needs num_stages=... (pipeline-parallel degree) or topology=...")
    if num_stages < 1 or world_size % num_stages != 0:
        raise ValueError(f"num_stages={num_stages} must be >= 1 and divide the world size {world_size} "
                         f"(world = stages x data-parallel). Fix: use one of "
                         f"{[d for d in range(1, world_size + 1) if world_size % d == 0]}")
    return PipeTopology(num_stages=num_stages, num_dp=world_size // num_stages)


def build_pipe_mesh(topology: PipeTopology, device_type: str) -> DeviceMesh:
    """The ``("dp", "pp")`` device mesh of the current process group for ``topology``."""
    if not dist.is_initialized():
        raise RuntimeError("pipeline parallelism needs torch.distributed: call flexspeed.init_distributed() first")
    if dist.get_world_size() != topology.world_size:
        raise ValueError(f"topology has {topology.world_size} ranks but the process group has {dist.get_world_size()}")
    return init_device_mesh(device_type, (topology.num_dp, topology.num_stages), mesh_dim_names=("dp", "pp"))
