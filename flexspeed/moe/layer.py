"""``deepspeed.moe.layer``: flexspeed has no mixture-of-experts layer."""

from __future__ import annotations

from typing import Any

__all__ = ["MoE"]


class MoE:
    """DeepSpeed's MoE layer has no flexspeed counterpart: constructing it raises."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError("deepspeed.moe.layer.MoE has no flexspeed counterpart: flexspeed does not implement "
                                  "mixture-of-experts layers or expert parallelism. Fix: run the dense model (e.g. "
                                  "without --moe), or use DeepSpeed for MoE training")
