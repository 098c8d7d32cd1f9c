"""``deepspeed.runtime.base_optimizer``: the base class DeepSpeed's optimizer wrappers derive from.

Lightning's strategies test ``isinstance(x, (torch.optim.Optimizer, DeepSpeedOptimizer))`` to find the optimizer
in a checkpoint's state. flexspeed's engines hand out plain ``torch.optim.Optimizer`` objects (ZeRO shards live
in DTensor parameters, not in an optimizer wrapper), so nothing of flexspeed derives from it; it exists for
those ``isinstance`` checks and for user code that subclasses it.
"""

from __future__ import annotations

__all__ = ["DeepSpeedOptimizer", "ZeROOptimizer"]


class DeepSpeedOptimizer:
    """Marker base class of DeepSpeed's optimizer wrappers."""


class ZeROOptimizer(DeepSpeedOptimizer):
    """Marker base class of DeepSpeed's ZeRO optimizer wrappers."""
