"""``deepspeed.utils`` for flexspeed: the names DeepSpeed training scripts import from it.

``logger``/``log_dist``, ``RepeatingLoader``, and the ``safe_get_full_*``/``safe_set_full_*``
family (whole parameters, gradients and optimizer state at any ZeRO stage; see
:mod:`flexspeed.utils.tensor_fragment`). ``flexspeed.utils.zero_to_fp32`` consolidates a
checkpoint's weights in one process.
"""

from __future__ import annotations

from flexspeed.runtime.data import RepeatingLoader
from flexspeed.utils.z3_leaf_module import set_z3_leaf_modules
from flexspeed.utils.logging import log_dist, logger, print_dist
from flexspeed.utils.tensor_fragment import (
    safe_get_full_fp32_param,
    safe_get_full_grad,
    safe_get_full_optimizer_state,
    safe_get_local_fp32_param,
    safe_get_local_grad,
    safe_get_local_optimizer_state,
    safe_set_full_fp32_param,
    safe_set_full_grad,
    safe_set_full_optimizer_state,
    safe_set_local_fp32_param,
    safe_set_local_grad,
    safe_set_local_optimizer_state,
)

__all__ = [
    "logger", "log_dist", "print_dist", "RepeatingLoader", "set_z3_leaf_modules",
    "safe_get_full_fp32_param", "safe_set_full_fp32_param", "safe_get_full_grad", "safe_set_full_grad",
    "safe_get_full_optimizer_state", "safe_set_full_optimizer_state",
    "safe_get_local_fp32_param", "safe_set_local_fp32_param", "safe_get_local_grad", "safe_set_local_grad",
    "safe_get_local_optimizer_state", "safe_set_local_optimizer_state",
]
