"""``flexspeed.checkpointing``: DeepSpeed's activation-checkpointing module API on ``torch.utils.checkpoint``.

A DeepSpeed model calls ``deepspeed.checkpointing.checkpoint(block, x)`` in its forward; the
block's intermediate activations are dropped after the forward and recomputed in backward, so
only the block's inputs stay in memory. ``flexspeed.initialize()`` configures this module from
the config's ``activation_checkpointing`` section (unless the script called :func:`configure`
itself, which then wins, as in DeepSpeed where only the explicit call configures it).

What each setting does here:

- ``cpu_checkpointing`` (``checkpoint_in_cpu``): the kept inputs of each checkpointed block
  move to page-locked CPU memory in forward and come back in backward (a saved-tensor hook
  around the checkpoint, as ``torch.autograd.graph.save_on_cpu`` does). On a CPU-only run the
  inputs already live in CPU memory, so it changes nothing (said once, as a warning).
- ``partition_activations``: the kept inputs are split across the model-parallel ranks of the
  ``mpu`` given to :func:`configure` and all-gathered in backward. ``initialize()`` has no
  model parallelism (it refuses ``mpu``), so there it changes nothing (said once).
- ``synchronize_checkpoint_boundary`` (``synchronize``): synchronise the device before and after
  each checkpointed forward and each recomputation.
- ``profile``: log each checkpointed forward's and recomputation's wall time (rank 0, INFO on
  the ``flexspeed`` logger).
- ``number_checkpoints`` (``num_checkpoints``): sizes DeepSpeed's contiguous buffer only; with
  ``contiguous_memory_optimization`` refused it has no effect (said once).
- ``contiguous_memory_optimization`` (``contiguous_checkpointing``): refused with a ConfigError.

Recomputation is torch's non-reentrant checkpoint for :func:`checkpoint`,
:func:`non_reentrant_checkpoint` and :class:`CheckpointFunction` alike: CPU and device RNG
states are replayed (dropout masks match), as are the states of :func:`get_cuda_rng_tracker`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint as _torch_checkpoint

from flexspeed.accelerator import get_accelerator

if TYPE_CHECKING:
    from flexspeed.config.schema import FlexConfig

__all__ = [
    "configure", "is_configured", "reset", "checkpoint", "non_reentrant_checkpoint", "CheckpointFunction",
    "get_cuda_rng_tracker", "model_parallel_cuda_manual_seed", "CudaRNGStatesTracker", "settings",
    "CheckpointingSettings", "set_num_layers", "partition_activations_in_checkpoint", "configure_from_config",
]

log = logging.getLogger("flexspeed")


# ---- settings -------------------------------------------------------------------------------------
@runtime_checkable
class ModelParallelUnit(Protocol):
    """Megatron's ``mpu`` (older name set)."""

    def get_model_parallel_rank(self) -> int: ...
    def get_model_parallel_world_size(self) -> int: ...
    def get_model_parallel_group(self) -> Any: ...


@runtime_checkable
class TensorModelParallelUnit(Protocol):
    """Megatron's ``mpu`` (newer name set)."""

    def get_tensor_model_parallel_rank(self) -> int: ...
    def get_tensor_model_parallel_world_size(self) -> int: ...
    def get_tensor_model_parallel_group(self) -> Any: ...


@dataclass(frozen=True)
class CheckpointingSettings:
    """What :func:`checkpoint` does; set by :func:`configure`. ``mp_*`` come from the ``mpu``."""

    partition_activations: bool = False
    cpu_checkpointing: bool = False
    number_checkpoints: int | None = None
    synchronize: bool = False
    profile: bool = False
    mp_size: int = 1
    mp_rank: int = 0
    mp_group: Any = None

    @property
    def partitions(self) -> bool:
        """Whether kept inputs are really split (partitioning asked for and model parallelism present)."""
        return self.partition_activations and self.mp_size > 1


_settings = CheckpointingSettings()
_configured_by: str | None = None  # None, "user" (configure()) or "initialize"
mpu: Any = None

# DeepSpeed's module globals, read-only views of the settings (``checkpointing.CPU_CHECKPOINT``)
_GLOBALS = {"PARTITION_ACTIVATIONS": "partition_activations", "CPU_CHECKPOINT": "cpu_checkpointing",
            "SYNCHRONIZE": "synchronize", "PROFILE_TIME": "profile", "num_layers": "number_checkpoints",
            "mp_size": "mp_size", "mp_rank": "mp_rank", "mp_group": "mp_group"}


