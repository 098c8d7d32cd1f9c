"""Type and range checks of DeepSpeed scheduler parameters, shared by the config-time validator
and the scheduler constructors (one place for each parameter's rule)."""

from __future__ import annotations

import math
from typing import Any

from flexspeed.config.errors import ConfigError, did_you_mean

__all__ = ["check_value", "is_number"]

_LR_VALUES = {"warmup_min_lr", "warmup_max_lr", "cycle_min_lr", "cycle_max_lr", "lr_range_test_min_lr",
              "cycle_min_mom", "cycle_max_mom"}  # a number, or one number per param group
_FLOATS = {"warmup_min_ratio", "cos_min_ratio", "decay_lr_rate", "decay_mom_rate", "lr_range_test_step_rate"}
_BOOLS = {"cycle_momentum", "lr_range_test_staircase", "flexspeed_zero_lr_first_step"}
# int params -> smallest allowed value
_INTS = {"warmup_num_steps": 1, "total_num_steps": 1, "cycle_first_step_size": 1, "cycle_second_step_size": 0,
         "cycle_first_stair_count": 0, "cycle_second_stair_count": 0, "decay_step_size": 0,
         "lr_range_test_step_size": 1, "last_batch_iteration": -1}
# None means "same as the first half" (OneCycle) or "the optimizer's lr" (WarmupLR)
_OPTIONAL = {"cycle_second_step_size", "cycle_second_stair_count", "warmup_max_lr"}
_WARMUP_TYPES = ("log", "linear")
_FP32_MAX = 3.4028234663852886e38


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_value(type_name: str, name: str, value: Any) -> None:
    """Raise ConfigError if ``value`` is not a valid setting for parameter ``name``."""
    key = f"scheduler.params.{name}"
    if isinstance(value, str) and value == "auto":
        return  # resolved by the config layer before anything is built
    if name in _OPTIONAL and value is None:
        return
    if name in _LR_VALUES:
        values = value if isinstance(value, (list, tuple)) else [value]
        if not values or not all(is_number(v) for v in values):
            raise ConfigError(f"{type_name} needs a number or a list of numbers (one per param group), "
                              f"got {value!r}.", key=key)
        if not all(math.isfinite(v) and v <= _FP32_MAX for v in values):
            raise ConfigError(f"must be a finite number within float32's range, got {value!r}. Fix: use a "
                              "learning rate such as 1e-3.", key=key)
        if any(v < 0 for v in values):
            raise ConfigError(f"must be >= 0, got {value!r}.", key=key)
    elif name in _FLOATS:
        if not is_number(value) or not math.isfinite(value) or abs(value) > _FP32_MAX:
            raise ConfigError(f"{type_name} needs a finite number within float32's range, got {value!r}.", key=key)
        if name in ("warmup_min_ratio", "cos_min_ratio") and not 0.0 <= value <= 1.0:
            raise ConfigError(f"is a fraction of the optimizer's lr and must be in [0, 1], got {value!r}.",
                              key=key)
    elif name in _BOOLS:
        if not isinstance(value, bool):
            raise ConfigError(f"{type_name} needs true or false, got {value!r}.", key=key)
    elif name in _INTS:
        if not is_number(value) or abs(value) > 2**53 or not math.isfinite(value) or float(value) != int(value):
            raise ConfigError(f"{type_name} needs a whole number, got {value!r}.", key=key)
        if value < _INTS[name]:
            raise ConfigError(f"must be >= {_INTS[name]}, got {value!r}.", key=key)
    elif name == "warmup_type" and value not in _WARMUP_TYPES:
        hint = did_you_mean(str(value), _WARMUP_TYPES)
        raise ConfigError(f"must be one of {list(_WARMUP_TYPES)}, got {value!r}.{hint}", key=key)
