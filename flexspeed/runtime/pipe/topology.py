"""``deepspeed.runtime.pipe.topology``: the pipeline x data-parallel grid (from :mod:`flexspeed.pipe.topology`).

DeepSpeed's ``ProcessTopology``/``PipeModelDataParallelTopology`` (with a tensor-parallel axis)
and ``PipelineParallelGrid`` have no flexspeed counterpart: flexspeed's pipeline has no
model-parallel axis (see docs/compat.md).
"""

from __future__ import annotations

from flexspeed.pipe.topology import PipeDataParallelTopology, PipeTopology

__all__ = ["PipeTopology", "PipeDataParallelTopology"]

_ABSENT = {
    "ProcessTopology": "a general N-axis grid",
    "PipeModelDataParallelTopology": "a pipeline x tensor-parallel x data-parallel grid",
    "PipelineParallelGrid": "the process groups of such a grid",
}


def __getattr__(name: str):
    if name in _ABSENT:
        raise ImportError(
            f"deepspeed.runtime.pipe.topology.{name} ({_ABSENT[name]}) has no flexspeed counterpart: flexspeed's "
            "pipeline has stage and data-parallel axes only, with the stages of one pipeline on consecutive "
            "ranks. Fix: use PipeDataParallelTopology(num_pp, num_dp) (or PipelineModule(num_stages=...)); the "
            "engine answers stage_id, is_first_stage() and dp_world_size")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

