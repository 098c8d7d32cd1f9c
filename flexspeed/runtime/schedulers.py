"""Learning-rate schedulers named as in DeepSpeed's config, plus any ``torch.optim.lr_scheduler`` class.

DeepSpeed's five schedulers (``WarmupLR``, ``WarmupDecayLR``, ``WarmupCosineLR``, ``OneCycle``,
``LRRangeTest``) follow DeepSpeed 0.19.8's ``deepspeed/runtime/lr_schedules.py`` step for step:
``tests/compat/test_schedulers_vs_deepspeed.py`` checks every curve against values recorded from
DeepSpeed's engine (``tests/compat/record_schedulers.py``). They are plain classes with the
methods the engine and user code call (``step``, ``get_lr``, ``get_last_lr``, ``state_dict``,
``load_state_dict``), not ``torch.optim.lr_scheduler.LRScheduler`` subclasses: that base class
wraps ``optimizer.step`` and warns about call order, which fights an engine that skips the
scheduler on overflow steps.

Step semantics (DeepSpeed's, the same for all five): ``last_batch_iteration`` is the iteration
whose lr ``step()`` last wrote into the optimizer. A fresh scheduler (the default -1) writes its
initial values at construction - ``warmup_min_lr``, ``cycle_min_lr``/``cycle_min_mom``,
``lr_range_test_min_lr``, or 0.0 for ``WarmupCosineLR`` - and the first optimizer step runs at
them. The engine calls ``step()`` after each applied optimizer step, which moves to iteration
0, 1, 2, ... So optimizer step k (1-based) runs at iteration k - 2's lr: the warmup schedulers
run their first two steps at the minimum, and OneCycle and LRRangeTest, whose formulas read
iteration + 1, never repeat a value. A scheduler built with ``last_batch_iteration`` >= 0
leaves the optimizer untouched until its first ``step()``; ``load_state_dict`` restores the
counter only (the optimizer's own state carries the lr). ``step(n)`` moves to iteration n.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import torch

from flexspeed.config.errors import ConfigError, did_you_mean
from flexspeed.runtime.scheduler_values import check_value as _check_value

__all__ = [
    "WarmupLR",
    "WarmupDecayLR",
    "WarmupCosineLR",
    "OneCycle",
    "LRRangeTest",
    "build_scheduler",
    "validate_scheduler_params",
    "scheduler_names",
]

# torch schedulers that need Python callables, other schedulers or a metric: not expressible in JSON
_TORCH_REJECTED = {
    "LambdaLR": "it takes a Python function (lr_lambda)",
    "MultiplicativeLR": "it takes a Python function (lr_lambda)",
    "SequentialLR": "it takes other scheduler objects",
    "ChainedScheduler": "it takes other scheduler objects",
    "ReduceLROnPlateau": "it needs a validation metric at every step, which the engine does not have",
}


def _accepted(fn: Callable) -> tuple[list[str], list[str]]:
    """(all parameter names, required parameter names) of a constructor, minus ``self``/``optimizer``."""
    names, required = [], []
    for p in inspect.signature(fn).parameters.values():
        if p.name in ("self", "optimizer") or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        names.append(p.name)
        if p.default is p.empty:
            required.append(p.name)
    return names, required


def _torch_schedulers() -> dict[str, type]:
    """Public ``torch.optim.lr_scheduler`` classes by name (including those we reject, for messages)."""
    mod = torch.optim.lr_scheduler
    out = {}
    for name in dir(mod):
        obj = getattr(mod, name)
        if (inspect.isclass(obj) and not name.startswith("_") and name != "LRScheduler"
                and (issubclass(obj, mod.LRScheduler) or name == "ReduceLROnPlateau")):
            out[name] = obj
    return out


def scheduler_names() -> list[str]:
    """Every scheduler name ``build_scheduler`` accepts: DeepSpeed's five, then torch's usable ones."""
    return list(_DS_SCHEDULERS) + sorted(n for n in _torch_schedulers() if n not in _TORCH_REJECTED)


def _resolve(type_name: str) -> tuple[str, type, bool]:
    """Map a config name (case-insensitive) to (canonical name, class, is_deepspeed)."""
    if not isinstance(type_name, str) or not type_name:
        raise ConfigError(f"must be a scheduler name such as 'WarmupLR', got {type_name!r}.", key="scheduler.type")
    lowered = type_name.lower()
    for name, cls in _DS_SCHEDULERS.items():
        if name.lower() == lowered:
            return name, cls, True
    for name, cls in _torch_schedulers().items():
        if name.lower() == lowered:
            if name in _TORCH_REJECTED:
                raise ConfigError(f"torch.optim.lr_scheduler.{name} cannot be built from a config: "
                                  f"{_TORCH_REJECTED[name]}. Build it in Python and pass it as "
                                  f"initialize(lr_scheduler=...) instead.", key="scheduler.type")
            return name, cls, False
    raise ConfigError(f"unknown scheduler {type_name!r}.{did_you_mean(type_name, scheduler_names())} "
                      f"Supported: DeepSpeed's {list(_DS_SCHEDULERS)} or any torch.optim.lr_scheduler "
                      f"class by name (e.g. 'StepLR', 'CosineAnnealingLR').", key="scheduler.type")


def validate_scheduler_params(type_name: str, params: Mapping[str, Any] | None) -> None:
    """Check a ``scheduler`` config section without an optimizer; raise ConfigError on the first problem.

    Checks the type name, unknown and missing parameters, and value types and ranges of
    DeepSpeed's schedulers. The string ``"auto"`` is accepted for any value (the config layer
    resolves it). ``total_num_steps`` below ``warmup_num_steps`` is accepted, as DeepSpeed does;
    building such a scheduler warns.

    Args:
        type_name: ``scheduler.type`` (case-insensitive).
        params: ``scheduler.params``; ``None`` means empty.
    """
    params = dict(params or {})
    name, cls, is_ds = _resolve(type_name)
    accepted, required = _accepted(cls.__init__)
    for key in params:
        if key not in accepted:
            raise ConfigError(f"{name} has no parameter {key!r}.{did_you_mean(key, accepted)} "
                              f"Accepted: {accepted}.", key=f"scheduler.params.{key}")
    for key in required:
        if key not in params:
            raise ConfigError(f"{name} needs {key!r}; add \"{key}\": <value> to scheduler.params.",
                              key=f"scheduler.params.{key}")
    if not is_ds:
        return
    for key, value in params.items():
        _check_value(name, key, value)


# -- the DeepSpeed schedulers -------------------------------------------------------------------

_ONECYCLE_BETA2 = 0.99  # DeepSpeed's OneCycle writes (momentum, 0.99) into Adam-style betas


def _per_group(optimizer: Any, value: Any, name: str) -> list[float]:
    """One float per param group from a scalar or a list (whose length must match)."""
    n = len(optimizer.param_groups)
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ConfigError(f"has {len(value)} values but the optimizer has {n} param groups; give one "
                              f"value, or exactly {n}.", key=f"scheduler.params.{name}")
        return [float(v) for v in value]
    return [float(value)] * n


def _set_group(group: dict, key: str, value: Any) -> None:
    # A tensor lr (capturable/fused optimizers) must be updated in place, as torch's schedulers do.
    if isinstance(group.get(key), torch.Tensor):
        group[key].fill_(value)
    else:
        group[key] = value


def _warn_total_below_warmup(name: str, total: int, warmup: int) -> None:
    # DeepSpeed accepts this with a warning; the curve after warmup is its formula's, reproduced.
    if total < max(2, warmup):
        warnings.warn(f"flexspeed: {name} total_num_steps ({total}) is less than warmup_num_steps ({warmup}); "
                      f"the lr leaves warmup straight at its final value, as in DeepSpeed. Raise "
                      f"total_num_steps or lower warmup_num_steps if that is not intended.", stacklevel=4)


class _IterationScheduler:
    """Shared machinery: DeepSpeed's iteration counter and a closed-form lr (and betas) per iteration.

    Subclasses define ``_lrs_at(i)`` (and ``_betas_at(i)`` when they cycle momentum), record their
    configured hyperparameters with ``_remember`` and end ``__init__`` with ``_start()``.
    """

    def __init__(self, optimizer: Any, last_batch_iteration: int) -> None:
        if not hasattr(optimizer, "param_groups"):
            raise TypeError(f"{type(self).__name__} needs a torch.optim.Optimizer (something with "
                            f"param_groups), got {type(optimizer).__name__}.")
        self.optimizer = optimizer
        self.last_batch_iteration = int(last_batch_iteration)
        self._last_lr: list[float] | None = None
        self._hyperparameters: dict[str, Any] = {}

    def _lrs_at(self, iteration: int) -> list[float]:
        raise NotImplementedError

    def _betas_at(self, iteration: int) -> list[tuple[float, float]] | None:
        """Adam-style ``betas`` per group at ``iteration``; ``None`` leaves them alone."""
        return None

    def _initial_lrs(self) -> list[float]:
        """What a fresh scheduler (``last_batch_iteration == -1``) writes before the first step."""
        return self._lrs_at(-1)

    def _initial_betas(self) -> list[tuple[float, float]] | None:
        return self._betas_at(-1)

    def _remember(self, **hyperparameters: Any) -> None:
        """Keep the configured values, to name the ones a resumed run changed."""
        self._hyperparameters = {k: list(v) if isinstance(v, tuple) else v for k, v in hyperparameters.items()}

    def _start(self) -> None:
        # DeepSpeed writes the initial values only into a fresh schedule; a resumed one
        # (last_batch_iteration >= 0) leaves the optimizer as it is until the first step().
        if self.last_batch_iteration == -1:
            self._write(self._initial_lrs(), self._initial_betas())

    def _write(self, lrs: list[float], betas: list[tuple[float, float]] | None) -> None:
        for i, group in enumerate(self.optimizer.param_groups):
            _set_group(group, "lr", lrs[i])
            if betas is not None:
                group["betas"] = betas[i]
        self._last_lr = [float(g["lr"]) for g in self.optimizer.param_groups]

    def get_lr(self) -> list[float]:
        """The lr of each param group at the current ``last_batch_iteration``."""
        return self._lrs_at(self.last_batch_iteration)

    def get_last_lr(self) -> list[float]:
        """The lr last written into the optimizer (its current lr if nothing was written yet)."""
        if self._last_lr is None:
            return [float(g["lr"]) for g in self.optimizer.param_groups]
        return list(self._last_lr)

    def step(self, last_batch_iteration: int | None = None) -> None:
        """Move to ``last_batch_iteration`` (default: the next one) and write its lr into the optimizer.

        Args:
            last_batch_iteration: absolute iteration to move to, as in DeepSpeed (not an increment).
        """
        if last_batch_iteration is None:
            last_batch_iteration = self.last_batch_iteration + 1
        if isinstance(last_batch_iteration, bool) or int(last_batch_iteration) != last_batch_iteration \
                or last_batch_iteration < -1:
            raise ValueError(f"step() takes the iteration to move to, a whole number >= -1; got "
                             f"{last_batch_iteration!r}.")
        self.last_batch_iteration = int(last_batch_iteration)
        self._write(self.get_lr(), self._betas_at(self.last_batch_iteration))

    def state_dict(self) -> dict[str, Any]:
        """The iteration counter (all DeepSpeed saves) and the configured hyperparameters."""
        return {"last_batch_iteration": self.last_batch_iteration,
                "hyperparameters": {"type": type(self).__name__, **self._hyperparameters}}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the iteration counter, as DeepSpeed does: the optimizer is left as it is.

        The lr of the next optimizer step is the one in the optimizer (restored with its state by
        ``load_checkpoint``); the step after it follows the schedule. Warns once, naming them, when
        the hyperparameters saved differ from this scheduler's (the new values apply from here on).
        """
        if "last_batch_iteration" not in state_dict:
            raise KeyError(f"{type(self).__name__} state_dict needs 'last_batch_iteration'; got keys "
                           f"{sorted(state_dict)}. Was it saved from a different scheduler?")
        self.last_batch_iteration = int(state_dict["last_batch_iteration"])
        saved = state_dict.get("hyperparameters")
        if isinstance(saved, Mapping):
            self._warn_changed(saved)

    def _warn_changed(self, saved: Mapping[str, Any]) -> None:
        now = {"type": type(self).__name__, **self._hyperparameters}
        changed = [f"{k} {saved.get(k)!r} -> {now.get(k)!r}" for k in sorted(set(saved) | set(now))
                   if saved.get(k) != now.get(k)]
        if changed:
            warnings.warn(f"flexspeed: the scheduler's hyperparameters differ from the checkpoint's "
                          f"({'; '.join(changed)}); the schedule continues at iteration "
                          f"{self.last_batch_iteration} with the new values.", stacklevel=3)


