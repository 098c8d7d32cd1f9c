"""``deepspeed.ops.adam``: ``FusedAdam`` and ``DeepSpeedCPUAdam`` with DeepSpeed's constructors, on
``torch.optim.Adam`` (see :mod:`flexspeed.runtime.optimizers`)."""

from __future__ import annotations

from flexspeed.runtime.optimizers import DeepSpeedCPUAdam, FusedAdam

__all__ = ["FusedAdam", "DeepSpeedCPUAdam"]
