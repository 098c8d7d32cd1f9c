"""``deepspeed.utils`` for flexspeed: the names DeepSpeed training scripts import from it.

``logger``/``log_dist``, ``RepeatingLoader``, and the ``safe_get_full_*``/``safe_set_full_*``
family (whole parameters, gradients and optimizer state at any ZeRO stage; see
:mod:`flexspeed.utils.tensor_fragment`). ``flexspeed.utils.zero_to_fp32`` consolidates a
checkpoint's weights in one process.
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> the module that defines it; imported on first use, so that ``flexspeed.utils.logging``
# (which the torch-free config layer uses) does not pull in torch through this package
_HOMES = {
    "RepeatingLoader": "flexspeed.runtime.data",
    "set_z3_leaf_modules": "flexspeed.utils.z3_leaf_module",
    **{name: "flexspeed.utils.logging" for name in ("log_dist", "logger", "print_dist")},
    **{f"safe_{verb}_{scope}_{what}": "flexspeed.utils.tensor_fragment" for verb in ("get", "set")
       for scope in ("full", "local") for what in ("fp32_param", "grad", "optimizer_state")},
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'flexspeed.utils' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))


__all__ = [
    "logger", "log_dist", "print_dist", "RepeatingLoader", "set_z3_leaf_modules",
    "safe_get_full_fp32_param", "safe_set_full_fp32_param", "safe_get_full_grad", "safe_set_full_grad",
    "safe_get_full_optimizer_state", "safe_set_full_optimizer_state",
    "safe_get_local_fp32_param", "safe_set_local_fp32_param", "safe_get_local_grad", "safe_set_local_grad",
    "safe_get_local_optimizer_state", "safe_set_local_optimizer_state",
]