def _log_or_linear(iteration: int, num_steps: int, inverse_log: float, warmup_type: str) -> float:
    """DeepSpeed's warmup fraction for ``iteration`` < ``num_steps``: log(i+1)/log(N) or i/N."""
    if warmup_type == "log":
        return inverse_log * math.log(iteration + 1)
    return iteration / num_steps


class WarmupLR(_IterationScheduler):
    """Warm the lr from ``warmup_min_lr`` to ``warmup_max_lr`` over ``warmup_num_steps``, then hold.

    lr(i) = min + (max - min) * gamma(i) at iteration i >= 0, gamma(i) = log(i+1)/log(N) ("log")
    or i/N ("linear") while i < N and 1 after, with N = max(2, warmup_num_steps) as in DeepSpeed.
    A fresh schedule writes ``warmup_min_lr`` before the first step, so the first two optimizer
    steps both run at it. ``warmup_max_lr`` defaults to the optimizer's lr; both may be lists.
    """

    def __init__(self, optimizer: Any, warmup_min_lr: float | list[float] = 0.0,
                 warmup_max_lr: float | list[float] | None = None, warmup_num_steps: int = 1000,
                 warmup_type: str = "log", last_batch_iteration: int = -1) -> None:
        super().__init__(optimizer, last_batch_iteration)
        for name, value in (("warmup_min_lr", warmup_min_lr), ("warmup_max_lr", warmup_max_lr),
                            ("warmup_num_steps", warmup_num_steps), ("warmup_type", warmup_type),
                            ("last_batch_iteration", last_batch_iteration)):
            _check_value(type(self).__name__, name, value)
        if warmup_max_lr is None:
            warmup_max_lr = [float(g["lr"]) for g in optimizer.param_groups]
        self.min_lrs = _per_group(optimizer, warmup_min_lr, "warmup_min_lr")
        self.max_lrs = _per_group(optimizer, warmup_max_lr, "warmup_max_lr")
        self.delta_lrs = [hi - lo for lo, hi in zip(self.min_lrs, self.max_lrs)]
        self.warmup_num_steps = max(2, int(warmup_num_steps))
        self.warmup_type = warmup_type
        self.inverse_log_warm_up = 1.0 / math.log(self.warmup_num_steps)
        self._remember(warmup_min_lr=warmup_min_lr, warmup_max_lr=warmup_max_lr,
                       warmup_num_steps=warmup_num_steps, warmup_type=warmup_type)
        if type(self) is WarmupLR:
            self._start()

    def _gamma(self, iteration: int) -> float:
        if iteration < self.warmup_num_steps:
            return _log_or_linear(iteration, self.warmup_num_steps, self.inverse_log_warm_up, self.warmup_type)
        return 1.0

    def _lrs_at(self, iteration: int) -> list[float]:
        if iteration < 0:
            return list(self.min_lrs)
        gamma = self._gamma(iteration)
        return [lo + delta * gamma for lo, delta in zip(self.min_lrs, self.delta_lrs)]


