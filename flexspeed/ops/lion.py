"""``deepspeed.ops.lion``: ``DeepSpeedCPULion`` and ``FusedLion`` with DeepSpeed's constructor, on flexspeed's
:class:`~flexspeed.runtime.optimizers.Lion` (foreach kernels). Accelerate maps a bitsandbytes 32-bit Lion to
``DeepSpeedCPULion`` under ZeRO optimizer offload."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from flexspeed.runtime.optimizers import Lion

__all__ = ["DeepSpeedCPULion", "FusedLion"]


class DeepSpeedCPULion(Lion):
    """Lion with DeepSpeed's arguments (``fp32_optimizer_states`` accepted: flexspeed keeps fp32 master weights)."""

    def __init__(self, model_params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.0, fp32_optimizer_states: bool = True) -> None:
        super().__init__(model_params, lr=lr, betas=betas, weight_decay=weight_decay)
        self.fp32_optimizer_states = bool(fp32_optimizer_states)


class FusedLion(Lion):
    """``deepspeed.ops.lion.FusedLion``'s constructor."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 weight_decay: float = 0.0, set_grad_none: bool = True) -> None:
        super().__init__(params, lr=lr, betas=betas, weight_decay=weight_decay)
