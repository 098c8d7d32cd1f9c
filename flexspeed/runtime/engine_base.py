"""What the data-parallel and the pipeline engine share: one meaning for each public method.

``EngineBase`` holds the state both engines keep (ZeRO strategy, config, optimizer, scheduler,
precision, loss scaler, counters, monitor), DeepSpeed's queries over it, and the one optimizer
step (:meth:`EngineBase._take_model_step`): unscale and check overflow, global gradient norm,
non-finite guard, clipping, ``optimizer.step()``, the strategy's post-step hook, the scheduler,
``zero_grad``. The two engines differ only in how a batch reaches the gradients
(``forward``/``backward``/``step`` vs ``train_batch``) and in two hooks of the step: which ranks
must agree on an overflow (:meth:`_overflow_group`) and how the global norm is summed
(:meth:`_grad_norm`; a pipeline adds its stages' squares).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn as nn

from flexspeed.distributed.heartbeat import note
from flexspeed.runtime.monitor import build_monitor
from flexspeed.runtime.precision import (
    LossScaler,
    NonFiniteGuard,
    PrecisionPolicy,
    clip_grads_,
    unscale_and_check_,
)
from flexspeed.runtime.zero import ZeroStrategy

if TYPE_CHECKING:
    from flexspeed.config.schema import FlexConfig

__all__ = ["EngineBase", "EngineUsageError", "PassThroughToModule"]

log = logging.getLogger("flexspeed")


class EngineUsageError(RuntimeError, AssertionError):
    """An engine method called where DeepSpeed refuses it (``step()`` inside ``no_sync()``, ...).

    DeepSpeed raises ``AssertionError`` in these places, so this error is one too: code (and
    tests) written against DeepSpeed keep catching it.
    """


class PassThroughToModule:
    """``engine.name`` falls back to ``engine.module.name`` for what the engine does not define.

    DeepSpeed's engine does this: ``engine.generate(...)`` or ``engine.my_flag`` reach the model.
    The engine's own attributes, methods, parameters and submodules always win (``engine.config``
    is the engine's config, not a Hugging Face model's); dunder names never fall back (``copy``
    and ``pickle`` probe them).
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # nn.Module: parameters, buffers, submodules
        except AttributeError:
            pass
        module = self.__dict__.get("_modules", {}).get("module")
        if module is not None and not (name.startswith("__") and name.endswith("__")):
            try:
                return getattr(module, name)
            except AttributeError:
                pass
        held = f", nor has its module ({type(module).__name__})" if module is not None else ""
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'{held}")


