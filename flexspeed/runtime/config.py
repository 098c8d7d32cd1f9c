"""``deepspeed.runtime.config``: the names DeepSpeed scripts import from it.

``DeepSpeedConfigError`` is flexspeed's :class:`~flexspeed.config.ConfigError` itself (not a
copy), so ``except DeepSpeedConfigError`` catches every configuration error flexspeed raises.

``DeepSpeedConfig(config)`` reads, validates and resolves a config exactly as ``initialize()``
does (the batch triad for the current data-parallel world size: ``torch.distributed``'s world
size when a group is up, else 1) and answers DeepSpeed's attribute names; any other attribute
is the resolved :class:`~flexspeed.config.FlexConfig`'s (``cfg.checkpoint``, ``cfg.pipeline``, ...).
"""

from __future__ import annotations

from typing import Any

from flexspeed.config.errors import ConfigError

__all__ = ["DeepSpeedConfigError", "DeepSpeedConfig", "ADAM_OPTIMIZER", "ADAMW_OPTIMIZER", "LAMB_OPTIMIZER",
           "SGD_OPTIMIZER", "ADAGRAD_OPTIMIZER", "LION_OPTIMIZER"]

DeepSpeedConfigError = ConfigError

# DeepSpeed's optimizer name constants (``from deepspeed.runtime.config import ADAM_OPTIMIZER``)
ADAM_OPTIMIZER = "adam"
ADAMW_OPTIMIZER = "adamw"
LAMB_OPTIMIZER = "lamb"
SGD_OPTIMIZER = "sgd"
ADAGRAD_OPTIMIZER = "adagrad"
LION_OPTIMIZER = "lion"


class DeepSpeedConfig:
    """A config as ``initialize()`` sees it, with DeepSpeed's ``DeepSpeedConfig`` attribute names.

    Args:
        config: a path (JSON/HJSON), a dict, or base64-encoded JSON.
        mpu: must be ``None`` (flexspeed has no model-parallel unit).
        mesh_device: must be ``None``.
    Raises:
        ConfigError: the config is malformed, names an unknown key, or its batch triad does not fit
            the world size.
    """

    def __init__(self, config: Any, mpu: Any = None, mesh_device: Any = None) -> None:
        from flexspeed.config import build_config, load_config

        if mpu is not None or mesh_device is not None:
            raise ValueError("DeepSpeedConfig(mpu=..., mesh_device=...) is not supported: flexspeed has no "
                             "model-parallel unit. Fix: pass the config only")
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            self.global_rank, self.world_size = dist.get_rank(), dist.get_world_size()
            source = f"the process group's world size {self.world_size}"
        else:
            self.global_rank, self.world_size = 0, 1
            source = "no process group (world size 1)"
        self._param_dict: dict[str, Any] = load_config(config=config)
        self._config = build_config(config=self._param_dict, world_size=self.world_size, world_size_source=source)

    @property
    def train_batch_size(self) -> int:
        return self._config.train_batch_size

    @property
    def train_micro_batch_size_per_gpu(self) -> int:
        return self._config.train_micro_batch_size_per_gpu

    @property
    def gradient_accumulation_steps(self) -> int:
        return self._config.gradient_accumulation_steps

    @property
    def zero_config(self) -> Any:
        return self._config.zero_optimization

    @property
    def zero_optimization_stage(self) -> int:
        return self._config.zero_optimization.stage

    @property
    def zero_enabled(self) -> bool:
        return self._config.zero_optimization.stage > 0

    @property
    def fp16_enabled(self) -> bool:
        return self._config.precision == "fp16"

    @property
    def bfloat16_enabled(self) -> bool:
        return self._config.precision == "bf16"

    @property
    def optimizer_name(self) -> str | None:
        opt = self._config.optimizer
        return opt.type.lower() if opt is not None else None

    @property
    def optimizer_params(self) -> dict | None:
        opt = self._config.optimizer
        return dict(opt.params or {}) if opt is not None else None

    @property
    def scheduler_name(self) -> str | None:
        sched = self._config.scheduler
        return sched.type if sched is not None else None

    @property
    def scheduler_params(self) -> dict | None:
        sched = self._config.scheduler
        return dict(sched.params or {}) if sched is not None else None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return getattr(self._config, name)
        except AttributeError:
            raise AttributeError(f"'DeepSpeedConfig' has no attribute {name!r} (nor has flexspeed's FlexConfig)") \
                from None
