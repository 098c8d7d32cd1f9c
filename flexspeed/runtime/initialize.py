"""``flexspeed.initialize``: config -> distributed context -> engine, top to bottom.

1. load the config sources and merge them (conflicts are errors naming both values)
2. start (or join) the process group
3. resolve the config (batch triad, "auto") against the real world size; this also builds the
   optimizer/scheduler sections over stand-in parameters (the checks ``flexspeed check-config``
   makes, from the same code); configure ``flexspeed.checkpointing`` from the config
4. dispatch on the model type: ``PipelineModule`` -> pipeline engine (its degrees validated by
   ``ParallelDims`` first), else the data-parallel one
5. precision policy and loss scaler; ZeRO strategy (wraps/shards the module, or each pipeline stage)
6. optimizer and scheduler (client object, client callable, or config section - never two), built by
   ``flexspeed.runtime.builders`` for both engines
7. dataloader; the engine
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

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




def _initialize_pipeline(raw: dict, env: Any, *, model: nn.Module, tp: tuple = (1, None, None),
                         **engine_args: Any) -> tuple[Any, Any, Any, Any]:
    """``initialize()`` for a ``PipelineModule``: the degrees validated (``ParallelDims``, before any collective),
    the batch triad over the data-parallel size, then the pipeline engine."""
    from flexspeed.config import build_config
    from flexspeed.distributed.parallel_dims import ParallelDims
    from flexspeed.pipe.engine import build_pipeline_engine
    from flexspeed.runtime.activation_checkpointing import checkpointing
    from flexspeed.utils.tensor_fragment import register_optimizer

    stages = int(model.num_stages)
    dims = ParallelDims.from_world(env.world_size, pp=stages, tp=tp[0], world_source=env.source,
                                   pp_source=f"the PipelineModule's num_stages={stages}",
                                   tp_source=f"tensor_parallel.autotp_size={tp[0]}")
    per_replica = f"{stages} pipeline stages" + (f" x tensor_parallel.autotp_size {tp[0]}" if tp[0] > 1 else "")
    cfg = build_config(config=raw, world_size=dims.dp,
                       world_size_source=f"{env.source} / {per_replica} = data-parallel size",
                       hidden_size=_hidden_size(model))
    checkpointing.configure_from_config(cfg)
    engine, opt, loader, sched = build_pipeline_engine(model=model, config=cfg, dims=dims, launch_env=env,
                                                       tp_plan=tp[1], tp_dtype=tp[2], **engine_args)
    register_optimizer(opt, stage=engine.zero_optimization_stage(), group=engine.dp_group)
    from flexspeed.runtime.autosave import build_autosaver

    engine.autosaver = build_autosaver(engine, cfg)  # checkpoint.save_dir/save_interval/auto_resume
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
    from flexspeed.runtime.builders import (
        build_loss_scaler,
        build_optimizer,
        build_scheduler,
        check_optimizer_given_once,
    )
    from flexspeed.runtime.precision import PrecisionPolicy
    from flexspeed.runtime.fsdp_reuse import is_fsdp_sharded
    from flexspeed.runtime.zero import apply_zero
    from flexspeed.utils.tensor_fragment import register_optimizer

    if model is None:  # DeepSpeed asserts: an AssertionError too
        from flexspeed.runtime.engine_base import EngineUsageError

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
    if _is_pipeline_module(model):  # dp x pp x tp: each stage tensor-parallel, then ZeRO over dp
        return _initialize_pipeline(raw, env, model=model, tp=(tp_size, tp_plan, tp_dtype), optimizer=optimizer,
                                    model_parameters=model_parameters,
                                    lr_scheduler=lr_scheduler, training_data=training_data, collate_fn=collate_fn)

    cfg = build_config(config=raw, world_size=env.world_size // tp_size,
                       world_size_source=env.source if tp_size == 1 else
                       f"{env.source} / tensor_parallel.autotp_size {tp_size} = data-parallel size",
                       hidden_size=_hidden_size(model))
    checkpointing.configure_from_config(cfg)  # the model's flexspeed.checkpointing.checkpoint() calls
    check_optimizer_given_once(cfg, optimizer, lr_scheduler)

    device = default_device()
    precision = PrecisionPolicy(mode=cfg.precision, device_type=device.type)
    scaler = build_loss_scaler(cfg)
    if not any(p.is_meta for p in model.parameters()) and not is_fsdp_sharded(model):  # (sharded: already placed)
        model = model.to(device)
    if tp_size > 1:  # the 2-D (dp, tp) mesh, TP, then ZeRO over dp (flexspeed.distributed.tensor_parallel)
        from flexspeed.distributed.tensor_parallel import setup_tensor_parallel

        strategy, optimizer, model_parameters = setup_tensor_parallel(
            model, config=cfg, device=device, tp_size=tp_size, plan=tp_plan, dtype=tp_dtype, optimizer=optimizer,
            model_parameters=model_parameters)
    else:
        strategy = apply_zero(model, config=cfg, device=device)
    if (strategy.stage >= 2 and is_fsdp_sharded(model)) or tp_size > 1:  # HF save_pretrained over DTensor shards
        from flexspeed.runtime.export import gather_before_save_pretrained

        gather_before_save_pretrained(model)
    opt = build_optimizer(strategy, cfg, optimizer, model_parameters)
    sched = build_scheduler(cfg, lr_scheduler, opt)

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
