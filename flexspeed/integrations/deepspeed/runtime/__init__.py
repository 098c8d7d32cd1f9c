"""``deepspeed.runtime``: flexspeed's :mod:`flexspeed.runtime`, with DeepSpeed's ``zero`` package.

DeepSpeed's ``runtime.zero`` is a package (``partition_parameters``, ``config``, ...); flexspeed's
``runtime.zero`` is the module of its ZeRO strategies, so this package stands in front of it.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

from flexspeed.integrations import identity as _identity  # a private alias: keeps the namespace DeepSpeed's


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    real = _identity.alias_target(f"deepspeed.runtime.{name}")
    if real is not None:
        return importlib.import_module(real)
    import flexspeed.runtime

    value = getattr(flexspeed.runtime, name)
    if isinstance(value, ModuleType):  # pragma: no cover - every flexspeed.runtime module is found above
        raise AttributeError(name)
    return value
