"""``deepspeed.runtime.pipe.topology``: the pipeline x data-parallel grid (from :mod:`flexspeed.pipe.topology`).

DeepSpeed's ``ProcessTopology``/``PipeModelDataParallelTopology`` (with a tensor-parallel axis)
and ``PipelineParallelGrid`` have no flexspeed counterpart: flexspeed's pipeline has no
model-parallel axis (see docs/compat.md).
"""

from __future__ import annotations

from flexspeed.pipe.topology import PipeDataParallelTopology, PipeTopology

__all__ = ["PipeTopology", "PipeDataParallelTopology"]