class WarmupDecayLR(WarmupLR):
    """``WarmupLR``'s warmup, then a linear decay back to ``warmup_min_lr`` at ``total_num_steps``.

    After warmup gamma(i) = max(0, (total - i) / max(1, total - N)).
    """

    def __init__(self, optimizer: Any, total_num_steps: int, warmup_min_lr: float | list[float] = 0.0,
                 warmup_max_lr: float | list[float] = 0.001, warmup_num_steps: int = 1000,
                 warmup_type: str = "log", last_batch_iteration: int = -1) -> None:
        _check_value("WarmupDecayLR", "total_num_steps", total_num_steps)
        super().__init__(optimizer, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type,
                         last_batch_iteration)
        self.total_num_steps = int(total_num_steps)
        self._remember(total_num_steps=total_num_steps, **self._hyperparameters)
        _warn_total_below_warmup("WarmupDecayLR", self.total_num_steps, int(warmup_num_steps))
        self._start()

    def _gamma(self, iteration: int) -> float:
        if iteration < self.warmup_num_steps:
            return super()._gamma(iteration)
        return max(0.0, float(self.total_num_steps - iteration)
                   / float(max(1.0, self.total_num_steps - self.warmup_num_steps)))


class WarmupCosineLR(_IterationScheduler):
    """Scale each group's lr by a ratio: warm up from ``warmup_min_ratio`` to 1, then cosine-anneal.

    During warmup (i < N = max(2, warmup_num_steps)) ratio = min_ratio + (1 - min_ratio) * gamma
    (gamma as in ``WarmupLR``); after it ratio = cos_min + (1 - cos_min) * (1 + cos(pi * p)) / 2
    with p = min(1, (i - N + 1) / max(1, total - N)). The base lr is each group's lr at
    construction. As in DeepSpeed, a fresh schedule writes lr 0.0 before the first step, so the
    first optimizer step runs at lr 0 whatever ``warmup_min_ratio`` is; the flexspeed-only
    ``flexspeed_zero_lr_first_step: false`` writes the warmup's first lr (ratio
    ``warmup_min_ratio``) instead.
    """

    def __init__(self, optimizer: Any, total_num_steps: int, warmup_min_ratio: float = 0.0,
                 warmup_num_steps: int = 1000, cos_min_ratio: float = 0.0001, warmup_type: str = "log",
                 last_batch_iteration: int = -1, flexspeed_zero_lr_first_step: bool = True) -> None:
        super().__init__(optimizer, last_batch_iteration)
        args = dict(locals())
        for name in _accepted(WarmupCosineLR.__init__)[0]:
            _check_value("WarmupCosineLR", name, args[name])
        self.total_num_steps = int(total_num_steps)
        self.warmup_min_ratio = float(warmup_min_ratio)
        self.warmup_num_steps = max(2, int(warmup_num_steps))
        self.inverse_log_warm_up = 1.0 / math.log(self.warmup_num_steps)
        self.cos_min_ratio = float(cos_min_ratio)
        self.warmup_type = warmup_type
        self.zero_lr_first_step = bool(flexspeed_zero_lr_first_step)
        self.org_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self._remember(total_num_steps=total_num_steps, warmup_min_ratio=warmup_min_ratio,
                       warmup_num_steps=warmup_num_steps, cos_min_ratio=cos_min_ratio, warmup_type=warmup_type,
                       flexspeed_zero_lr_first_step=flexspeed_zero_lr_first_step)
        _warn_total_below_warmup("WarmupCosineLR", self.total_num_steps, int(warmup_num_steps))
        self._start()

    def get_lr_ratio(self, iteration: int | None = None) -> float:
        """The multiplier on the base lr at ``iteration`` (default: the current one); 0 before it starts."""
        i = self.last_batch_iteration if iteration is None else iteration
        if i < 0:
            return 0.0
        if i < self.warmup_num_steps:
            ratio = _log_or_linear(i, self.warmup_num_steps, self.inverse_log_warm_up, self.warmup_type)
            return self.warmup_min_ratio + ratio * (1.0 - self.warmup_min_ratio)
        real_last_step = i - self.warmup_num_steps + 1
        real_total_steps = max(1, self.total_num_steps - self.warmup_num_steps)
        progress = min(1.0, real_last_step / real_total_steps)
        ratio = (1 + math.cos(math.pi * progress)) / 2
        return max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) * ratio)

    def _lrs_at(self, iteration: int) -> list[float]:
        ratio = self.get_lr_ratio(iteration)
        return [base * ratio for base in self.org_lrs]

    def _initial_lrs(self) -> list[float]:
        return self._lrs_at(-1 if self.zero_lr_first_step else 0)


