"""``flexspeed.initialize``: config -> distributed context -> engine, top to bottom.

1. load the config sources and merge them (conflicts are errors naming both values)
2. start (or join) the process group
3. resolve the config (batch triad, "auto") against the real world size; this also builds the
   optimizer/scheduler sections over stand-in parameters (the checks ``flexspeed check-config``
   makes, from the same code); configure ``flexspeed.checkpointing`` from the config
4. dispatch on the model type: ``PipelineModule`` -> pipeline engine, else the data-parallel one
5. precision policy and loss scaler; ZeRO strategy (wraps/shards the module)
6. optimizer and scheduler (client object, client callable, or config section - never two)
7. dataloader; the engine
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from flexspeed.config.errors import ConfigError

__all__ = ["initialize"]


def _hidden_size(model: nn.Module) -> int | None:
    """The model's hidden size for "auto" bucket sizes, from common attribute names."""
    for owner in (model, getattr(model, "config", None)):
        for name in ("hidden_size", "n_embd", "d_model", "dim"):
            value = getattr(owner, name, None)
            if isinstance(value, int) and value > 0:
                return value
    return None


def _is_pipeline_module(model: nn.Module) -> bool:
    try:
        from flexspeed.pipe import PipelineModule  # light: the module classes only
    except ImportError:
        return False
    return isinstance(model, PipelineModule)


def _norm_opt_name(name: str) -> str:
    return name.lower().replace("_", "")


def _check_client_vs_config(kind: str, client: Any, section: Any) -> None:
    """An optimizer/scheduler given both as an object and in the config must agree, else error."""
    if client is None or section is None:
        return
    cls = type(client).__name__
    cfg_type = section.type
    same_type = _norm_opt_name(cls) == _norm_opt_name(cfg_type) or (
        kind == "optimizer" and _norm_opt_name(cfg_type) == "adam" and cls == "AdamW")
    diffs: list[str] = []
    if kind == "optimizer" and same_type and callable(client) is False:
        defaults = client.defaults
        for key, value in (section.params or {}).items():
            if key in defaults:
                have = tuple(defaults[key]) if isinstance(defaults[key], (list, tuple)) else defaults[key]
                want = tuple(value) if isinstance(value, (list, tuple)) else value
                if have != want:
                    diffs.append(f"{kind}.params.{key}: config {value!r} vs client object {defaults[key]!r}")
    if not same_type or diffs or kind == "scheduler" and section.params:
        detail = "; ".join(diffs) or f"config {kind}.type={cfg_type!r} vs client object {cls}"
        raise ConfigError(
            f"the {kind} is given twice, as an object passed to initialize() and in the config, and they "
            f"differ ({detail}). Fix: remove the '{kind}' section from the config, or stop passing {kind}=...",
            key=kind)


def _refuse_sharded_model(model: nn.Module) -> None:
    """A model an earlier ``initialize()`` sharded (ZeRO stage 2-3) cannot be wrapped again."""
    from torch.distributed.fsdp import FSDPModule

    if any(isinstance(m, FSDPModule) for m in model.modules()):
        raise ValueError(
            "initialize() got a model an earlier initialize() already sharded at ZeRO stage 2 or 3 (FSDP2 shards a "
            "module once; DeepSpeed can wrap the same model again). Fix: build a fresh model for the second "
            "engine, or keep using the first engine")


def _build_optimizer(strategy: Any, cfg: Any, client: Any, model_parameters: Iterable | None) -> Any:
    from flexspeed.runtime.optimizers import build_optimizer

    allow = bool(getattr(cfg, "zero_allow_untested_optimizer", False))
    if isinstance(client, torch.optim.Optimizer):
        return strategy.build_optimizer(client, None, allow)
    if callable(client):
        return strategy.build_optimizer(None, client, allow)
    if cfg.optimizer is None:
        return None
    groups = list(model_parameters) if model_parameters is not None else None

    def factory(params: list) -> torch.optim.Optimizer:
        # keep the user's param groups (e.g. no weight decay on biases) when they gave them
        # (re-pointed at the sharded parameters when ZeRO replaced them)
        use = strategy.map_params(groups) if groups else params
        return build_optimizer(cfg.optimizer.type, dict(cfg.optimizer.params or {}), use)

    return strategy.build_optimizer(None, factory, allow)


def _build_scheduler(cfg: Any, client: Any, optimizer: Any) -> Any:
    if client is not None:
        if callable(client) and not hasattr(client, "step"):
            return client(optimizer)
        driven = getattr(client, "optimizer", None)
        if isinstance(driven, torch.optim.Optimizer) and driven is not optimizer:
            # DeepSpeed asserts this (its isinstance(_LRScheduler) test misses torch >= 2.2's schedulers)
            from flexspeed.runtime.engine import EngineUsageError

            made = "built from the config" if optimizer is not None else "none"
            raise EngineUsageError(
                f"Client Optimizer (type = {type(optimizer).__name__}, {made}) is not instantiated but Client LR "
                f"Scheduler is instantiated: the {type(client).__name__} passed as lr_scheduler= drives another "
                f"optimizer ({type(driven).__name__}), which the engine never steps. Fix: pass that optimizer as "
                "optimizer=... too, or pass lr_scheduler= as a callable optimizer -> scheduler")
        return client
    if cfg.scheduler is None or optimizer is None:
        return None
    from flexspeed.runtime.schedulers import build_scheduler

    return build_scheduler(cfg.scheduler.type, dict(cfg.scheduler.params or {}), optimizer)


