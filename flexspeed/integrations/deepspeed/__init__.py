"""``deepspeed`` as seen by a process with flexspeed's DeepSpeed identity (``--as-deepspeed``).

The top-level names are flexspeed's (``initialize``, ``init_distributed``, ``zero``, ``comm``,
``checkpointing``, ``utils``, ``ops``, ``accelerator``, ...) plus what DeepSpeed-integrating libraries
read here: ``__version__`` (the reported distribution version), ``DeepSpeedEngine`` and
``tp_model_init``. Submodules follow DeepSpeed's layout: this package where DeepSpeed's layout differs
from flexspeed's (``runtime.zero`` is a package in DeepSpeed), flexspeed's module of the same path
elsewhere (see :mod:`flexspeed.integrations.identity`).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import flexspeed
from flexspeed.config.errors import ConfigError
# a module alias, private so that ``dir(deepspeed)`` shows DeepSpeed's names only
from flexspeed.integrations import identity as _identity
from flexspeed.integrations.identity import DEEPSPEED_BASE_VERSION, distribution_version

__version__ = distribution_version()
__version_major__, __version_minor__, __version_patch__ = (int(x) for x in DEEPSPEED_BASE_VERSION.split("."))
__git_hash__ = "unknown"
__git_branch__ = "unknown"


def tp_model_init(model: Any, tp_size: int, dtype: Any, config: Any = None, **kwargs: Any) -> Any:
    """DeepSpeed's AutoTP for training: not available in flexspeed (a clear error at start)."""
    raise ConfigError(
        f"tensor_parallel.autotp_size={tp_size}: DeepSpeed's training-time AutoTP (deepspeed.tp_model_init) is not "
        "implemented by flexspeed. Fix: remove 'tensor_parallel.autotp_size' from the DeepSpeed config (use ZeRO "
        "stage 2/3 for memory), or run with DeepSpeed itself", key="tensor_parallel.autotp_size")


def __getattr__(name: str) -> Any:
    if name == "DeepSpeedEngine":
        from flexspeed.runtime.engine import DeepSpeedEngine

        return DeepSpeedEngine
    if name.startswith("__"):
        raise AttributeError(f"module 'deepspeed' has no attribute {name!r}")
    try:
        value = getattr(flexspeed, name)
    except AttributeError:
        value = None
    if value is None or isinstance(value, ModuleType):
        real = _identity.alias_target(f"deepspeed.{name}")
        if real is not None:
            return importlib.import_module(real)
    if value is None:
        raise AttributeError(f"module 'deepspeed' (flexspeed's compatibility layer) has no attribute {name!r}; "
                             "docs/integrations.md lists the DeepSpeed names flexspeed provides")
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(dir(flexspeed)) | {"DeepSpeedEngine"})