class OneCycle(_IterationScheduler):
    """One triangular lr cycle (min -> max -> min) with inverse momentum, then a post-cycle decay.

    DeepSpeed's formulas at iteration i, with a = cycle_first_step_size, b =
    cycle_second_step_size (default a), T = a + b and j = i + 1: while i < T the scale s rises
    j/a to 1 and falls back to 0 at j = T (a stair count n > 0 floors the half's position to
    n stairs), lr = min_lr + (max_lr - min_lr) * s and beta1 = max_mom - (max_mom - min_mom) * s.
    After the cycle, with d = i - T + 1 and ``decay_step_size`` > 0: lr = min_lr / (1 +
    decay_lr_rate * d / decay_step_size), beta1 = max_mom * (1 + decay_mom_rate * d /
    decay_step_size). Momentum cycling, as in DeepSpeed, writes ``betas = (beta1, 0.99)`` (beta2
    becomes 0.99), starts a fresh schedule at beta1 = ``cycle_min_mom``, and applies only to
    optimizers with ``betas`` (SGD's ``momentum`` is left alone, with a warning).
    """

    def __init__(self, optimizer: Any, cycle_min_lr: float | list[float], cycle_max_lr: float | list[float],
                 decay_lr_rate: float = 0.0, cycle_first_step_size: int = 2000,
                 cycle_second_step_size: int | None = None, cycle_first_stair_count: int = 0,
                 cycle_second_stair_count: int | None = None, decay_step_size: int = 0,
                 cycle_momentum: bool = True, cycle_min_mom: float | list[float] = 0.8,
                 cycle_max_mom: float | list[float] = 0.9, decay_mom_rate: float = 0.0,
                 last_batch_iteration: int = -1) -> None:
        super().__init__(optimizer, last_batch_iteration)
        args = dict(locals())
        for name in _accepted(OneCycle.__init__)[0]:
            _check_value("OneCycle", name, args[name])
        self._remember(**{k: args[k] for k in _accepted(OneCycle.__init__)[0] if k != "last_batch_iteration"})
        self.min_lrs = _per_group(optimizer, cycle_min_lr, "cycle_min_lr")
        self.max_lrs = _per_group(optimizer, cycle_max_lr, "cycle_max_lr")
        self.first_step_size = float(cycle_first_step_size)
        self.second_step_size = (self.first_step_size if cycle_second_step_size is None
                                 else float(cycle_second_step_size))
        self.total_size = self.first_step_size + self.second_step_size
        self.step_ratio = self.first_step_size / self.total_size
        self.first_stair_count = int(cycle_first_stair_count)
        self.second_stair_count = (self.first_stair_count if cycle_second_stair_count is None
                                   else int(cycle_second_stair_count))
        self.decay_step_size = int(decay_step_size)
        self.decay_lr_rate = float(decay_lr_rate)
        self.decay_mom_rate = float(decay_mom_rate)
        self.skip_lr_decay = self.decay_step_size == 0 or self.decay_lr_rate == 0
        self.skip_mom_decay = self.decay_step_size == 0 or self.decay_mom_rate == 0
        self.min_moms = _per_group(optimizer, cycle_min_mom, "cycle_min_mom")
        self.max_moms = _per_group(optimizer, cycle_max_mom, "cycle_max_mom")
        self.cycle_momentum = bool(cycle_momentum) and self._can_cycle_betas(optimizer)
        self._start()

    @staticmethod
    def _can_cycle_betas(optimizer: Any) -> bool:
        if "betas" not in getattr(optimizer, "defaults", {}):
            warnings.warn(f"flexspeed: OneCycle cycles Adam-style 'betas' only, as DeepSpeed does; "
                          f"{type(optimizer).__name__} has none, so cycle_momentum has no effect (its "
                          f"momentum stays as configured). Set \"cycle_momentum\": false to say so.",
                          stacklevel=4)
            return False
        if any(float(g["betas"][1]) != _ONECYCLE_BETA2 for g in optimizer.param_groups):
            warnings.warn(f"flexspeed: OneCycle with cycle_momentum sets each param group's betas to "
                          f"(momentum, {_ONECYCLE_BETA2}), as DeepSpeed does: the optimizer's beta2 is "
                          f"replaced. Set \"cycle_momentum\": false to keep it.", stacklevel=4)
        return True

    def _scale(self, iteration: int) -> float:
        """Position in the triangle for ``iteration`` < T: 0 at the ends, 1 at the peak."""
        batch_iteration = iteration + 1
        cycle = math.floor(1 + batch_iteration / self.total_size)
        x = 1.0 + batch_iteration / self.total_size - cycle
        if x <= self.step_ratio:
            scale, stairs = x / self.step_ratio, self.first_stair_count
        else:
            scale, stairs = (x - 1) / (self.step_ratio - 1), self.second_stair_count
        if stairs > 0:  # floor the half's integer position, as DeepSpeed does, not the float scale
            position = batch_iteration % self.total_size
            if position <= self.first_step_size:
                stair = position * stairs / self.first_step_size
            else:
                stair = (self.total_size - position) * stairs / self.second_step_size
            scale = math.floor(stair) / stairs
        return scale

    def _decay_interval(self, iteration: int) -> float:
        return (iteration - self.total_size + 1) / self.decay_step_size

    def _lrs_at(self, iteration: int) -> list[float]:
        if iteration < self.total_size:
            s = self._scale(iteration)
            return [lo + (hi - lo) * s for lo, hi in zip(self.min_lrs, self.max_lrs)]
        if self.skip_lr_decay:
            return list(self.min_lrs)
        factor = 1 + self.decay_lr_rate * self._decay_interval(iteration)
        return [lo / factor for lo in self.min_lrs]

    def _betas_at(self, iteration: int) -> list[tuple[float, float]] | None:
        if not self.cycle_momentum:
            return None
        if iteration < self.total_size:
            s = self._scale(iteration)
            moms = [hi - (hi - lo) * s for lo, hi in zip(self.min_moms, self.max_moms)]
        elif self.skip_mom_decay:
            moms = list(self.max_moms)
        else:
            factor = 1 + self.decay_mom_rate * self._decay_interval(iteration)
            moms = [hi * factor for hi in self.max_moms]
        return [(m, _ONECYCLE_BETA2) for m in moms]

    def _initial_betas(self) -> list[tuple[float, float]] | None:
        return [(m, _ONECYCLE_BETA2) for m in self.min_moms] if self.cycle_momentum else None

    def get_mom(self) -> list[tuple[float, float]] | None:
        """``betas`` per group at the current iteration, or ``None`` when not cycling momentum."""
        return self._betas_at(self.last_batch_iteration)

    def step(self, batch_iteration: int | None = None) -> None:  # DeepSpeed's keyword for this class
        """Move to ``batch_iteration`` (default: the next one) and write its lr and betas."""
        super().step(batch_iteration)


