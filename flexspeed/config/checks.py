"""Cross-field checks: settings that are each valid but do not work together.

Each check is a small function raising :class:`ConfigError` with the key, the values and the
fix; :func:`check_compatibility` runs them in order. Checks that need resolved values run only
when ``resolved=True``: :func:`check_runtime_sections` then builds the optimizer and scheduler
over stand-in parameters with the functions ``initialize()`` uses (the optimizer's parameters
may still say ``"auto"`` before resolution). ``resolve_config`` runs that pass, so
``flexspeed check-config`` and ``initialize()`` reject a config identically.
"""

from __future__ import annotations

from collections.abc import Callable

from flexspeed.config.errors import ConfigError
from flexspeed.config.schema import FlexConfig
from flexspeed.config.sections import ActivationCheckpointingConfig
from flexspeed.config.validate import format_value

__all__ = ["check_compatibility", "check_activation_checkpointing", "check_runtime_sections"]


def check_compatibility(cfg: FlexConfig, *, resolved: bool = False) -> None:
    """Raise ConfigError for the first incompatible combination of settings in ``cfg``."""
    checks: list[Callable[[FlexConfig], None]] = [
        _check_precision,
        _check_offload,
        _check_zero_variants,
        _check_optimizer,
        _check_scheduler_type,
        _check_sparse_gradients,
        _check_gradient_allreduce_op,
        _check_pipeline,
        _check_activation_checkpointing,
    ]
    if resolved:
        checks.append(check_runtime_sections)
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


def _check_zero_variants(cfg: FlexConfig) -> None:
    """ZeRO++ and MiCS change how weights and gradients are sharded or quantized; flexspeed has neither."""
    zero = cfg.zero_optimization
    refused = [(name, getattr(zero, name)) for name in
               ("zero_quantized_weights", "zero_quantized_nontrainable_weights", "zero_quantized_gradients",
                "mics_hierarchical_params_gather") if getattr(zero, name) is True]
    if zero.zero_hpz_partition_size > 1:
        refused.append(("zero_hpz_partition_size", zero.zero_hpz_partition_size))
    if zero.mics_shard_size > 0:
        refused.append(("mics_shard_size", zero.mics_shard_size))
    if refused:
        name, value = refused[0]
        what = "MiCS" if name.startswith("mics") else "ZeRO++"
        off = "1" if name == "zero_hpz_partition_size" else "-1" if name == "mics_shard_size" else "false"
        raise ConfigError(
            f"got {format_value(value)}: flexspeed does not implement {what} (its training would differ from "
            f"the run the config describes). Fix: remove the key or set it to {off} (plain ZeRO sharding over "
            "all data-parallel ranks).",
            key=f"zero_optimization.{name}",
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


def _check_gradient_allreduce_op(cfg: FlexConfig) -> None:
    if cfg.gradient_allreduce_op == "sum" and int(getattr(cfg.tensor_parallel, "autotp_size", 1) or 1) > 1:
        raise ConfigError(
            "got \"sum\" with tensor_parallel.autotp_size > 1: flexspeed's tensor-parallel training averages the "
            'data-parallel gradients. Fix: use "mean" (the default) and multiply the learning rate by the '
            "data-parallel size",
            key="gradient_allreduce_op",
        )
    # DeepSpeed's own refusal: ZeRO-3 partitions parameters and always averages
    if cfg.gradient_allreduce_op == "sum" and cfg.zero_optimization.stage == 3:
        raise ConfigError(
            "got \"sum\": gradient_allreduce_op='sum' is not supported with ZeRO stage 3 (as in DeepSpeed). "
            'Fix: use "mean" (the default) and multiply the learning rate by the data-parallel size, or use '
            "ZeRO stage 0-2",
            key="gradient_allreduce_op",
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


def _check_activation_checkpointing(cfg: FlexConfig) -> None:
    check_activation_checkpointing(cfg.activation_checkpointing)


def check_activation_checkpointing(section: ActivationCheckpointingConfig) -> None:
    """Refuse the ``activation_checkpointing`` settings flexspeed cannot honour.

    Used by the config checks and by ``flexspeed.checkpointing.configure()`` (whose keyword
    arguments become the same section), so both say the same thing.
    """
    if section.contiguous_memory_optimization:
        raise ConfigError(
            "is true, which asks DeepSpeed to copy checkpointed activations into one preallocated buffer (sized by "
            "number_checkpoints, with partition_activations) to limit fragmentation; flexspeed checkpoints on "
            "torch.utils.checkpoint and leaves the freed blocks to PyTorch's caching allocator, so it cannot "
            'honour this. Fix: set "contiguous_memory_optimization": false (partition_activations, '
            "cpu_checkpointing, synchronize_checkpoint_boundary and profile all work).",
            key="activation_checkpointing.contiguous_memory_optimization",
        )


def check_runtime_sections(cfg: FlexConfig) -> None:
    """Build the optimizer and scheduler sections as ``initialize()`` would, without a model.

    Imported lazily: ``flexspeed.runtime`` imports torch, ``flexspeed.config`` must not.
    """
    from flexspeed.runtime.preflight import check_buildable

    check_buildable(cfg)
