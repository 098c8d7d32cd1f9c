"""``deepspeed.runtime.pipe``: DeepSpeed's other import path for the pipeline classes.

The implementation is :mod:`flexspeed.pipe`; this package re-exports its names.
"""

from __future__ import annotations

from flexspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec
from flexspeed.runtime.pipe.topology import PipeDataParallelTopology, PipeTopology

__all__ = ["PipelineModule", "LayerSpec", "TiedLayerSpec", "PipeTopology", "PipeDataParallelTopology"]
