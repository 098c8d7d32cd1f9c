"""``deepspeed.runtime.lr_schedules``: the scheduler classes, their names and command-line flags.

The schedulers themselves are :mod:`flexspeed.runtime.schedulers`; this module gives them
DeepSpeed's import path, the name constants, ``VALID_LR_SCHEDULES`` and ``add_tuning_arguments``
(DeepSpeed's "Convergence Tuning" flags, with its defaults) with ``get_config_from_args`` to turn
those flags into a ``scheduler`` config section.
"""

from __future__ import annotations

import argparse
from typing import Any

from flexspeed.runtime.schedulers import LRRangeTest, OneCycle, WarmupCosineLR, WarmupDecayLR, WarmupLR

__all__ = [
    "LRRangeTest", "OneCycle", "WarmupLR", "WarmupDecayLR", "WarmupCosineLR", "VALID_LR_SCHEDULES",
    "LR_SCHEDULE", "LR_RANGE_TEST", "ONE_CYCLE", "WARMUP_LR", "WARMUP_DECAY_LR", "WARMUP_COSINE_LR",
    "add_tuning_arguments", "parse_arguments", "get_config_from_args", "get_lr_from_config",
    "LR_RANGE_TEST_MIN_LR", "LR_RANGE_TEST_STEP_RATE", "LR_RANGE_TEST_STEP_SIZE", "LR_RANGE_TEST_STAIRCASE",
    "EDGE_VALUE", "MID_VALUE", "CYCLE_FIRST_STEP_SIZE", "CYCLE_FIRST_STAIR_COUNT", "CYCLE_SECOND_STEP_SIZE",
    "CYCLE_SECOND_STAIR_COUNT", "DECAY_STEP_SIZE", "CYCLE_MIN_LR", "CYCLE_MAX_LR", "DECAY_LR_RATE", "CYCLE_MIN_MOM",
    "CYCLE_MAX_MOM", "DECAY_MOM_RATE", "WARMUP_MIN_LR", "WARMUP_MAX_LR", "WARMUP_NUM_STEPS", "WARMUP_TYPE",
    "WARMUP_LOG_RATE", "WARMUP_LINEAR_RATE", "WARMUP_MIN_RATIO", "COS_MIN_RATIO", "TOTAL_NUM_STEPS",
]

LR_SCHEDULE = "lr_schedule"
LR_RANGE_TEST = "LRRangeTest"
ONE_CYCLE = "OneCycle"
WARMUP_LR = "WarmupLR"
WARMUP_DECAY_LR = "WarmupDecayLR"
WARMUP_COSINE_LR = "WarmupCosineLR"
VALID_LR_SCHEDULES = [LR_RANGE_TEST, ONE_CYCLE, WARMUP_LR, WARMUP_DECAY_LR, WARMUP_COSINE_LR]

# DeepSpeed's parameter-name constants (``{"type": ONE_CYCLE, "params": {CYCLE_MIN_LR: 0, ...}}``)
LR_RANGE_TEST_MIN_LR = "lr_range_test_min_lr"
LR_RANGE_TEST_STEP_RATE = "lr_range_test_step_rate"
LR_RANGE_TEST_STEP_SIZE = "lr_range_test_step_size"
LR_RANGE_TEST_STAIRCASE = "lr_range_test_staircase"
EDGE_VALUE = "edge_value"
MID_VALUE = "mid_value"
CYCLE_FIRST_STEP_SIZE = "cycle_first_step_size"
CYCLE_FIRST_STAIR_COUNT = "cycle_first_stair_count"
CYCLE_SECOND_STEP_SIZE = "cycle_second_step_size"
CYCLE_SECOND_STAIR_COUNT = "cycle_second_stair_count"
DECAY_STEP_SIZE = "decay_step_size"
CYCLE_MIN_LR = "cycle_min_lr"
CYCLE_MAX_LR = "cycle_max_lr"
DECAY_LR_RATE = "decay_lr_rate"
CYCLE_MIN_MOM = "cycle_min_mom"
CYCLE_MAX_MOM = "cycle_max_mom"
DECAY_MOM_RATE = "decay_mom_rate"
WARMUP_MIN_LR = "warmup_min_lr"
WARMUP_MAX_LR = "warmup_max_lr"
WARMUP_NUM_STEPS = "warmup_num_steps"
WARMUP_TYPE = "warmup_type"
WARMUP_LOG_RATE = "log"
WARMUP_LINEAR_RATE = "linear"
WARMUP_MIN_RATIO = "warmup_min_ratio"
COS_MIN_RATIO = "cos_min_ratio"
TOTAL_NUM_STEPS = "total_num_steps"