class LRRangeTest(_IterationScheduler):
    """Grow the lr to find a good range: lr(i) = min_lr * (1 + step_rate * (i + 1) / step_size).

    With ``lr_range_test_staircase`` the interval (i + 1) / step_size is floored. A fresh schedule
    writes ``lr_range_test_min_lr``, so the first two optimizer steps follow it without repeating.
    """

    def __init__(self, optimizer: Any, lr_range_test_min_lr: float | list[float] = 1e-3,
                 lr_range_test_step_size: int = 2000, lr_range_test_step_rate: float = 1.0,
                 lr_range_test_staircase: bool = False, last_batch_iteration: int = -1) -> None:
        super().__init__(optimizer, last_batch_iteration)
        args = dict(locals())
        for name in _accepted(LRRangeTest.__init__)[0]:
            _check_value("LRRangeTest", name, args[name])
        self._remember(**{k: args[k] for k in _accepted(LRRangeTest.__init__)[0] if k != "last_batch_iteration"})
        self.min_lrs = _per_group(optimizer, lr_range_test_min_lr, "lr_range_test_min_lr")
        self.step_size = int(lr_range_test_step_size)
        self.step_rate = float(lr_range_test_step_rate)
        self.staircase = bool(lr_range_test_staircase)
        self._start()

    def _lrs_at(self, iteration: int) -> list[float]:
        interval = float(iteration + 1) / self.step_size
        if self.staircase:
            interval = math.floor(interval)
        return [lo * (1 + self.step_rate * interval) for lo in self.min_lrs]

    def step(self, batch_iteration: int | None = None) -> None:  # DeepSpeed's keyword for this class
        """Move to ``batch_iteration`` (default: the next one) and write its lr."""
        super().step(batch_iteration)


