"""Where each rank sits in the pipeline x data-parallel grid: DeepSpeed-named views of ``ParallelDims``.

The degrees, their validation and the ``DeviceMesh`` all come from
:class:`flexspeed.distributed.parallel_dims.ParallelDims` (``rank = dp_index * num_stages + stage_id``
with no tensor parallelism, so the stages of one pipeline are consecutive ranks and each
data-parallel group strides across pipelines). ``PipeTopology`` and ``PipeDataParallelTopology``
keep DeepSpeed's names and queries for scripts that build or ask a topology directly.
"""

from __future__ import annotations

from dataclasses import dataclass

from flexspeed.distributed.parallel_dims import ParallelDims

__all__ = ["PipeTopology", "PipeDataParallelTopology", "resolve_topology"]


@dataclass(frozen=True)
class PipeTopology:
    """A ``num_stages`` x ``num_dp`` grid of ranks (pipeline stages x data-parallel replicas)."""

    num_stages: int
    num_dp: int = 1
    num_tp: int = 1  # tensor-parallel ranks inside each stage (innermost: ParallelDims' layout)

    def __post_init__(self) -> None:
        if self.num_stages < 1 or self.num_dp < 1 or self.num_tp < 1:
            raise ValueError(f"PipeTopology(num_stages={self.num_stages}, num_dp={self.num_dp}, "
                             f"num_tp={self.num_tp}): all must be >= 1")

    @property
    def world_size(self) -> int:
        return self.num_stages * self.num_dp * self.num_tp

    def dims(self, sources: dict[str, str] | None = None) -> ParallelDims:
        """The validated degrees this grid views (``dp = num_dp``, ``pp = num_stages``, ``tp = num_tp``)."""
        return ParallelDims(dp=self.num_dp, pp=self.num_stages, tp=self.num_tp, world_size=self.world_size,
                            sources=sources or {"pp": "PipeTopology.num_stages", "dp": "PipeTopology.num_dp"})

    @classmethod
    def from_dims(cls, dims: ParallelDims) -> PipeTopology:
        """The pipeline view of ``dims`` (tensor parallelism, when present, is inside each stage)."""
        return cls(num_stages=dims.pp, num_dp=dims.dp, num_tp=dims.tp)

    def rank_of(self, stage_id: int, dp_index: int, tp_index: int = 0) -> int:
        """Global rank of pipeline stage ``stage_id`` in data-parallel replica ``dp_index`` (tp rank ``tp_index``)."""
        return (dp_index * self.num_stages + stage_id) * self.num_tp + tp_index

    def coords(self, rank: int) -> tuple[int, int]:
        """``(stage_id, dp_index)`` of a global rank."""
        return rank // self.num_tp % self.num_stages, rank // (self.num_tp * self.num_stages)

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


def resolve_topology(num_stages: int | None, topology: PipeTopology | None, world_size: int,
                     tp: int = 1) -> PipeTopology:
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
        if topology.num_tp != tp:
            raise ValueError(f"topology has num_tp={topology.num_tp} but tensor_parallel.autotp_size is {tp}. Fix: "
                             f"PipeTopology(num_stages={topology.num_stages}, num_dp=..., num_tp={tp}), or pass "
                             "num_stages= instead of topology=")
        if topology.world_size != world_size:
            raise ValueError(f"topology {topology.num_stages} stages x {topology.num_dp} data-parallel x "
                             f"{topology.num_tp} tensor-parallel = "
                             f"{topology.world_size} ranks, but the world size is {world_size}. Fix: launch "
                             f"{topology.world_size} processes or change the topology")
        return topology
    if num_stages is None:
        raise ValueError("PipelineModule needs num_stages=... (pipeline-parallel degree) or topology=...")
    dims = ParallelDims.from_world(world_size, pp=num_stages, tp=tp,
                                   pp_source=f"PipelineModule(num_stages={num_stages})",
                                   world_source="the process group", tp_source=f"tensor_parallel.autotp_size={tp}")
    return PipeTopology.from_dims(dims)