def __getattr__(name: str) -> Any:
    if name in _GLOBALS:
        return getattr(_settings, _GLOBALS[name])
    if name == "CONTIGUOUS_CHECKPOINTING":
        return False
    if name == "deepspeed_checkpointing_enabled":
        return _configured_by is not None
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def settings() -> CheckpointingSettings:
    """The settings :func:`checkpoint` uses now."""
    return _settings


def _note_once(message: str) -> None:
    from flexspeed.utils.logging import warn_once

    warn_once(message)


def _model_parallel(unit: Any) -> tuple[int, int, Any]:
    """(size, rank, group) of a Megatron-style ``mpu``; ``(1, 0, None)`` without one."""
    if unit is None:
        return 1, 0, None
    if isinstance(unit, TensorModelParallelUnit):
        return (unit.get_tensor_model_parallel_world_size(), unit.get_tensor_model_parallel_rank(),
                unit.get_tensor_model_parallel_group())
    if isinstance(unit, ModelParallelUnit):
        return unit.get_model_parallel_world_size(), unit.get_model_parallel_rank(), unit.get_model_parallel_group()
    raise TypeError(f"mpu_ must provide get_model_parallel_rank/world_size/group (or the get_tensor_model_parallel_* "
                    f"versions), got {type(unit).__name__}. Fix: pass Megatron's mpu, or None")


def _section_of(deepspeed_config: Any) -> Any:
    """The ``activation_checkpointing`` section of a config path, dict, base64 string or FlexConfig."""
    from flexspeed.config import FlexConfig, load_config, validate_config

    if isinstance(deepspeed_config, FlexConfig):
        return deepspeed_config.activation_checkpointing
    return validate_config(load_config(config=deepspeed_config)).activation_checkpointing


# configure()'s keyword -> the config key it overrides
_KEYWORDS = {"partition_activations": "partition_activations",
             "contiguous_checkpointing": "contiguous_memory_optimization",
             "num_checkpoints": "number_checkpoints", "checkpoint_in_cpu": "cpu_checkpointing",
             "synchronize": "synchronize_checkpoint_boundary", "profile": "profile"}


def configure(mpu_: Any, deepspeed_config: Any = None, partition_activations: bool | None = None,
              contiguous_checkpointing: bool | None = None, num_checkpoints: int | None = None,
              checkpoint_in_cpu: bool | None = None, synchronize: bool | None = None,
              profile: bool | None = None) -> None:
    """Configure activation checkpointing (DeepSpeed's signature); keyword values override the config.

    Args:
        mpu_: Megatron-style model-parallel unit (its group partitions activations), or ``None``.
        deepspeed_config: a config path, dict, base64 string or ``FlexConfig``; its
            ``activation_checkpointing`` section is the starting point (defaults without one).
        partition_activations: split kept inputs across the model-parallel ranks.
        contiguous_checkpointing: DeepSpeed's contiguous buffer; refused (ConfigError) when true.
        num_checkpoints: DeepSpeed's buffer size; no effect here.
        checkpoint_in_cpu: keep the checkpointed inputs in CPU memory.
        synchronize: synchronise the device at checkpoint boundaries.
        profile: log forward and recomputation times of each checkpoint.
    Raises:
        ConfigError: a setting flexspeed cannot honour, or an invalid value (key, value and fix).
    """
    given = dict(zip(_KEYWORDS, (partition_activations, contiguous_checkpointing, num_checkpoints,
                                 checkpoint_in_cpu, synchronize, profile)))
    _apply(mpu_, deepspeed_config, given, source="user")


def configure_from_config(cfg: FlexConfig) -> None:
    """What ``initialize()`` calls: configure from ``cfg`` unless the script called :func:`configure`."""
    if _configured_by == "user":
        log.info("flexspeed.checkpointing: keeping the settings of the script's own configure() call; the config's "
                 "activation_checkpointing section is not applied")
        return
    _apply(None, cfg, {}, source="initialize")


def _apply(mpu_: Any, deepspeed_config: Any, given: dict[str, Any], *, source: str) -> None:
    global _settings, _configured_by, mpu
    from flexspeed.config import FlexConfig
    from flexspeed.config.checks import check_activation_checkpointing
    from flexspeed.config.validate import model_validate

    section = _section_of(deepspeed_config) if deepspeed_config is not None else FlexConfig().activation_checkpointing
    overrides = {_KEYWORDS[k]: v for k, v in given.items() if v is not None}
    if overrides:  # validated as config keys, so a bad value names activation_checkpointing.<key>
        data = {**section.model_dump(), **overrides}
        section = model_validate(FlexConfig, {"activation_checkpointing": data}).activation_checkpointing
    check_activation_checkpointing(section)
    unit = mpu_ if mpu_ is not None else mpu
    mp_size, mp_rank, mp_group = _model_parallel(unit)
    _settings = CheckpointingSettings(
        partition_activations=section.partition_activations, cpu_checkpointing=section.cpu_checkpointing,
        number_checkpoints=section.number_checkpoints, synchronize=section.synchronize_checkpoint_boundary,
        profile=section.profile, mp_size=mp_size, mp_rank=mp_rank, mp_group=mp_group)
    mpu, _configured_by = unit, source
    _explain_no_ops(_settings)
    if not dist.is_initialized() or dist.get_rank() == 0:
        log.info("flexspeed.checkpointing configured (%s): %s", source, _settings)