_DS_SCHEDULERS: dict[str, type] = {
    "WarmupLR": WarmupLR,
    "WarmupDecayLR": WarmupDecayLR,
    "WarmupCosineLR": WarmupCosineLR,
    "OneCycle": OneCycle,
    "LRRangeTest": LRRangeTest,
}


def build_scheduler(type_name: str, params: Mapping[str, Any] | None, optimizer: Any) -> Any:
    """Build the ``scheduler`` config section for ``optimizer``.

    Args:
        type_name: a DeepSpeed scheduler name (``WarmupLR``, ``WarmupDecayLR``, ``WarmupCosineLR``,
            ``OneCycle``, ``LRRangeTest``) or any ``torch.optim.lr_scheduler`` class name;
            case-insensitive.
        params: ``scheduler.params`` (``None`` means empty); ``"auto"`` must already be resolved.
        optimizer: the optimizer to schedule.
    Returns:
        the scheduler; after construction the optimizer holds the step-0 lr.
    Raises:
        ConfigError: unknown name or parameter, missing or invalid value, with the key path.
    """
    params = dict(params or {})
    validate_scheduler_params(type_name, params)
    name, cls, is_ds = _resolve(type_name)
    for key, value in params.items():
        if isinstance(value, str) and value == "auto":
            raise ConfigError("is still \"auto\"; it must be resolved from the optimizer or training "
                              "length before the scheduler is built. Give a value.",
                              key=f"scheduler.params.{key}")
    if is_ds:
        return cls(optimizer, **params)
    try:
        return cls(optimizer, **params)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"torch.optim.lr_scheduler.{name} rejected {params}: {err}. Fix the value "
                          f"(see torch's documentation for {name}).", key="scheduler.params") from err
