"""What both training engines are built from, built one way: the client-vs-config checks, the
loss scaler, the optimizer (over the ZeRO strategy's parameters) and the scheduler.

``flexspeed.initialize`` calls these for a plain module and for each pipeline (a
``PipelineModule``'s stages get the same ZeRO strategies, see :mod:`flexspeed.pipe.engine`).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from flexspeed.config.errors import ConfigError
from flexspeed.runtime.engine_base import EngineUsageError
from flexspeed.runtime.precision import LossScaler

if TYPE_CHECKING:
    from flexspeed.config.schema import FlexConfig
    from flexspeed.runtime.zero import ZeroStrategy

__all__ = ["check_client_vs_config", "check_optimizer_given_once", "build_loss_scaler", "build_optimizer",
           "build_scheduler"]


def _norm_opt_name(name: str) -> str:
    return name.lower().replace("_", "")


def check_client_vs_config(kind: str, client: Any, section: Any) -> None:
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


def check_optimizer_given_once(cfg: FlexConfig, optimizer: Any, lr_scheduler: Any) -> None:
    """Refuse an optimizer (or scheduler) given both to ``initialize()`` and in the config, unless they agree.

    Raises:
        ConfigError: naming the section and the differing values, before anything is built.
    """
    check_client_vs_config("optimizer", optimizer if isinstance(optimizer, torch.optim.Optimizer) else None,
                           cfg.optimizer)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer) and cfg.optimizer is not None:
        raise ConfigError("the optimizer is given twice: a callable passed to initialize() and the config's "
                          f"'optimizer' section (type {cfg.optimizer.type!r}). Fix: keep only one", key="optimizer")
    check_client_vs_config("scheduler", lr_scheduler if hasattr(lr_scheduler, "step") else None, cfg.scheduler)


def build_loss_scaler(cfg: FlexConfig) -> LossScaler | None:
    """The fp16 loss scaler from ``cfg.fp16`` (``None`` unless the precision is fp16)."""
    if cfg.precision != "fp16":
        return None
    f, stage = cfg.fp16, cfg.zero_optimization.stage
    return LossScaler(loss_scale=float(f.loss_scale), initial_scale_power=int(f.initial_scale_power),
                      loss_scale_window=int(f.loss_scale_window),
                      # DeepSpeed's stage-0 fp16 optimizer has no hysteresis (its ZeRO stages do) ...
                      hysteresis=int(f.hysteresis) if stage > 0 else 1,
                      consecutive_hysteresis=bool(f.consecutive_hysteresis), min_loss_scale=float(f.min_loss_scale),
                      # ... nor the error at the minimum scale (it keeps skipping there); its ZeRO stages raise
                      raise_error_at_min_scale=stage > 0)


def build_optimizer(strategy: ZeroStrategy, cfg: FlexConfig, client: Any, model_parameters: Iterable | None) -> Any:
    """The optimizer over ``strategy``'s parameters: the client's object or callable, else the config's section."""
    from flexspeed.runtime.optimizers import build_optimizer as from_section

    allow = cfg.zero_allow_untested_optimizer
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
        return from_section(cfg.optimizer.type, dict(cfg.optimizer.params or {}), use)

    return strategy.build_optimizer(None, factory, allow)


def build_scheduler(cfg: FlexConfig, client: Any, optimizer: Any) -> Any:
    """The scheduler: the client's object or callable ``optimizer -> scheduler``, else the config's section."""
    if client is not None:
        if callable(client) and not hasattr(client, "step"):
            return client(optimizer)
        driven = getattr(client, "optimizer", None)
        if isinstance(driven, torch.optim.Optimizer) and driven is not optimizer:
            # DeepSpeed asserts this (its isinstance(_LRScheduler) test misses torch >= 2.2's schedulers)
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


