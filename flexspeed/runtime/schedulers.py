"""Learning-rate schedulers named as in DeepSpeed's config, plus any ``torch.optim.lr_scheduler`` class.

DeepSpeed's five schedulers (``WarmupLR``, ``WarmupDecayLR``, ``WarmupCosineLR``, ``OneCycle``,
``LRRangeTest``) are written here from their published formulas. They are plain classes with
the methods the engine and user code call (``step``, ``get_lr``, ``get_last_lr``,
``state_dict``, ``load_state_dict``), not ``torch.optim.lr_scheduler.LRScheduler`` subclasses:
that base class wraps ``optimizer.step`` and warns about call order, which fights an engine
that skips the scheduler on overflow steps and lets ``step`` advance by more than one.

Step semantics (the same for all five): ``last_batch_iteration`` is the index of the step whose
learning rate is currently in the optimizer. The constructor argument defaults to -1 (fresh),
and construction moves to ``last_batch_iteration + 1`` and applies that step's lr, so the
first optimizer step runs at the step-0 lr and every ``step()`` advances by one. This is
PyTorch's ``last_epoch`` convention. DeepSpeed's ``WarmupLR`` family instead leaves
``warmup_min_lr`` in place for one extra step; flexspeed's curve is the documented formula
evaluated at 0, 1, 2, ... with no repeated first value.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from flexspeed.config.errors import ConfigError, did_you_mean

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

# -- value checks shared by the config-time validator and the constructors -------------------

_LR_VALUES = {"warmup_min_lr", "warmup_max_lr", "cycle_min_lr", "cycle_max_lr", "lr_range_test_min_lr",
              "cycle_min_mom", "cycle_max_mom"}  # a number, or one number per param group
_FLOATS = {"warmup_min_ratio", "cos_min_ratio", "decay_lr_rate", "decay_mom_rate", "lr_range_test_step_rate"}
_BOOLS = {"cycle_momentum", "lr_range_test_staircase"}
# int params -> smallest allowed value
_INTS = {"warmup_num_steps": 0, "total_num_steps": 1, "cycle_first_step_size": 1, "cycle_second_step_size": 1,
         "cycle_first_stair_count": 0, "cycle_second_stair_count": 0, "decay_step_size": 0,
         "lr_range_test_step_size": 1, "last_batch_iteration": -1}
_OPTIONAL = {"cycle_second_step_size", "cycle_second_stair_count"}  # None means "same as first"
_WARMUP_TYPES = ("log", "linear")
# torch schedulers that need Python callables, other schedulers or a metric: not expressible in JSON
_TORCH_REJECTED = {
    "LambdaLR": "it takes a Python function (lr_lambda)",
    "MultiplicativeLR": "it takes a Python function (lr_lambda)",
    "SequentialLR": "it takes other scheduler objects",
    "ChainedScheduler": "it takes other scheduler objects",
    "ReduceLROnPlateau": "it needs a validation metric at every step, which the engine does not have",
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_value(type_name: str, name: str, value: Any) -> None:
    """Raise ConfigError if ``value`` is not a valid setting for parameter ``name``."""
    key = f"scheduler.params.{name}"
    if isinstance(value, str) and value == "auto":
        return  # resolved by the config layer before anything is built
    if name in _OPTIONAL and value is None:
        return
    if name in _LR_VALUES:
        values = value if isinstance(value, (list, tuple)) else [value]
        if not values or not all(_is_number(v) for v in values):
            raise ConfigError(f"{type_name} needs a number or a list of numbers (one per param group), "
                              f"got {value!r}.", key=key)
        if any(v < 0 for v in values):
            raise ConfigError(f"must be >= 0, got {value!r}.", key=key)
    elif name in _FLOATS:
        if not _is_number(value):
            raise ConfigError(f"{type_name} needs a number, got {value!r}.", key=key)
        if name in ("warmup_min_ratio", "cos_min_ratio") and not 0.0 <= value <= 1.0:
            raise ConfigError(f"is a fraction of the optimizer's lr and must be in [0, 1], got {value!r}.",
                              key=key)
    elif name in _BOOLS:
        if not isinstance(value, bool):
            raise ConfigError(f"{type_name} needs true or false, got {value!r}.", key=key)
    elif name in _INTS:
        if not _is_number(value) or abs(value) > 2**53 or not math.isfinite(value) or float(value) != int(value):
            raise ConfigError(f"{type_name} needs a whole number, got {value!r}.", key=key)
        if value < _INTS[name]:
            raise ConfigError(f"must be >= {_INTS[name]}, got {value!r}.", key=key)
    elif name == "warmup_type" and value not in _WARMUP_TYPES:
        hint = did_you_mean(str(value), _WARMUP_TYPES)
        raise ConfigError(f"must be one of {list(_WARMUP_TYPES)}, got {value!r}.{hint}", key=key)


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

    Checks the type name, unknown and missing parameters, value types and ranges of DeepSpeed's
    schedulers, and that ``total_num_steps`` is not below ``warmup_num_steps``. The string
    ``"auto"`` is accepted for any value (the config layer resolves it).

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
    if "total_num_steps" in accepted:
        total, warmup = params.get("total_num_steps"), params.get("warmup_num_steps", 1000)
        if _is_number(total) and _is_number(warmup) and total < warmup:
            src = "" if "warmup_num_steps" in params else ", the default"
            raise ConfigError(f"total_num_steps ({total}) is below warmup_num_steps ({warmup}{src}); raise "
                              f"total_num_steps or lower warmup_num_steps.",
                              key="scheduler.params.total_num_steps")


# -- the DeepSpeed schedulers -------------------------------------------------------------------


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


class _IterationScheduler:
    """Shared machinery: an iteration counter and a closed-form lr (and momentum) per iteration."""

    _name = "scheduler"

    def __init__(self, optimizer: Any, last_batch_iteration: int) -> None:
        if not hasattr(optimizer, "param_groups"):
            raise TypeError(f"{type(self).__name__} needs a torch.optim.Optimizer (something with "
                            f"param_groups), got {type(optimizer).__name__}.")
        self.optimizer = optimizer
        self.last_batch_iteration = int(last_batch_iteration) + 1
        self._last_lr: list[float] = []

    def _lrs_at(self, iteration: int) -> list[float]:
        raise NotImplementedError

    def _moms_at(self, iteration: int) -> list[float] | None:
        """Momentum (or Adam's beta1) per group at ``iteration``; ``None`` leaves momentum alone."""
        return None

    def get_lr(self) -> list[float]:
        """The lr of each param group at the current iteration."""
        return self._lrs_at(self.last_batch_iteration)

    def get_last_lr(self) -> list[float]:
        """The lr last written into the optimizer, one per param group."""
        return list(self._last_lr)

    def _apply(self) -> None:
        lrs = self.get_lr()
        moms = self._moms_at(self.last_batch_iteration)
        for i, group in enumerate(self.optimizer.param_groups):
            _set_group(group, "lr", lrs[i])
            if moms is not None:
                if "betas" in group:
                    group["betas"] = (moms[i], group["betas"][1])
                else:
                    _set_group(group, "momentum", moms[i])
        self._last_lr = list(lrs)

    def step(self, increment: int = 1, *, last_batch_iteration: int | None = None) -> None:
        """Advance ``increment`` iterations (or jump to ``last_batch_iteration``) and apply the lr.

        Args:
            increment: iterations to advance, >= 0.
            last_batch_iteration: absolute iteration to jump to instead (DeepSpeed's keyword).
        """
        if last_batch_iteration is not None:
            if last_batch_iteration < 0:
                raise ValueError(f"last_batch_iteration must be >= 0, got {last_batch_iteration}.")
            self.last_batch_iteration = int(last_batch_iteration)
        else:
            if increment < 0:
                raise ValueError(f"step(increment) must be >= 0, got {increment}; use "
                                 f"step(last_batch_iteration=N) to jump to an earlier iteration.")
            self.last_batch_iteration += int(increment)
        self._apply()

    def state_dict(self) -> dict[str, Any]:
        """The iteration counter. Hyperparameters come from the config, so a resumed run may change them."""
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Restore the iteration counter and write that iteration's lr into the optimizer."""
        if "last_batch_iteration" not in state_dict:
            raise KeyError(f"{type(self).__name__} state_dict needs 'last_batch_iteration'; got keys "
                           f"{sorted(state_dict)}. Was it saved from a different scheduler?")
        self.last_batch_iteration = int(state_dict["last_batch_iteration"])
        self._apply()


def _warmup_gamma(iteration: int, num_steps: int, warmup_type: str) -> float:
    """Warmup fraction in [0, 1]: log(i+1)/log(N) ("log") or i/N ("linear"); 1 once i >= N."""
    if iteration >= num_steps:
        return 1.0
    if warmup_type == "linear":
        return iteration / num_steps
    # With N == 1 the only warmup step is step 0, where both formulas give 0.
    return math.log(iteration + 1) / math.log(num_steps) if num_steps > 1 else 0.0


class WarmupLR(_IterationScheduler):
    """Warm the lr from ``warmup_min_lr`` to ``warmup_max_lr`` over ``warmup_num_steps``, then hold.

    lr(i) = min + (max - min) * gamma(i), gamma(i) = log(i+1)/log(N) ("log") or i/N ("linear")
    during warmup and 1 after. ``warmup_min_lr``/``warmup_max_lr`` may be lists, one per group.
    ``warmup_num_steps: 0`` means no warmup (DeepSpeed silently raises it to 2).
    """

    def __init__(self, optimizer: Any, warmup_min_lr: float | list[float] = 0.0,
                 warmup_max_lr: float | list[float] = 0.001, warmup_num_steps: int = 1000,
                 warmup_type: str = "log", last_batch_iteration: int = -1) -> None:
        super().__init__(optimizer, last_batch_iteration)
        for name, value in (("warmup_min_lr", warmup_min_lr), ("warmup_max_lr", warmup_max_lr),
                            ("warmup_num_steps", warmup_num_steps), ("warmup_type", warmup_type),
                            ("last_batch_iteration", last_batch_iteration)):
            _check_value(type(self).__name__, name, value)
        self.min_lrs = _per_group(optimizer, warmup_min_lr, "warmup_min_lr")
        self.max_lrs = _per_group(optimizer, warmup_max_lr, "warmup_max_lr")
        self.warmup_num_steps = int(warmup_num_steps)
        self.warmup_type = warmup_type
        if type(self) is WarmupLR:
            self._apply()

    def _gamma(self, iteration: int) -> float:
        return _warmup_gamma(iteration, self.warmup_num_steps, self.warmup_type)

    def _lrs_at(self, iteration: int) -> list[float]:
        gamma = self._gamma(iteration)
        return [lo + (hi - lo) * gamma for lo, hi in zip(self.min_lrs, self.max_lrs)]


class WarmupDecayLR(WarmupLR):
    """``WarmupLR``'s warmup, then a linear decay back to ``warmup_min_lr`` at ``total_num_steps``.

    After warmup gamma(i) = max(0, (total - i) / (total - warmup)).
    """

    def __init__(self, optimizer: Any, total_num_steps: int, warmup_min_lr: float | list[float] = 0.0,
                 warmup_max_lr: float | list[float] = 0.001, warmup_num_steps: int = 1000,
                 warmup_type: str = "log", last_batch_iteration: int = -1) -> None:
        super().__init__(optimizer, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type,
                         last_batch_iteration)
        validate_scheduler_params("WarmupDecayLR", {"total_num_steps": total_num_steps,
                                                    "warmup_num_steps": warmup_num_steps})
        self.total_num_steps = int(total_num_steps)
        self._apply()

    def _gamma(self, iteration: int) -> float:
        if iteration < self.warmup_num_steps:
            return super()._gamma(iteration)
        span = max(1, self.total_num_steps - self.warmup_num_steps)
        return max(0.0, (self.total_num_steps - iteration) / span)


class WarmupCosineLR(_IterationScheduler):
    """Scale each group's own lr by a ratio: warm up from ``warmup_min_ratio`` to 1, then cosine-anneal.

    During warmup ratio = min_ratio + (1 - min_ratio) * gamma (gamma as in ``WarmupLR``); after it
    ratio = cos_min + (1 - cos_min) * (1 + cos(pi * p)) / 2 with p = (i - warmup) / (total - warmup)
    clamped to [0, 1], so the lr stays at ``cos_min_ratio * lr`` past ``total_num_steps``. The base
    lr is the group's lr when first scheduled (kept as ``initial_lr`` in the group, as torch does).
    """

    def __init__(self, optimizer: Any, total_num_steps: int, warmup_min_ratio: float = 0.0,
                 warmup_num_steps: int = 1000, cos_min_ratio: float = 0.0001, warmup_type: str = "log",
                 last_batch_iteration: int = -1) -> None:
        super().__init__(optimizer, last_batch_iteration)
        validate_scheduler_params("WarmupCosineLR", {
            "total_num_steps": total_num_steps, "warmup_min_ratio": warmup_min_ratio,
            "warmup_num_steps": warmup_num_steps, "cos_min_ratio": cos_min_ratio, "warmup_type": warmup_type,
            "last_batch_iteration": last_batch_iteration})
        self.total_num_steps = int(total_num_steps)
        self.warmup_min_ratio = float(warmup_min_ratio)
        self.warmup_num_steps = int(warmup_num_steps)
        self.cos_min_ratio = float(cos_min_ratio)
        self.warmup_type = warmup_type
        self.base_lrs = [float(g.setdefault("initial_lr", float(g["lr"]))) for g in optimizer.param_groups]
        self._apply()

    def get_lr_ratio(self, iteration: int | None = None) -> float:
        """The multiplier on the base lr at ``iteration`` (default: the current one)."""
        i = self.last_batch_iteration if iteration is None else iteration
        if i < self.warmup_num_steps:
            gamma = _warmup_gamma(i, self.warmup_num_steps, self.warmup_type)
            return self.warmup_min_ratio + (1.0 - self.warmup_min_ratio) * gamma
        span = max(1, self.total_num_steps - self.warmup_num_steps)
        progress = min(1.0, (i - self.warmup_num_steps) / span)
        return self.cos_min_ratio + (1.0 - self.cos_min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    def _lrs_at(self, iteration: int) -> list[float]:
        ratio = self.get_lr_ratio(iteration)
        return [base * ratio for base in self.base_lrs]


class OneCycle(_IterationScheduler):
    """One triangular lr cycle (min -> max -> min) with inverse momentum, then a post-cycle decay.

    With a = cycle_first_step_size and b = cycle_second_step_size (default a): for i <= a the
    scale s = i / a, for a < i <= a + b s = 1 - (i - a) / b; a stair count n > 0 quantises the
    phase's progress to floor(progress * n) / n. lr = min_lr + (max_lr - min_lr) * s and momentum
    = max_mom - (max_mom - min_mom) * s. After the cycle (d = i - a - b iterations later), if
    ``decay_step_size`` > 0: lr = min_lr / (1 + decay_lr_rate * d / decay_step_size) and momentum
    = max_mom * (1 + decay_mom_rate * d / decay_step_size) (DeepSpeed's convention); otherwise they
    stay at min_lr / max_mom. Momentum is Adam-family ``betas[0]`` or SGD-style ``momentum``.
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
        self.min_lrs = _per_group(optimizer, cycle_min_lr, "cycle_min_lr")
        self.max_lrs = _per_group(optimizer, cycle_max_lr, "cycle_max_lr")
        self.first_size = int(cycle_first_step_size)
        self.second_size = self.first_size if cycle_second_step_size is None else int(cycle_second_step_size)
        self.first_stairs = int(cycle_first_stair_count)
        self.second_stairs = (self.first_stairs if cycle_second_stair_count is None
                              else int(cycle_second_stair_count))
        self.decay_step_size = int(decay_step_size)
        self.decay_lr_rate = float(decay_lr_rate)
        self.decay_mom_rate = float(decay_mom_rate)
        self.cycle_momentum = bool(cycle_momentum)
        self.min_moms = _per_group(optimizer, cycle_min_mom, "cycle_min_mom")
        self.max_moms = _per_group(optimizer, cycle_max_mom, "cycle_max_mom")
        if self.cycle_momentum:
            for k, group in enumerate(optimizer.param_groups):
                if "betas" not in group and "momentum" not in group:
                    raise ConfigError(f"param group {k} of {type(optimizer).__name__} has neither 'betas' nor "
                                      f"'momentum' to cycle; set \"cycle_momentum\": false.",
                                      key="scheduler.params.cycle_momentum")
        self._apply()

    @property
    def total_size(self) -> int:
        """Length of the cycle in iterations."""
        return self.first_size + self.second_size

    def _scale(self, iteration: int) -> float:
        """Position in the triangle, 0 at the ends and 1 at the peak."""
        if iteration <= self.first_size:
            progress, stairs = iteration / self.first_size, self.first_stairs
            return math.floor(progress * stairs) / stairs if stairs > 0 else progress
        progress, stairs = (iteration - self.first_size) / self.second_size, self.second_stairs
        return 1.0 - (math.floor(progress * stairs) / stairs if stairs > 0 else progress)

    def _decay_interval(self, iteration: int) -> float | None:
        if iteration <= self.total_size or self.decay_step_size == 0:
            return None
        return (iteration - self.total_size) / self.decay_step_size

    def _lrs_at(self, iteration: int) -> list[float]:
        if iteration > self.total_size:
            interval = self._decay_interval(iteration)
            if interval is None:
                return list(self.min_lrs)
            return [lo / (1.0 + self.decay_lr_rate * interval) for lo in self.min_lrs]
        s = self._scale(iteration)
        return [lo + (hi - lo) * s for lo, hi in zip(self.min_lrs, self.max_lrs)]

    def _moms_at(self, iteration: int) -> list[float] | None:
        if not self.cycle_momentum:
            return None
        if iteration > self.total_size:
            interval = self._decay_interval(iteration)
            if interval is None:
                return list(self.max_moms)
            return [hi * (1.0 + self.decay_mom_rate * interval) for hi in self.max_moms]
        s = self._scale(iteration)
        return [hi - (hi - lo) * s for lo, hi in zip(self.min_moms, self.max_moms)]

    def get_mom(self) -> list[float] | None:
        """Momentum per group at the current iteration, or ``None`` when not cycling momentum."""
        return self._moms_at(self.last_batch_iteration)


class LRRangeTest(_IterationScheduler):
    """Grow the lr to find a good range: lr(i) = min_lr * (1 + step_rate * i / step_size).

    With ``lr_range_test_staircase`` the interval i / step_size is floored.
    """

    def __init__(self, optimizer: Any, lr_range_test_min_lr: float | list[float] = 1e-3,
                 lr_range_test_step_size: int = 2000, lr_range_test_step_rate: float = 1.0,
                 lr_range_test_staircase: bool = False, last_batch_iteration: int = -1) -> None:
        super().__init__(optimizer, last_batch_iteration)
        args = dict(locals())
        for name in _accepted(LRRangeTest.__init__)[0]:
            _check_value("LRRangeTest", name, args[name])
        self.min_lrs = _per_group(optimizer, lr_range_test_min_lr, "lr_range_test_min_lr")
        self.step_size = int(lr_range_test_step_size)
        self.step_rate = float(lr_range_test_step_rate)
        self.staircase = bool(lr_range_test_staircase)
        self._apply()

    def _lrs_at(self, iteration: int) -> list[float]:
        interval = iteration / self.step_size
        if self.staircase:
            interval = math.floor(interval)
        return [lo * (1.0 + self.step_rate * interval) for lo in self.min_lrs]


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