def _explain_no_ops(s: CheckpointingSettings) -> None:
    if s.partition_activations and s.mp_size == 1:
        _note_once("activation_checkpointing.partition_activations=true has no effect here: it splits checkpointed "
                   "activations across model-parallel ranks, and there is no model parallelism (model-parallel "
                   "world size 1; flexspeed.initialize() takes no mpu)")
    if s.cpu_checkpointing and not torch.cuda.is_available():
        _note_once("activation_checkpointing.cpu_checkpointing=true has no effect here: there is no GPU, so the "
                   "checkpointed activations already live in CPU memory")
    if s.number_checkpoints is not None:
        _note_once(f"activation_checkpointing.number_checkpoints={s.number_checkpoints} has no effect: it sizes "
                   "the contiguous buffer of contiguous_memory_optimization, which flexspeed does not implement")


def is_configured() -> bool:
    """True once :func:`configure` (or ``initialize()``) has configured checkpointing."""
    return _configured_by is not None


def reset() -> None:
    """DeepSpeed frees its contiguous checkpoint buffers here; flexspeed keeps none, so nothing to free."""


def set_num_layers(nlayers: int) -> None:
    """Set ``number_checkpoints`` (DeepSpeed's name); it has no effect here (see the module docstring)."""
    global _settings
    _settings = replace(_settings, number_checkpoints=nlayers)


def partition_activations_in_checkpoint(partition_activation: bool) -> None:
    """Turn activation partitioning on or off (DeepSpeed's name)."""
    global _settings
    _settings = replace(_settings, partition_activations=bool(partition_activation))
    _explain_no_ops(_settings)


# ---- RNG states for model-parallel regions ----------------------------------------------------------
_MODEL_PARALLEL_RNG = "model-parallel-rng"


class CudaRNGStatesTracker:
    """Named device RNG states (Megatron's tracker): ``fork(name)`` runs a block on a state of its own.

    Checkpointed blocks replay the states the tracker had at their forward when recomputed.
    """

    def __init__(self) -> None:
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def reset(self) -> None:
        self.states_, self.seeds_ = {}, set()

    def get_states(self) -> dict[str, torch.Tensor]:
        return copy.copy(self.states_)

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states_ = states

    def add(self, name: str, seed: int) -> None:
        """Track a new state seeded with ``seed`` (names and seeds must be new)."""
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} is already tracked; give each state its own seed")
        if name in self.states_:
            raise ValueError(f"RNG state {name!r} is already tracked; reset() first or pick another name")
        accel = get_accelerator()
        saved = accel.get_rng_state()
        accel.manual_seed(seed)
        self.seeds_.add(seed)
        self.states_[name] = accel.get_rng_state()
        accel.set_rng_state(saved)

    @contextlib.contextmanager
    def fork(self, name: str = _MODEL_PARALLEL_RNG) -> Iterator[None]:
        """Run the block on state ``name``, then restore the surrounding state."""
        if name not in self.states_:
            raise KeyError(f"RNG state {name!r} is not tracked; add(name, seed) first")
        accel = get_accelerator()
        outer = accel.get_rng_state()
        accel.set_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = accel.get_rng_state()
            accel.set_rng_state(outer)


_TRACKER = CudaRNGStatesTracker()


def get_cuda_rng_tracker() -> CudaRNGStatesTracker:
    """The process-wide tracker."""
    return _TRACKER


def model_parallel_cuda_manual_seed(seed: int) -> None:
    """Seed the default device RNG with ``seed`` and the tracked model-parallel state with
    ``seed + 2718 + model-parallel rank`` (Megatron's convention, as DeepSpeed does)."""
    _, tp_rank, _ = _model_parallel(mpu)
    _TRACKER.reset()
    get_accelerator().manual_seed(seed)
    _TRACKER.add(_MODEL_PARALLEL_RNG, seed + 2718 + tp_rank)


