"""``deepspeed.ops.adagrad``: ``DeepSpeedCPUAdagrad`` with DeepSpeed's constructor, on ``torch.optim.Adagrad``.

Accelerate maps an Adagrad client optimizer to it under ZeRO optimizer offload
(``map_pytorch_optim_to_deepspeed``). It runs wherever the parameters are (DeepSpeed's needs them on the CPU).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

__all__ = ["DeepSpeedCPUAdagrad"]


class DeepSpeedCPUAdagrad(torch.optim.Adagrad):
    """Adagrad (L2-style weight decay, as DeepSpeed's kernel) with DeepSpeed's arguments.

    ``amsgrad=True`` is refused (DeepSpeed refuses it too); ``fp32_optimizer_states`` is accepted: under
    flexspeed's engine the parameters, hence the states, are fp32 master weights.
    """

    def __init__(self, model_params: Iterable[Any], lr: float = 1e-2, eps: float = 1e-10, weight_decay: float = 0.0,
                 amsgrad: bool = False, fp32_optimizer_states: bool = True) -> None:
        if amsgrad:
            raise ValueError("DeepSpeedCPUAdagrad(amsgrad=True) is not supported (DeepSpeed's neither). Fix: drop it")
        super().__init__(model_params, lr=lr, eps=eps, weight_decay=weight_decay)
        self.fp32_optimizer_states = bool(fp32_optimizer_states)
