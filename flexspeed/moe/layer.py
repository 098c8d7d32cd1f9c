"""``deepspeed.moe.layer``: flexspeed has no mixture-of-experts layer."""

from __future__ import annotations

from typing import Any

__all__ = ["MoE"]


class MoE:
    """DeepSpeed's MoE layer has no flexspeed counterpart: constructing it raises ValueError.

    DeepSpeed's signature is ``MoE(hidden_size, expert, num_experts=1, ep_size=1, k=1, ...)``; the error names
    the ``num_experts`` the script asked for.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        num_experts = kwargs.get("num_experts", args[2] if len(args) > 2 else 1)
        raise ValueError(f"deepspeed.moe.layer.MoE(num_experts={num_experts!r}): MoE has no flexspeed counterpart: "
                         "flexspeed does not implement mixture-of-experts layers or expert parallelism. Fix: run the "
                         "dense model (e.g. without --moe), or use DeepSpeed for MoE training")