# ---- the checkpoint ----------------------------------------------------------------------------------
class _KeptInputs(torch.autograd.graph.saved_tensors_hooks):
    """Where the inputs a checkpoint keeps for backward live: split across model-parallel ranks
    and/or in CPU memory. Installed around the checkpoint call, so it sees only those inputs
    (torch's checkpoint handles the block's own saved tensors with its inner hooks)."""

    def __init__(self, s: CheckpointingSettings) -> None:
        self.s = s
        super().__init__(self._pack, self._unpack)

    def _pack(self, t: torch.Tensor) -> Any:
        if isinstance(t, torch.nn.Parameter) or not t.is_floating_point() or t.numel() == 0:
            return t
        data, split = t.detach(), False
        if self.s.partitions and t.numel() >= self.s.mp_size:
            size = -(-t.numel() // self.s.mp_size)  # ceil: every rank keeps an equal, zero-padded piece
            piece = data.reshape(-1)[size * self.s.mp_rank:size * (self.s.mp_rank + 1)].clone()
            data = torch.nn.functional.pad(piece, (0, size - piece.numel())) if piece.numel() < size else piece
            split = True
        if self.s.cpu_checkpointing and data.device.type != "cpu":
            host = torch.empty(data.shape, dtype=data.dtype, pin_memory=True)
            host.copy_(data, non_blocking=True)
            data = host
        return (t.device, t.shape, split, data)

    def _unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, torch.Tensor):
            return packed
        device, shape, split, data = packed
        data = data.to(device, non_blocking=True)
        if split:
            parts = [torch.empty_like(data) for _ in range(self.s.mp_size)]
            dist.all_gather(parts, data, group=self.s.mp_group)
            data = torch.cat(parts)[:shape.numel()]
        return data.view(shape)


class _Timer:
    """Wall time of one checkpointed forward or recomputation, logged on rank 0 (``profile``)."""

    def __init__(self, what: str, s: CheckpointingSettings) -> None:
        self.what, self.s = what, s

    def __enter__(self) -> None:
        if self.s.synchronize or self.s.profile:
            get_accelerator().synchronize()
        self.start = time.perf_counter()

    def __exit__(self, *exc: Any) -> None:
        if self.s.synchronize or self.s.profile:
            get_accelerator().synchronize()
        if self.s.profile and (not dist.is_initialized() or dist.get_rank() == 0):
            log.info("flexspeed.checkpointing: %s %.3f ms", self.what, (time.perf_counter() - self.start) * 1e3)


def _contexts(s: CheckpointingSettings) -> Callable[[], tuple[Any, Any]]:
    """torch's ``context_fn``: timing/synchronisation, and the tracker's states replayed in recompute."""

    def make() -> tuple[Any, Any]:
        forward_states = _TRACKER.get_states()

        @contextlib.contextmanager
        def recompute() -> Iterator[None]:
            current = _TRACKER.get_states()
            _TRACKER.set_states(copy.copy(forward_states))
            try:
                with _Timer("recompute", s):
                    yield
            finally:
                _TRACKER.set_states(current)

        return _Timer("forward", s), recompute()

    return make


def checkpoint(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``function(*args, **kwargs)`` keeping only its inputs; recompute the rest in backward.

    Args:
        function: the block to checkpoint (a module or any callable of tensors).
        *args, **kwargs: its inputs; tensors among them are what is kept.
    Returns:
        ``function``'s outputs, unchanged.
    """
    s = _settings
    if not torch.is_grad_enabled():  # nothing to recompute: no backward will run
        return function(*args, **kwargs)
    store = s.partitions or (s.cpu_checkpointing and torch.cuda.is_available())
    with _KeptInputs(s) if store else contextlib.nullcontext():
        return _torch_checkpoint(function, *args, use_reentrant=False, context_fn=_contexts(s), **kwargs)


def non_reentrant_checkpoint(function: Callable[..., Any], *args: Any) -> Any:
    """DeepSpeed's non-reentrant variant; :func:`checkpoint` is already non-reentrant here."""
    return checkpoint(function, *args)


class CheckpointFunction:
    """``CheckpointFunction.apply(function, all_outputs, *args)``, as DeepSpeed's autograd function is called.

    ``all_outputs`` (a list) receives the outputs, as in DeepSpeed; ``apply(function, *args)``
    without it also works when the first argument is not a list.
    """

    @staticmethod
    def apply(function: Callable[..., Any], *args: Any) -> Any:
        all_outputs = args[0] if args and isinstance(args[0], list) else None
        if all_outputs is not None:
            args = args[1:]
        outputs = checkpoint(function, *args)
        if all_outputs is not None:
            all_outputs += [outputs] if torch.is_tensor(outputs) else list(outputs)
        return outputs
