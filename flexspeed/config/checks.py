"""Cross-field checks: settings that are each valid but do not work together.

Each check is a small function raising :class:`ConfigError` with the key, the values and the
fix; :func:`check_compatibility` runs them in order. Checks that need resolved values (the
scheduler's parameters may still say ``"auto"``) run only when ``resolved=True``.
"""

from __future__ import annotations

from collections.abc import Callable

from flexspeed.config.errors import ConfigError
from flexspeed.config.schema import FlexConfig
from flexspeed.config.validate import format_value

__all__ = ["check_compatibility", "validate_scheduler"]


def check_compatibility(cfg: FlexConfig, *, resolved: bool = False) -> None:
    """Raise ConfigError for the first incompatible combination of settings in ``cfg``."""
    checks: list[Callable[[FlexConfig], None]] = [
        _check_precision,
        _check_offload,
        _check_optimizer,
        _check_scheduler_type,
        _check_sparse_gradients,
        _check_pipeline,
    ]
    if resolved:
        checks.append(validate_scheduler)
    for check in checks:
        check(cfg)


def _check_precision(cfg: FlexConfig) -> None:
    if cfg.fp16.enabled is True and cfg.bf16.enabled is True:
        raise ConfigError(
            "fp16.enabled and bf16.enabled are both true; only one mixed-precision mode can be "
            'active. Fix: set "enabled": false in one of "fp16" and "bf16" (bf16 needs no loss '
            "scaling and is the better choice on hardware that supports it).",
            key="bf16.enabled",
        )


def _check_offload(cfg: FlexConfig) -> None:
    zero = cfg.zero_optimization
    for name in ("offload_optimizer", "offload_param"):
        section = getattr(zero, name)
        if section is not None and section.device == "nvme":
            raise ConfigError(
                f'device "nvme" is not supported yet by flexspeed. Fix: set "device": "cpu" '
                f"(or \"none\") in zero_optimization.{name}.",
                key=f"zero_optimization.{name}.device",
            )
    param = zero.offload_param
    if param is not None and param.device != "none" and zero.stage < 3:
        raise ConfigError(
            f'offload_param with device "{param.device}" needs ZeRO stage 3 (parameter '
            f"partitioning), but zero_optimization.stage is {zero.stage}. Fix: set "
            '"stage": 3, or remove offload_param (offload_optimizer works with stages 1-3).',
            key="zero_optimization.offload_param",
        )
    opt = zero.offload_optimizer
    if opt is not None and opt.device != "none" and zero.stage == 0:
        raise ConfigError(
            f'offload_optimizer with device "{opt.device}" needs ZeRO stage 1, 2 or 3, but '
            'zero_optimization.stage is 0. Fix: set "stage": 2 (the usual ZeRO-Offload '
            "setting), or remove offload_optimizer.",
            key="zero_optimization.offload_optimizer",
        )


def _check_optimizer(cfg: FlexConfig) -> None:
    opt = cfg.optimizer
    if opt is None:
        return
    if opt.type is None:
        raise ConfigError(
            'the "optimizer" section has no "type". Fix: add e.g. "type": "AdamW", or remove '
            "the section and pass an optimizer to initialize().",
            key="optimizer.type",
        )
    if "max_grad_norm" in opt.params:
        raise ConfigError(
            f"max_grad_norm ({format_value(opt.params['max_grad_norm'])}) is not an optimizer "
            "parameter. Fix: remove it from optimizer.params and set the top-level "
            f'"gradient_clipping": {format_value(opt.params["max_grad_norm"])}.',
            key="optimizer.params.max_grad_norm",
        )


def _check_scheduler_type(cfg: FlexConfig) -> None:
    if cfg.scheduler is not None and cfg.scheduler.type is None:
        raise ConfigError(
            'the "scheduler" section has no "type". Fix: add e.g. "type": "WarmupLR", or remove '
            "the section.",
            key="scheduler.type",
        )


def _check_sparse_gradients(cfg: FlexConfig) -> None:
    if cfg.sparse_gradients:
        raise ConfigError(
            "flexspeed does not implement sparse gradient reduction. Fix: remove "
            '"sparse_gradients" or set it to false (embedding gradients are reduced densely).',
            key="sparse_gradients",
        )


def _check_pipeline(cfg: FlexConfig) -> None:
    pipe = cfg.pipeline
    interleaved = pipe.schedule == "interleaved_1f1b"
    if interleaved != (pipe.virtual_stages > 1):
        raise ConfigError(
            f'pipeline.schedule "{pipe.schedule}" with virtual_stages {pipe.virtual_stages}: '
            "several model chunks per rank need the interleaved schedule, and the interleaved "
            'schedule needs several chunks. Fix: use "schedule": "interleaved_1f1b" with '
            '"virtual_stages" >= 2, or "1f1b"/"gpipe" with "virtual_stages": 1.',
            key="pipeline.virtual_stages",
        )


def validate_scheduler(cfg: FlexConfig) -> None:
    """Check the scheduler's params with the runtime's own validator.

    Imported lazily: ``flexspeed.runtime.schedulers`` imports torch, ``flexspeed.config`` must not.
    """
    if cfg.scheduler is None or cfg.scheduler.type is None:
        return
    from flexspeed.runtime.schedulers import validate_scheduler_params

    validate_scheduler_params(cfg.scheduler.type, dict(cfg.scheduler.params))