class EngineBase(PassThroughToModule, nn.Module):
    """State, DeepSpeed's queries and the optimizer step shared by ``TrainingEngine`` and ``PipelineEngine``."""

    def __init__(self, *, strategy: ZeroStrategy, config: FlexConfig, optimizer: torch.optim.Optimizer | None,
                 lr_scheduler: Any = None, training_dataloader: Any = None, precision: PrecisionPolicy,
                 loss_scaler: LossScaler | None, device: torch.device, launch_env: Any = None,
                 module: nn.Module | None = None) -> None:
        super().__init__()
        self._strategy = strategy
        self.module = strategy.module if module is None else module  # registered: engine.parameters() works
        self._config = config
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.training_dataloader = training_dataloader
        self.precision = precision
        self.loss_scaler = loss_scaler
        self.device = device
        self.launch_env = launch_env
        self.global_steps = 0
        self.global_samples = 0
        self.micro_steps = 0
        self.skipped_steps = 0
        # kept as device tensors: reading them (a host sync per micro-step) would stall the launch queue
        self._global_grad_norm: torch.Tensor | float | None = None
        self._last_loss: torch.Tensor | None = None
        guard = config.flexspeed_nonfinite
        self._nonfinite = NonFiniteGuard(guard.action, guard.max_consecutive_skips) \
            if loss_scaler is None else None  # fp16: the loss scaler decides
        self._dp_world_size = dist.get_world_size(strategy.group) if dist.is_initialized() else 1
        self._dp_rank = dist.get_rank(strategy.group) if dist.is_initialized() else 0
        # log line, timers, scalar writers, FLOPs profile, progress bar (see flexspeed.runtime.monitor)
        self.monitor = build_monitor(config, rank=self.global_rank, device=device)
        self.autosaver: Any = None  # set by initialize() from the checkpoint section (flexspeed.runtime.autosave)

    @property
    def zero_strategy(self) -> ZeroStrategy:
        """The ZeRO strategy wrapping the module (stage, group, notes); checkpointing and export read it."""
        return self._strategy

    # ---- configuration queries (DeepSpeed names) -------------------------------------------------
    @property
    def config(self) -> FlexConfig:
        return self._config

    def train_batch_size(self) -> int:
        return self._config.train_batch_size

    def train_micro_batch_size_per_gpu(self) -> int:
        return self._config.train_micro_batch_size_per_gpu

    def gradient_accumulation_steps(self) -> int:
        return self._config.gradient_accumulation_steps

    def gradient_clipping(self) -> float:
        return float(self._config.gradient_clipping or 0.0)

    def zero_optimization_stage(self) -> int:
        return self._strategy.stage

    def fp16_enabled(self) -> bool:
        return self.precision.mode == "fp16"

    def bf16_enabled(self) -> bool:
        return self.precision.mode == "bf16"

    bfloat16_enabled = bf16_enabled  # DeepSpeed's name

    @property
    def dp_world_size(self) -> int:
        """Data-parallel replicas (the ranks ZeRO shards over)."""
        return self._dp_world_size

    @property
    def dp_rank(self) -> int:
        """This rank's index among the data-parallel replicas."""
        return self._dp_rank

    @property
    def dp_group(self) -> dist.ProcessGroup | None:
        """The data-parallel process group (``None``: the world)."""
        return self._strategy.group

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if dist.is_initialized() else 1

    @property
    def global_rank(self) -> int:
        return dist.get_rank() if dist.is_initialized() else 0

    @property
    def local_rank(self) -> int:
        return self.launch_env.local_rank if self.launch_env is not None else 0

    @property
    def loss_scale(self) -> float:
        return self.loss_scaler.loss_scale if self.loss_scaler is not None else 1.0

    @property
    def cur_scale(self) -> float:
        return self.loss_scale

    def dynamic_loss_scale(self) -> bool:
        return self.loss_scaler is not None and self.loss_scaler.dynamic

    def get_lr(self) -> list[float]:
        """Learning rate of each optimizer param group."""
        if self.optimizer is None:
            return []
        return [float(g["lr"]) for g in self.optimizer.param_groups]

    def get_global_grad_norm(self) -> float | None:
        """Global gradient norm of the last optimizer step (before clipping), across all shards and stages."""
        return None if self._global_grad_norm is None else float(self._global_grad_norm)

    # ---- the optimizer step ---------------------------------------------------------------------
    def _overflow_group(self) -> dist.ProcessGroup | None:
        """Ranks that must agree on skipping a step after an overflow."""
        return self._strategy.grad_group()

    def _grad_norm(self, params: list[torch.Tensor]) -> torch.Tensor:
        """The global gradient norm (DTensor shards reduced, stage-2 partitions summed; replicated as they are)."""
        return self._strategy.grad_norm(params)

    def _take_model_step(self, lr_kwargs: dict | None = None) -> None:
        """Unscale/check, norm, guard, clip, step the optimizer and the scheduler, zero the gradients."""
        # a heartbeat note before each collective of the step (one each, no per-tensor cost): a hang names it
        step = self.global_steps
        params = self._strategy.grad_params()
        overflow = False
        bf16_check = self._config.precision == "bf16" and self._config.bf16.check_grad_overflow
        if self.loss_scaler is not None or bf16_check:
            note(f"step {step}: gradient overflow check (all_reduce)")
        if self.loss_scaler is not None:
            overflow = unscale_and_check_(params, 1.0 / self.loss_scaler.loss_scale, self._overflow_group())
            self.loss_scaler.update_scale(overflow)
        elif bf16_check:
            overflow = unscale_and_check_(params, 1.0, self._overflow_group())
        if overflow:
            self.skipped_steps += 1
            self._global_grad_norm = float("inf")
            log.warning("flexspeed: %s gradient overflow at step %d; skipped%s", self._config.precision,
                        self.global_steps, f", loss scale -> {self.loss_scale}" if self.loss_scaler else "")
        else:
            clip = self.gradient_clipping()
            note(f"step {step}: global gradient norm for clipping (all_reduce)")
            norm = self._grad_norm(params)
            self._global_grad_norm = norm
            if self._nonfinite is not None and self._nonfinite.should_skip(norm, self.global_steps, self._last_loss):
                self.skipped_steps += 1
            else:
                if clip > 0:
                    clip_grads_(params, clip, norm)
                note(f"step {step}: optimizer step")
                self.optimizer.step()
                self._strategy.after_step()
                if self.lr_scheduler is not None:
                    self.lr_scheduler.step(**(lr_kwargs or {}))
        self.optimizer.zero_grad(set_to_none=True)
        self.global_steps += 1

    def _after_optimizer_step(self) -> None:
        """After each optimizer step of either engine: the interval save (``checkpoint.save_interval``)."""
        if self.autosaver is not None:
            self.autosaver.after_step(self)

    def zero_grad(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)

    # ---- logging ---------------------------------------------------------------------------------
    def progress(self, total_steps: int, desc: str = "train", initial: int | None = None,
                 disable: bool | None = None) -> Any:
        """A tqdm progress bar over optimizer steps on rank 0 (loss, lr, tokens/s), advanced by each step.

        Args:
            total_steps: length of the bar in optimizer steps.
            desc: its label.
            initial: steps already done (default: ``global_steps``, e.g. after a resume).
            disable: ``None``: tqdm's choice (off when stderr is not a terminal); ``True``/``False`` force it.
        Returns:
            the :class:`~flexspeed.runtime.monitor.ProgressBar`; close it (or use ``with``) when done.
        """
        return self.monitor.progress(total_steps, desc=desc,
                                     initial=self.global_steps if initial is None else initial, disable=disable)

    def _maybe_print(self) -> None:
        # scalars to csv/tensorboard/wandb, the progress bar, and the steps_per_print line (rank 0)
        self.monitor.on_step(self)
        every = int(self._config.steps_per_print or 0)
        if every <= 0 or self.global_steps % every != 0 or self.global_rank != 0:
            return
        if self._config.memory_breakdown:
            print(self._strategy.memory_report(self.optimizer), flush=True)

    # ---- state -----------------------------------------------------------------------------------
    def memory_breakdown(self) -> dict[str, int]:
        """This rank's bytes of parameters, gradients and optimizer states."""
        return self._strategy.memory_breakdown(self.optimizer)

    def empty_partition_cache(self) -> None:
        """DeepSpeed's release of gathered ZeRO-3 parameters; a no-op: FSDP2 frees them after each use."""

    def destroy(self) -> None:
        """DeepSpeed's teardown: drop the optimizer's state and the gradients (the engine is not used after)."""
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
            self.optimizer.state.clear()
            self._optimizer_released = True  # a later save would hold no optimizer state: refused there

    def module_state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def checkpoint_layout(self) -> dict[str, Any]:
        """Recorded in a checkpoint's manifest: the parallel layout that wrote it (informational)."""
        return {"dp": self.dp_world_size, "pp": 1, "tp": 1}

    def checkpoint_keys_elsewhere(self, saved: set[str]) -> set[str]:
        """Saved model keys that other ranks' parts of the model hold (none: every rank holds the whole model)."""
        return set()

    def save_checkpoint(self, save_dir: str, tag: str | None = None, client_state: dict | None = None,
                        save_latest: bool = True, exclude_frozen_parameters: bool = False) -> bool:
        """Save model, optimizer, scheduler, counters and RNG (collective; see ``flexspeed.runtime.checkpoint``)."""
        from flexspeed.runtime.checkpoint import save_checkpoint

        if getattr(self, "_optimizer_released", False) and self.global_steps > 0 and not self.optimizer.state:
            raise RuntimeError(f"save_checkpoint({save_dir!r}) after engine.destroy(): destroy() released the "
                               "optimizer state, so the checkpoint could not resume training. Fix: save before "
                               "destroy() (or save the weights alone with save_16bit_model)")
        return save_checkpoint(self, save_dir, tag=tag, client_state=client_state or {}, save_latest=save_latest,
                               exclude_frozen_parameters=exclude_frozen_parameters)

    def load_checkpoint(self, load_dir: str, tag: str | None = None, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                        load_module_only: bool = False) -> tuple[str | None, dict | None]:
        """Load a verified checkpoint saved at any world size, ZeRO stage or pipeline layout (collective)."""
        from flexspeed.runtime.checkpoint import load_checkpoint

        return load_checkpoint(self, load_dir, tag=tag, load_module_strict=load_module_strict,
                               load_optimizer_states=load_optimizer_states,
                               load_lr_scheduler_states=load_lr_scheduler_states, load_module_only=load_module_only)
