"""Pipeline parallelism with DeepSpeed's ``deepspeed.pipe`` names on ``torch.distributed.pipelining``.

``PipelineModule`` (a model as a list of ``LayerSpec`` / ``TiedLayerSpec`` / modules), cut
into stages by ``partition_method``; ``flexspeed.initialize(model=pipeline_module, ...)``
returns a ``PipelineEngine`` whose ``train_batch()`` runs the configured schedule. See
docs/pipeline.md.
"""

from __future__ import annotations

from typing import Any

from flexspeed.pipe.module import LayerSpec, PipelineModule, StageModule, TiedLayerSpec
from flexspeed.pipe.partition import partition_balanced, partition_by_type, partition_uniform
from flexspeed.pipe.topology import PipeDataParallelTopology, PipeTopology

__all__ = [
    "LayerSpec", "TiedLayerSpec", "PipelineModule", "StageModule", "PipeTopology", "PipeDataParallelTopology",
    "PipelineEngine", "build_pipeline_engine", "execution_order", "format_order", "bubble_fraction",
    "export_sequential_state_dict", "partition_uniform", "partition_balanced", "partition_by_type",
]

_LAZY = {
    "PipelineEngine": "flexspeed.pipe.engine", "build_pipeline_engine": "flexspeed.pipe.engine",
    "execution_order": "flexspeed.pipe.schedule", "format_order": "flexspeed.pipe.schedule",
    "bubble_fraction": "flexspeed.pipe.schedule", "export_sequential_state_dict": "flexspeed.pipe.module",
}


def __getattr__(name: str) -> Any:
    # the engine pulls in torch.distributed.pipelining and the runtime; load it on first use
    if name not in _LAZY:
        raise AttributeError(f"module 'flexspeed.pipe' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value
