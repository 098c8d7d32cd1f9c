"""Training runtime: engine, sharding, precision, optimizers, schedulers, data, checkpoints.

Submodules load on first attribute access, so DeepSpeed-style attribute paths work without an
import of their own (``deepspeed.runtime.utils.set_random_seed(...)``, ``deepspeed.runtime.lr_schedules``).
"""

import importlib

import flexspeed._torch_check  # noqa: F401  (refuse a torch older than flexspeed supports)

_SUBMODULES = ("utils", "lr_schedules", "config", "pipe", "engine", "zero", "checkpoint", "activation_checkpointing")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