def _initialize_pipeline(raw: dict, env: Any, *, model: nn.Module, **engine_args: Any) -> tuple[Any, Any, Any, Any]:
    """``initialize()`` for a ``PipelineModule``: the batch triad over the data-parallel size, then the pipeline engine."""
    from flexspeed.config import build_config
    from flexspeed.pipe.engine import build_pipeline_engine
    from flexspeed.runtime.activation_checkpointing import checkpointing
    from flexspeed.utils.tensor_fragment import register_optimizer

    stages = int(model.num_stages)
    if env.world_size % stages:
        raise ConfigError(f"world size {env.world_size} (from {env.source}) is not a multiple of the "
                          f"PipelineModule's num_stages={stages}. Fix: launch a multiple of {stages} processes",
                          key="pipeline")
    cfg = build_config(config=raw, world_size=env.world_size // stages,
                       world_size_source=f"{env.source} / {stages} pipeline stages = data-parallel size",
                       hidden_size=_hidden_size(model))
    checkpointing.configure_from_config(cfg)
    if cfg.checkpoint.save_dir is not None:
        raise ConfigError("(automatic saves and resume) is not implemented for the pipeline engine yet. Fix: remove "
                          "checkpoint.save_dir and its keys, and call engine.save_checkpoint/load_checkpoint",
                          key="checkpoint.save_dir")
    engine, opt, loader, sched = build_pipeline_engine(model=model, config=cfg, **engine_args)
    register_optimizer(opt, stage=engine.zero_optimization_stage(), group=engine.dp_group)
    return engine, opt, loader, sched


