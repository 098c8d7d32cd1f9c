"""``deepspeed.runtime.config``: the names DeepSpeed scripts import from it.

``DeepSpeedConfigError`` is flexspeed's :class:`~flexspeed.config.ConfigError` itself (not a
copy), so ``except DeepSpeedConfigError`` catches every configuration error flexspeed raises.
"""

from __future__ import annotations

from flexspeed.config.errors import ConfigError

__all__ = ["DeepSpeedConfigError"]

DeepSpeedConfigError = ConfigError
