"""Resolve a validated config for a concrete run: the batch-size triad and every ``"auto"``.

The batch triad follows DeepSpeed's fill-in rules, with ``W`` the data-parallel world size:

==========================  ==========================================================
given                       derived
==========================  ==========================================================
all three                   checked: ``train_batch_size == micro * accumulation * W``
train_batch_size + micro    ``gradient_accumulation_steps = train_batch_size / (micro * W)``
train_batch_size + accum.   ``micro = train_batch_size / (accumulation * W)``
micro + accumulation        ``train_batch_size = micro * accumulation * W``
train_batch_size only       ``accumulation = 1``, ``micro = train_batch_size / W``
micro only                  ``accumulation = 1``, ``train_batch_size = micro * W``
accumulation only / none    error
==========================  ==========================================================

Divisions must be exact (DeepSpeed floors silently; flexspeed refuses). ``"auto"`` in the triad
counts as "not given", except ``train_micro_batch_size_per_gpu: "auto"``, which takes the data
loader's batch size when one is known.

``"auto"`` elsewhere (the same table is in ``docs/config.md``):

=============================================  ==============================================
key                                            resolves to
=============================================  ==============================================
fp16.enabled, bf16.enabled                     false
gradient_clipping                              1.0 (the Hugging Face Trainer's max_grad_norm)
zero_optimization.reduce_bucket_size           hidden_size * hidden_size
zero_optimization.stage3_prefetch_bucket_size  int(0.9 * hidden_size * hidden_size)
zero_optimization.stage3_param_persistence_... 10 * hidden_size
optimizer.params.lr                            1e-3 (torch.optim.Adam/AdamW default)
optimizer.params.betas                         [0.9, 0.999]
optimizer.params.eps                           1e-8
optimizer.params.weight_decay                  0.0
optimizer.params.momentum                      0.0
scheduler.params.warmup_min_lr                 0.0
scheduler.params.warmup_max_lr                 optimizer.params.lr (after resolution)
=============================================  ==============================================

The bucket sizes need ``hidden_size``; at ZeRO stage < 3 the ``stage3_*`` keys are unused and
resolve to DeepSpeed's defaults without it. Any other ``"auto"`` (e.g. the scheduler's
``total_num_steps``, which depends on the length of training) is a ConfigError naming the key.
``pipeline.stages: "auto"`` is left for the PipelineModule to decide.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from flexspeed.config.errors import ConfigError
from flexspeed.config.schema import FlexConfig
from flexspeed.config.sections import ZeroConfig
from flexspeed.config.validate import format_value, model_validate, validate_config
from flexspeed.utils.logging import warn_once

__all__ = ["resolve_config", "resolve_batch_triad", "build_config", "OPTIMIZER_AUTO", "SCHEDULER_AUTO"]

OPTIMIZER_AUTO: dict[str, Any] = {
    "lr": 1e-3,
    "betas": [0.9, 0.999],
    "eps": 1e-8,
    "weight_decay": 0.0,
    "momentum": 0.0,
}
"""What ``"auto"`` means in ``optimizer.params``."""

SCHEDULER_AUTO: dict[str, Any] = {"warmup_min_lr": 0.0, "warmup_max_lr": "<optimizer.params.lr>"}
"""What ``"auto"`` means in ``scheduler.params`` (``warmup_max_lr`` copies the optimizer's lr)."""

GRADIENT_CLIPPING_AUTO = 1.0
_TRIAD = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def build_config(config: Any = None, config_params: Any = None, args: Any = None, *, world_size: int,
                 world_size_source: str | None = None, dataloader_batch_size: int | None = None,
                 hidden_size: int | None = None) -> FlexConfig:
    """Load, validate and resolve a config in one call.

    Args:
        config, config_params, args: the sources, as for :func:`flexspeed.config.load_config`
            (``config`` may also be a ``FlexConfig``).
        world_size, world_size_source, dataloader_batch_size, hidden_size: as for
            :func:`resolve_config`.

    Returns:
        The resolved config: plain ints in the triad, no ``"auto"`` left.
    """
    from flexspeed.config.loader import load_config

    if isinstance(config, FlexConfig) and config_params is None and args is None:
        raw: Any = config
    else:
        raw = load_config(config=config, config_params=config_params, args=args)
    return resolve_config(raw, world_size=world_size, world_size_source=world_size_source,
                          dataloader_batch_size=dataloader_batch_size, hidden_size=hidden_size)


def resolve_config(config: Mapping[str, Any] | FlexConfig, *, world_size: int,
                   world_size_source: str | None = None, dataloader_batch_size: int | None = None,
                   hidden_size: int | None = None) -> FlexConfig:
    """Fill in the batch triad and every ``"auto"`` for a run at ``world_size``.

    Args:
        config: a raw dict or a validated ``FlexConfig``.
        world_size: data-parallel size the triad is computed for.
        world_size_source: where ``world_size`` came from, for messages
            (``"WORLD_SIZE=2 from torchrun"``, ``"--world-size 4"``).
        dataloader_batch_size: batch size of the user's data loader (fills a micro batch "auto").
        hidden_size: the model's hidden size (fills "auto" bucket sizes).

    Returns:
        A new ``FlexConfig`` with no ``"auto"`` outside ``pipeline.stages``.

    Raises:
        ConfigError: naming the key that is inconsistent or cannot be resolved.
    """
    from flexspeed.config.checks import check_compatibility

    cfg = validate_config(config)
    source = world_size_source or f"world_size={world_size!r} passed by the caller"
    _check_count("world_size", world_size, source)
    _check_count("dataloader_batch_size", dataloader_batch_size, None, optional=True)
    _check_count("hidden_size", hidden_size, None, optional=True)
    data = cfg.model_dump()
    given = [None if data[k] == "auto" else data[k] for k in _TRIAD]
    if cfg.elasticity.enabled:  # DeepSpeed's elastic arithmetic picks the whole triad (flexspeed.config.elasticity)
        from flexspeed.config.elasticity import elastic_triad

        written = {k for k in _TRIAD if k in config} if isinstance(config, Mapping) else set()
        given = list(elastic_triad(cfg.elasticity, world_size, written))
    micro_auto = data["train_micro_batch_size_per_gpu"] == "auto"
    if micro_auto and dataloader_batch_size is not None:
        given[1] = dataloader_batch_size
    try:
        triad = resolve_batch_triad(*given, world_size=world_size, world_size_source=source)
    except ConfigError as exc:
        if micro_auto and given[0] is None and exc.key == "train_micro_batch_size_per_gpu":
            raise ConfigError(
                'is "auto" but no data-loader batch size is known to fill it. Fix: set a number, '
                "or pass training_data to initialize() (dataloader_batch_size= to build_config, "
                "--batch-size to flexspeed check-config).",
                key="train_micro_batch_size_per_gpu",
            ) from None
        raise
    data.update(zip(_TRIAD, triad))
    defaulted: list[str] = []  # "auto" keys filled from flexspeed's defaults, not from the run
    for section in ("fp16", "bf16"):
        if data[section]["enabled"] == "auto":
            data[section]["enabled"] = False
            defaulted.append(f"{section}.enabled=false")
    if data["gradient_clipping"] == "auto":
        data["gradient_clipping"] = GRADIENT_CLIPPING_AUTO
        defaulted.append(f"gradient_clipping={GRADIENT_CLIPPING_AUTO}")
    _resolve_zero(data["zero_optimization"], hidden_size)
    _resolve_params(data, defaulted)
    _reject_leftover_auto(data)
    if defaulted:
        _warn_defaulted(defaulted)
    out = model_validate(FlexConfig, data)
    check_compatibility(out, resolved=True)
    return out


_MAX_BATCH = 2**31 - 1  # a larger batch size is a typo (and overflows int32 index arithmetic)


def _check_count(name: str, value: Any, source: str | None, *, optional: bool = False) -> None:
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        where = f" (from {source})" if source else ""
        raise ConfigError(f"{name} must be a positive integer, got {value!r}{where}.", key=name)


def resolve_batch_triad(train_batch_size: int | None, micro_batch: int | None, grad_accum: int | None, *,
                        world_size: int, world_size_source: str = "the caller") -> tuple[int, int, int]:
    """Apply the fill-in rules (module docstring) to the triad; ``None`` means "not given".

    Returns:
        ``(train_batch_size, train_micro_batch_size_per_gpu, gradient_accumulation_steps)``.

    Raises:
        ConfigError: a non-positive value, an inexact division, an inconsistent triple, or too
            little given; the message shows all three values and the world size's source.
    """
    tbs, micro, gas = train_batch_size, micro_batch, grad_accum
    for key, value in zip(_TRIAD, (tbs, micro, gas)):
        if value is not None and value < 1:
            raise ConfigError(f"must be a positive integer, got {value}. Fix: set it to 1 or more.", key=key)
        if value is not None and value > _MAX_BATCH:
            raise ConfigError(f"got {value}, more than {_MAX_BATCH:,}: no dataset or device holds a batch (or an "
                              "accumulation) that size. Fix: set the value you mean (e.g. 32).", key=key)
    ws = f"world size {world_size} (from {world_size_source})"
    if tbs is None and micro is None:
        raise ConfigError(
            "cannot size the batch: neither train_batch_size nor train_micro_batch_size_per_gpu is "
            f'given ({_given(tbs, micro, gas)}, {ws}). Fix: add "train_micro_batch_size_per_gpu": '
            '<samples per rank> (and optionally "gradient_accumulation_steps").',
            key="train_micro_batch_size_per_gpu",
        )
    if tbs is None:
        gas = gas or 1
        return micro * gas * world_size, micro, gas
    if micro is not None and gas is None:
        gas = _exact(tbs, micro, world_size, ws, derived="gradient_accumulation_steps",
                     by=f"train_micro_batch_size_per_gpu {micro}")
        return tbs, micro, gas
    if micro is None:
        gas = gas or 1
        micro = _exact(tbs, gas, world_size, ws, derived="train_micro_batch_size_per_gpu",
                       by=f"gradient_accumulation_steps {gas}")
        return tbs, micro, gas
    if tbs != micro * gas * world_size:
        product = micro * gas * world_size
        raise ConfigError(
            f"batch sizes do not add up: train_batch_size {tbs} != train_micro_batch_size_per_gpu "
            f"{micro} * gradient_accumulation_steps {gas} * {ws} = {product}. Fix: set "
            f"train_batch_size to {product}, or leave out one of the three keys and flexspeed "
            "derives it.",
            key="train_batch_size",
        )
    return tbs, micro, gas


def _exact(tbs: int, factor: int, world_size: int, ws: str, *, derived: str, by: str) -> int:
    """``tbs / (factor * world_size)``, refusing a remainder."""
    divisor = factor * world_size
    if tbs % divisor:
        nearest = divisor * max(1, round(tbs / divisor))
        raise ConfigError(
            f"train_batch_size {tbs} is not divisible by {by} * {ws} = {divisor}, so {derived} "
            f"cannot be derived. Fix: make train_batch_size a multiple of {divisor} (e.g. "
            f"{nearest}), or set {derived} explicitly.",
            key="train_batch_size",
        )
    return tbs // divisor


def _given(tbs: int | None, micro: int | None, gas: int | None) -> str:
    return ", ".join(f"{k}={'not given' if v is None else v}" for k, v in zip(_TRIAD, (tbs, micro, gas)))


_STAGE3_DEFAULTS = {
    "stage3_prefetch_bucket_size": ZeroConfig.model_fields["stage3_prefetch_bucket_size"].default,
    "stage3_param_persistence_threshold": ZeroConfig.model_fields["stage3_param_persistence_threshold"].default,
}


def _resolve_zero(zero: dict[str, Any], hidden_size: int | None) -> None:
    rules = {
        "reduce_bucket_size": lambda h: h * h,
        "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
        "stage3_param_persistence_threshold": lambda h: 10 * h,
    }
    for key, rule in rules.items():
        if zero[key] != "auto":
            continue
        if hidden_size is not None:
            zero[key] = rule(hidden_size)
        elif key in _STAGE3_DEFAULTS and zero["stage"] < 3:
            zero[key] = _STAGE3_DEFAULTS[key]  # unused below stage 3
        else:
            raise ConfigError(
                '"auto" is computed from the model\'s hidden size, which is not known here. Fix: '
                "set a number, or pass hidden_size= (initialize() reads model.config.hidden_size "
                "when the model has one; flexspeed check-config takes --hidden-size).",
                key=f"zero_optimization.{key}",
            )


def _warn_defaulted(defaulted: list[str]) -> None:
    """Once per distinct set: name every ``"auto"`` that got a default value rather than the run's."""
    message = (f'config "auto" values filled with defaults (no trainer supplied them): {", ".join(defaulted)}. '
               'Fix: set these keys to the values your run needs (the Hugging Face Trainer fills them from its '
               "arguments when it passes the config)")
    warn_once(message, stacklevel=4)


def _resolve_params(data: dict[str, Any], defaulted: list[str]) -> None:
    opt = data.get("optimizer")
    if opt is not None:
        opt["params"] = _fill(opt["params"], OPTIMIZER_AUTO, "optimizer.params", defaulted)
    sched = data.get("scheduler")
    if sched is not None:
        table = dict(SCHEDULER_AUTO)
        lr = (opt or {}).get("params", {}).get("lr")
        if isinstance(lr, (int, float)) and not isinstance(lr, bool):
            table["warmup_max_lr"] = lr
        else:
            del table["warmup_max_lr"]
        sched["params"] = _fill(sched["params"], table, "scheduler.params", defaulted, sourced={"warmup_max_lr"})


def _fill(params: dict[str, Any], table: dict[str, Any], path: str, defaulted: list[str],
          sourced: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:
    out = {}
    for key, value in params.items():
        if isinstance(value, str) and value == "auto":
            if key not in sourced:
                defaulted.append(f"{path}.{key}={format_value(table.get(key))}")
            if key not in table:
                known = ", ".join(table) or "none"
                why = (" (warmup_max_lr copies optimizer.params.lr, and the config has no numeric lr)"
                       if key == "warmup_max_lr" else "")
                raise ConfigError(
                    f'"auto" has no default for this key{why}. Keys with an "auto" default in '
                    f"{path}: {known}. Fix: set a value.",
                    key=f"{path}.{key}",
                )
            value = list(table[key]) if isinstance(table[key], list) else table[key]
        out[key] = value
    return out


def _reject_leftover_auto(value: Any, path: str = "") -> None:
    if isinstance(value, str) and value == "auto" and path != "pipeline.stages":
        raise ConfigError(f'"auto" cannot be resolved for this key. Fix: set a value '
                          f"(got {format_value(value)}).", key=path or None)
    if isinstance(value, Mapping):
        for key, item in value.items():
            _reject_leftover_auto(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _reject_leftover_auto(item, f"{path}[{i}]")
