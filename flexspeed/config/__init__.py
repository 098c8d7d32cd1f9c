"""The DeepSpeed configuration schema, strictly validated.

Typical use::

    from flexspeed.config import build_config
    cfg = build_config("ds_config.json", world_size=4, world_size_source="--world-size 4")
    cfg.zero_optimization.stage, cfg.train_micro_batch_size_per_gpu, cfg.precision

Importing this package needs pydantic only (no torch).
"""

from __future__ import annotations

from flexspeed.config.args import add_config_arguments
from flexspeed.config.errors import ConfigError
from flexspeed.config.loader import load_config
from flexspeed.config.resolve import build_config, resolve_batch_triad, resolve_config
from flexspeed.config.schema import FlexConfig
from flexspeed.config.validate import validate_config

__all__ = [
    "FlexConfig",
    "ConfigError",
    "load_config",
    "validate_config",
    "resolve_config",
    "resolve_batch_triad",
    "build_config",
    "add_config_arguments",
]