# flag name -> (type, default, help); DeepSpeed's defaults
_FLAGS: dict[str, tuple[Any, Any, str]] = {
    "lr_range_test_min_lr": (float, 0.001, "Starting lr value."),
    "lr_range_test_step_rate": (float, 1.0, "scaling rate for LR range test."),
    "lr_range_test_step_size": (int, 1000, "training steps per LR change."),
    "cycle_first_step_size": (int, 1000, "size of first step of 1Cycle schedule (training steps)."),
    "cycle_first_stair_count": (int, -1, "first stair count for 1Cycle schedule."),
    "cycle_second_step_size": (int, -1, "size of second step of 1Cycle schedule (default first_step_size)."),
    "cycle_second_stair_count": (int, -1, "second stair count for 1Cycle schedule."),
    "decay_step_size": (int, 1000, "size of intervals for applying post cycle decay (training steps)."),
    "cycle_min_lr": (float, 0.01, "1Cycle LR lower bound."),
    "cycle_max_lr": (float, 0.1, "1Cycle LR upper bound."),
    "decay_lr_rate": (float, 0.0, "post cycle LR decay rate."),
    "cycle_min_mom": (float, 0.8, "1Cycle momentum lower bound."),
    "cycle_max_mom": (float, 0.9, "1Cycle momentum upper bound."),
    "decay_mom_rate": (float, 0.0, "post cycle momentum decay rate."),
    "warmup_min_lr": (float, 0, "WarmupLR minimum/initial LR value"),
    "warmup_max_lr": (float, 0.001, "WarmupLR maximum LR value."),
    "warmup_num_steps": (int, 1000, "WarmupLR step count for LR warmup."),
    "warmup_type": (str, "log", "WarmupLR increasing function during warmup"),
    "warmup_min_ratio": (float, 0.01, "Cosine LR lower bound."),
    "cos_min_ratio": (float, 0.01, "Cosine LR lower bound."),
}
_SWITCHES = {"lr_range_test_staircase": "use staircase scaling for LR range test.",
             "cycle_momentum": "Enable 1Cycle momentum schedule."}

# which flags each schedule reads (DeepSpeed's override_* functions)
_PARAMS_OF = {
    LR_RANGE_TEST: ("lr_range_test_min_lr", "lr_range_test_step_rate", "lr_range_test_step_size",
                    "lr_range_test_staircase"),
    ONE_CYCLE: ("cycle_first_step_size", "cycle_first_stair_count", "cycle_second_step_size",
                "cycle_second_stair_count", "decay_step_size", "cycle_min_lr", "cycle_max_lr", "decay_lr_rate",
                "cycle_min_mom", "cycle_max_mom", "decay_mom_rate"),
    WARMUP_LR: ("warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type"),
    WARMUP_DECAY_LR: ("warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type"),
    WARMUP_COSINE_LR: ("warmup_num_steps", "warmup_type", "warmup_min_ratio", "cos_min_ratio"),
}


def add_tuning_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add DeepSpeed's "Convergence Tuning" group (``--lr_schedule`` and each schedule's parameters).

    Returns:
        the same parser.
    """
    group = parser.add_argument_group("Convergence Tuning", "Convergence tuning configurations")
    group.add_argument("--lr_schedule", type=str, default=None, help="LR schedule for training.")
    for name, (kind, default, help_text) in _FLAGS.items():
        group.add_argument(f"--{name}", type=kind, default=default, help=help_text)
    for name, help_text in _SWITCHES.items():
        group.add_argument(f"--{name}", default=False, action="store_true", help=help_text)
    return parser


def parse_arguments() -> tuple[argparse.Namespace, list[str]]:
    """Parse the tuning flags from ``sys.argv``, leaving the others: ``(args, unknown)``."""
    return add_tuning_arguments(argparse.ArgumentParser()).parse_known_args()


def get_config_from_args(args: argparse.Namespace) -> tuple[dict[str, Any] | None, str | None]:
    """The ``scheduler`` section the tuning flags describe: ``(section, None)`` or ``(None, why not)``."""
    schedule = getattr(args, LR_SCHEDULE, None)
    if schedule is None:
        return None, f"--{LR_SCHEDULE} not specified on command line"
    if schedule not in VALID_LR_SCHEDULES:
        return None, f"{schedule} is not supported LR schedule"
    params = {name: getattr(args, name) for name in _PARAMS_OF[schedule] if getattr(args, name, None) is not None}
    return {"type": schedule, "params": params}, None


def get_lr_from_config(config: dict[str, Any]) -> tuple[float | None, str]:
    """The peak learning rate a ``scheduler`` section names: ``(lr, "")`` or ``(None, why not)``."""
    if "type" not in config:
        return None, "LR schedule type not defined in config"
    if "params" not in config:
        return None, "LR schedule params not defined in config"
    schedule, params = config["type"], config["params"]
    if schedule not in VALID_LR_SCHEDULES:
        return None, f"{schedule} is not a valid LR schedule"
    if schedule == WARMUP_COSINE_LR:
        return None, f"{WARMUP_COSINE_LR} scales the optimizer learning rate by a ratio, so its params define no lr"
    key = {LR_RANGE_TEST: "lr_range_test_min_lr", ONE_CYCLE: "cycle_max_lr"}.get(schedule, "warmup_max_lr")
    return params[key], ""
