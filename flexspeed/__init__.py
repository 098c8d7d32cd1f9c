"""flexspeed: one configuration-driven entry point for large-model training and inference.

The public surface follows DeepSpeed's names, so ``import flexspeed as deepspeed`` runs a
typical DeepSpeed script. Heavy submodules (torch.distributed, the engines, the inference
stack) are imported lazily, on first attribute access, so ``import flexspeed`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
# DeepSpeed's version attributes; the git ones read "unknown" as an installed DeepSpeed wheel's do
__version_major__, __version_minor__, __version_patch__ = (int(x) for x in __version__.split(".")[:3])
__git_hash__ = "unknown"
__git_branch__ = "unknown"

# Minimum torch: FSDP2 on CPU/gloo produced wrong gradients before 2.10.
MIN_TORCH = (2, 10)

__all__ = [
    "__version__",
    "initialize",
    "init_inference",
    "tp_model_init",
    "init_distributed",
    "add_config_arguments",
    "ConfigError",
    "comm",
    "pipe",
    "zero",
    "checkpointing",
    # DeepSpeed's other top-level names and the subpackages its scripts reach through `deepspeed.`
    "utils",
    "accelerator",
    "ops",
    "runtime",
    "get_accelerator",
    "logger",
    "log_dist",
    "DeepSpeedConfigError",
    "PipelineModule",
]

# attribute -> (module, name or None for the module itself)
_LAZY: dict[str, tuple[str, str | None]] = {
    "initialize": ("flexspeed.runtime.initialize", "initialize"),
    "add_config_arguments": ("flexspeed.config.args", "add_config_arguments"),
    "init_inference": ("flexspeed.inference", "init_inference"),
    "tp_model_init": ("flexspeed.distributed.tensor_parallel", "tp_model_init"),
    "init_distributed": ("flexspeed.distributed", "init_distributed"),
    "ConfigError": ("flexspeed.config.errors", "ConfigError"),
    "comm": ("flexspeed.comm", None),
    "pipe": ("flexspeed.pipe", None),
    "zero": ("flexspeed.zero", None),
    "checkpointing": ("flexspeed.runtime.activation_checkpointing.checkpointing", None),
    "utils": ("flexspeed.utils", None),
    "accelerator": ("flexspeed.accelerator", None),
    "ops": ("flexspeed.ops", None),
    "runtime": ("flexspeed.runtime", None),
    "moe": ("flexspeed.moe", None),
    "get_accelerator": ("flexspeed.accelerator", "get_accelerator"),
    "logger": ("flexspeed.utils.logging", "logger"),
    "log_dist": ("flexspeed.utils.logging", "log_dist"),
    "DeepSpeedConfigError": ("flexspeed.config.errors", "ConfigError"),
    "PipelineModule": ("flexspeed.pipe", "PipelineModule"),
}

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from flexspeed import comm, pipe, zero  # noqa: F401
    from flexspeed.config.args import add_config_arguments  # noqa: F401
    from flexspeed.config.errors import ConfigError  # noqa: F401
    from flexspeed.distributed import init_distributed  # noqa: F401
    from flexspeed.inference import init_inference  # noqa: F401
    from flexspeed.runtime.initialize import initialize  # noqa: F401


def __getattr__(name: str) -> Any:
    try:
        module_name, attr = _LAZY[name]
    except KeyError:
        raise AttributeError(f"module 'flexspeed' has no attribute {name!r}") from None
    module = importlib.import_module(module_name)
    value = module if attr is None else getattr(module, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
