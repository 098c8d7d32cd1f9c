"""The process-group timeout: how long a collective waits for a rank before it fails.

Precedence, first found wins:

1. ``init_distributed(timeout=timedelta(...))`` - the caller's argument;
2. the config key ``flexspeed_distributed.timeout_minutes`` (a flexspeed extension; fractions allowed);
3. the environment variable ``DEEPSPEED_TIMEOUT``, in whole minutes, read as DeepSpeed 0.19.8 reads
   it (``int(os.getenv("DEEPSPEED_TIMEOUT"))``: ``"1.5"`` is an error, not 1.5 minutes);
4. DeepSpeed's default, 10 minutes.

When the group already exists (the caller started it), a timeout from the config is applied to it
only if flexspeed started that group without an explicit ``timeout=``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from flexspeed.config.errors import ConfigError

__all__ = ["DEFAULT_TIMEOUT", "ENV_VAR", "CONFIG_KEY", "ResolvedTimeout", "resolve_timeout", "config_timeout",
           "distributed_section"]

DEFAULT_TIMEOUT = timedelta(minutes=10)  # DeepSpeed's default_pg_timeout
ENV_VAR = "DEEPSPEED_TIMEOUT"
CONFIG_KEY = "flexspeed_distributed.timeout_minutes"


@dataclass(frozen=True)
class ResolvedTimeout:
    """A timeout and where it came from (for messages: "15 s from flexspeed_distributed.timeout_minutes")."""

    value: timedelta
    source: str

    def describe(self) -> str:
        seconds = self.value.total_seconds()
        amount = f"{seconds:g} s" if seconds < 120 else f"{seconds / 60:g} min"
        return f"{amount} (from {self.source})"


def _env_minutes(env: Mapping[str, str]) -> int | None:
    text = env.get(ENV_VAR)
    if text is None:
        return None
    try:
        minutes = int(text)  # DeepSpeed: int(os.getenv("DEEPSPEED_TIMEOUT", default=10))
    except ValueError:
        raise ConfigError(f"environment variable {ENV_VAR}={text!r} is not a whole number of minutes (DeepSpeed "
                          f"reads it with int()). Fix: export {ENV_VAR}=15, or set {CONFIG_KEY} (fractions "
                          "allowed) in the config", key=ENV_VAR) from None
    if minutes < 1:
        raise ConfigError(f"environment variable {ENV_VAR}={text!r} must be at least 1 minute. Fix: export "
                          f"{ENV_VAR}=1 or more, or set {CONFIG_KEY} for a shorter timeout", key=ENV_VAR)
    return minutes


def config_timeout(raw: Any) -> float | None:
    """``flexspeed_distributed.timeout_minutes`` of a raw config dict (validated), or None when absent."""
    section = raw.get("flexspeed_distributed") if isinstance(raw, Mapping) else None
    if section is None:
        return None
    return distributed_section(section).timeout_minutes


def distributed_section(section: Any) -> Any:
    """The validated ``flexspeed_distributed`` section (errors name ``flexspeed_distributed.<key>``)."""
    from flexspeed.config.validate import validate_config

    return validate_config({"flexspeed_distributed": section}).flexspeed_distributed


def resolve_timeout(explicit: timedelta | None = None, config_minutes: float | None = None,
                    env: Mapping[str, str] | None = None) -> ResolvedTimeout:
    """The process-group timeout by the precedence in this module's docstring."""
    if explicit is not None:
        if not isinstance(explicit, timedelta) or explicit.total_seconds() <= 0:
            raise ValueError(f"init_distributed(timeout=...) must be a positive datetime.timedelta, got {explicit!r}")
        return ResolvedTimeout(explicit, "init_distributed(timeout=...)")
    if config_minutes is not None:
        return ResolvedTimeout(timedelta(minutes=float(config_minutes)), CONFIG_KEY)
    minutes = _env_minutes(os.environ if env is None else env)
    if minutes is not None:
        return ResolvedTimeout(timedelta(minutes=minutes), f"{ENV_VAR}={minutes}")
    return ResolvedTimeout(DEFAULT_TIMEOUT, "the default, DeepSpeed's 10 minutes")