def initialize(args: argparse.Namespace | None = None, model: nn.Module | None = None,
               optimizer: torch.optim.Optimizer | Callable | None = None, model_parameters: Iterable | None = None,
               training_data: torch.utils.data.Dataset | None = None, lr_scheduler: Any = None,
               distributed_port: int = 29500, mpu: Any = None, dist_init_required: bool | None = None,
               collate_fn: Callable | None = None, config: str | dict | None = None,
               config_params: dict | None = None) -> tuple[Any, Any, Any, Any]:
    """Build the engine for ``model`` from a DeepSpeed-format config (DeepSpeed's signature).

    Args:
        args: argparse namespace; ``args.deepspeed_config`` is a config source.
        model: the ``nn.Module`` to train (a ``flexspeed.pipe.PipelineModule`` gets the pipeline engine).
        optimizer: a ``torch.optim.Optimizer``, or a callable ``params -> Optimizer``; else built from config.
        model_parameters: parameters (or param groups) for the config optimizer; default ``model.parameters()``.
        training_data: a ``Dataset``; if given, a distributed dataloader is returned.
        lr_scheduler: a scheduler object, or a callable ``optimizer -> scheduler``; else from config.
        distributed_port: rendezvous port when the launcher gives none.
        mpu: Megatron-style model-parallel unit; not supported (flexspeed builds topology on DeviceMesh).
        dist_init_required: ``False`` means torch.distributed is already initialised by the caller.
        collate_fn: batch collation for the dataloader.
        config: a path (JSON/HJSON), a dict, or a base64 JSON string.
        config_params: a dict, DeepSpeed's alias of ``config``; both may be given if they agree.
    Returns:
        ``(engine, optimizer, dataloader, lr_scheduler)``.
    """
    from flexspeed.config import build_config, load_config, validate_config
    from flexspeed.distributed import default_device, init_distributed
    from flexspeed.runtime.data import FlexDataLoader
    from flexspeed.runtime.engine import TrainingEngine
    from flexspeed.runtime.activation_checkpointing import checkpointing
    from flexspeed.runtime.precision import LossScaler, PrecisionPolicy
    from flexspeed.runtime.zero import apply_zero
    from flexspeed.utils.tensor_fragment import register_optimizer

    if model is None:  # DeepSpeed asserts: an AssertionError too
        from flexspeed.runtime.engine import EngineUsageError

        hint = (" (the model was passed positionally, where DeepSpeed's signature has args)"
                if isinstance(args, nn.Module) else "")
        raise EngineUsageError(f"flexspeed.initialize() requires a model{hint}. Fix: call "
                               "initialize(model=<nn.Module>, config=...)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if mpu is not None:
        raise ValueError("mpu= (Megatron model-parallel unit) is not supported: flexspeed builds its topology on "
                         "DeviceMesh. Use a flexspeed.pipe.PipelineModule for pipeline parallelism, or "
                         "flexspeed.init_inference(tensor_parallel=...) for tensor parallelism")
    from flexspeed.utils.logging import ensure_handler

    raw = load_config(config=config, config_params=config_params, args=args)
    validate_config(raw)  # every config error before the group starts, in check-config's order
    env = init_distributed(distributed_port=distributed_port, dist_init_required=dist_init_required, config=raw)

    from flexspeed.distributed.tensor_parallel import resolve_tp

    tp_size, tp_plan, tp_dtype = resolve_tp(raw, model, env.world_size)  # tensor_parallel.autotp_size / tp_model_init
    if _is_pipeline_module(model):
        if tp_size > 1:
            raise ConfigError(f"tensor_parallel.autotp_size={tp_size} with a PipelineModule is not supported yet. "
                              "Fix: remove tensor_parallel (or set autotp_size to 1) for pipeline training",
                              key="tensor_parallel.autotp_size")
        return _initialize_pipeline(raw, env, model=model, optimizer=optimizer, model_parameters=model_parameters,
                                    lr_scheduler=lr_scheduler, training_data=training_data, collate_fn=collate_fn)

    cfg = build_config(config=raw, world_size=env.world_size // tp_size,
                       world_size_source=env.source if tp_size == 1 else
                       f"{env.source} / tensor_parallel.autotp_size {tp_size} = data-parallel size",
                       hidden_size=_hidden_size(model))
    checkpointing.configure_from_config(cfg)  # the model's flexspeed.checkpointing.checkpoint() calls
    _check_client_vs_config("optimizer", optimizer if isinstance(optimizer, torch.optim.Optimizer) else None,
                            cfg.optimizer)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer) and cfg.optimizer is not None:
        raise ConfigError("the optimizer is given twice: a callable passed to initialize() and the config's "
                          f"'optimizer' section (type {cfg.optimizer.type!r}). Fix: keep only one", key="optimizer")
    _check_client_vs_config("scheduler", lr_scheduler if hasattr(lr_scheduler, "step") else None, cfg.scheduler)

    device = default_device()
    precision = PrecisionPolicy(mode=cfg.precision, device_type=device.type)
    scaler = None
    if cfg.precision == "fp16":
        f = cfg.fp16
        scaler = LossScaler(loss_scale=float(f.loss_scale), initial_scale_power=int(f.initial_scale_power),
                            loss_scale_window=int(f.loss_scale_window),
                            # DeepSpeed's stage-0 fp16 optimizer has no hysteresis (its ZeRO stages do)
                            hysteresis=int(f.hysteresis) if cfg.zero_optimization.stage > 0 else 1,
                            consecutive_hysteresis=bool(f.consecutive_hysteresis),
                            min_loss_scale=float(f.min_loss_scale),
                            # ... nor the error at the minimum scale (it keeps skipping there), its ZeRO stages raise
                            raise_error_at_min_scale=cfg.zero_optimization.stage > 0)
    _refuse_sharded_model(model)
    if not any(p.is_meta for p in model.parameters()):
        model = model.to(device)
    if tp_size > 1:  # the 2-D (dp, tp) mesh, TP, then ZeRO over dp (flexspeed.distributed.tensor_parallel)
        from flexspeed.distributed.tensor_parallel import setup_tensor_parallel

        strategy, optimizer, model_parameters = setup_tensor_parallel(
            model, config=cfg, device=device, tp_size=tp_size, plan=tp_plan, dtype=tp_dtype, optimizer=optimizer,
            model_parameters=model_parameters)
    else:
        strategy = apply_zero(model, config=cfg, device=device)
    if strategy.stage >= 2 or tp_size > 1:  # HF models keep a working save_pretrained over sharded parameters
        from flexspeed.runtime.export import gather_before_save_pretrained

        gather_before_save_pretrained(model)
    opt = _build_optimizer(strategy, cfg, optimizer, model_parameters)
    sched = _build_scheduler(cfg, lr_scheduler, opt)

    loader = None
    if training_data is not None:
        loader = FlexDataLoader(training_data, batch_size=cfg.train_micro_batch_size_per_gpu,
                                dp_rank=dist.get_rank(strategy.group) if strategy.group is not None else env.rank,
                                dp_world_size=env.world_size // tp_size, collate_fn=collate_fn,
                                drop_last=bool(cfg.dataloader_drop_last))
    engine = TrainingEngine(strategy=strategy, config=cfg, optimizer=opt, lr_scheduler=sched,
                            training_dataloader=loader, precision=precision, loss_scaler=scaler, device=device,
                            launch_env=env)
    register_optimizer(opt, stage=strategy.stage, group=strategy.group)  # flexspeed.utils.safe_get_full_*
    from flexspeed.runtime.autosave import build_autosaver

    engine.autosaver = build_autosaver(engine, cfg)  # checkpoint.save_dir/save_interval/auto_resume
    if env.rank == 0:
        numel = sum(p.numel() for p in model.parameters())
        ensure_handler().info(
            "initialize: %s parameters, ZeRO stage %d, %s, world size %d (%s), batch %d = micro %d x accumulation "
            "%d x %d ranks, device %s", f"{numel:,}", strategy.stage, cfg.precision, env.world_size, env.source,
            cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps,
            env.world_size // tp_size, device)
    return engine, opt, loader, sched
