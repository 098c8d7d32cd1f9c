"""The data-parallel training engine: it replaces the model in a PyTorch training loop.

``loss = engine(batch)`` runs the forward under the configured precision; ``engine.backward(loss)``
scales the loss (gradient accumulation, fp16 loss scale) and backpropagates with gradient
synchronisation only on accumulation boundaries; ``engine.step()`` unscales, checks overflow,
clips to the global norm, steps the optimizer and the scheduler - only on boundaries, and not at
all after an fp16 overflow. Sharding lives in the ``ZeroStrategy``; precision in ``precision.py``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from flexspeed.runtime.engine_compat import DeepSpeedEngineExtras
from flexspeed.distributed.heartbeat import note
from flexspeed.runtime.monitor import build_monitor
from flexspeed.runtime.precision import (
    LossScaler,
    NonFiniteGuard,
    PrecisionPolicy,
    clip_grads_,
    global_grad_norm,
    unscale_and_check_,
)
from flexspeed.runtime.zero import ZeroStrategy

__all__ = ["TrainingEngine", "DeepSpeedEngine", "EngineUsageError", "PassThroughToModule"]

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


class TrainingEngine(DeepSpeedEngineExtras, PassThroughToModule, nn.Module):
    """DeepSpeed-compatible training engine (``DeepSpeedEngine``'s public methods and counters)."""

    def __init__(self, *, strategy: ZeroStrategy, config: Any, optimizer: torch.optim.Optimizer | None,
                 lr_scheduler: Any = None, training_dataloader: Any = None, precision: PrecisionPolicy,
                 loss_scaler: LossScaler | None, device: torch.device, launch_env: Any = None) -> None:
        super().__init__()
        self._strategy = strategy
        self.module = strategy.module  # registered as a submodule: engine.parameters() works
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
        guard = getattr(config, "flexspeed_nonfinite", None)
        self._nonfinite = NonFiniteGuard(guard.action, guard.max_consecutive_skips) \
            if guard is not None and loss_scaler is None else None  # fp16: the loss scaler decides
        self._inside_no_sync = False
        self.autosaver: Any = None  # set by initialize() from the checkpoint section (flexspeed.runtime.autosave)
        self._dp_world_size = dist.get_world_size(strategy.group) if dist.is_initialized() else 1
        self._dp_rank = dist.get_rank(strategy.group) if dist.is_initialized() else 0
        # log line, timers, scalar writers, FLOPs profile, progress bar (see flexspeed.runtime.monitor)
        self.monitor = build_monitor(config, rank=self.global_rank, device=device)

    # ---- configuration queries (DeepSpeed names) -------------------------------------------------
    @property
    def config(self) -> Any:
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
        return self._dp_world_size

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
        """Global gradient norm of the last optimizer step (before clipping), across all shards."""
        return None if self._global_grad_norm is None else float(self._global_grad_norm)

    def is_gradient_accumulation_boundary(self) -> bool:
        """True on the micro-step whose ``step()`` will update the weights (or as set_gradient_accumulation_boundary says)."""
        if self._boundary_override is not None:
            return self._boundary_override
        return (self.micro_steps + 1) % self.gradient_accumulation_steps() == 0

    def _sync_gradients_now(self) -> bool:
        """Reduce gradients in this micro-step's backward: on a boundary and outside ``no_sync()``."""
        return self.is_gradient_accumulation_boundary() and not self._inside_no_sync

    # ---- the training loop ----------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model under the configured precision; arguments pass through unchanged."""
        note(f"forward step {self.global_steps}")
        if self.module.training:
            self._strategy.set_requires_gradient_sync(self._sync_gradients_now())
        mon = self.monitor
        if mon.active and self.module.training:
            mon.forward_begin(self.global_steps, self.module, args, kwargs)
            try:
                with self.precision.autocast():
                    return self._strategy.model(*args, **kwargs)
            finally:
                mon.forward_end()
        with self.precision.autocast():
            return self._strategy.model(*args, **kwargs)

    def backward(self, loss: torch.Tensor, retain_graph: bool = False, scale_wrt_gas: bool = True) -> torch.Tensor:
        """Backpropagate ``loss`` (scaled by 1/accumulation steps and the fp16 loss scale).

        Args:
            loss: the micro-batch's scalar loss.
            retain_graph: passed to ``torch.autograd.backward``.
            scale_wrt_gas: divide by ``gradient_accumulation_steps`` (gradients and return value).
        Returns:
            ``loss / gradient_accumulation_steps`` (``loss`` itself with ``scale_wrt_gas=False``),
            as DeepSpeed 0.19 returns it.
        """
        if self.optimizer is None:  # DeepSpeed asserts: an AssertionError too
            raise EngineUsageError(
                "engine.backward() needs an optimizer, and this engine was built without one (forward/eval "
                "only). Fix: pass optimizer=... to flexspeed.initialize() or add an 'optimizer' section to the "
                "config")
        if not torch.is_tensor(loss) or loss.dim() != 0:
            raise ValueError(f"engine.backward(loss) expects a scalar tensor, got {type(loss).__name__} "
                             f"{tuple(loss.shape) if torch.is_tensor(loss) else ''}: reduce the loss (e.g. .mean())")
        note(f"backward step {self.global_steps} (gradient all-reduce on a boundary)")
        self._last_loss = loss.detach()
        mon = self.monitor
        if mon.active:
            mon.add_loss(float(self._last_loss))
        if mon.timing:
            mon.timers.start("backward")
        sync = self._sync_gradients_now()
        self._strategy.set_requires_gradient_sync(sync)
        gas = self.gradient_accumulation_steps()
        scaled = loss.float()
        if scale_wrt_gas and gas > 1:
            scaled = scaled / gas
        if self.loss_scaler is not None:
            scaled = self.loss_scaler.scale(scaled)
        scaled.backward(retain_graph=retain_graph)
        self._strategy.after_backward()
        if sync and not self._config.zero_optimization.ignore_unused_parameters:
            self._refuse_unused_parameters()
        if mon.timing:
            mon.timers.stop("backward")
        return loss / gas if scale_wrt_gas else loss

    def _refuse_unused_parameters(self) -> None:
        """``ignore_unused_parameters: false``: every trainable parameter must have a gradient by now."""
        unused = [n for n, p in self.module.named_parameters() if p.requires_grad and p.grad is None]
        if unused:
            more = f" (and {len(unused) - 10} more)" if len(unused) > 10 else ""
            raise EngineUsageError(
                f"[zero_optimization.ignore_unused_parameters] parameters {unused[:10]}{more} received no gradient "
                "in this accumulation step, and ignore_unused_parameters is false. Fix: set "
                '"ignore_unused_parameters": true (the default: unused parameters are left out of the update), or '
                "make every trainable parameter contribute to the loss (requires_grad=False for those that never do)")

    def step(self, lr_kwargs: dict | None = None) -> None:
        """End a micro-step; on an accumulation boundary, update the weights and the schedule."""
        if self.optimizer is None:
            raise EngineUsageError("engine.step() needs an optimizer; this engine is forward/eval only. Fix: pass "
                                   "optimizer=... to flexspeed.initialize() or add an 'optimizer' section to the config")
        if self._inside_no_sync:
            raise EngineUsageError(
                "It is illegal to call Engine.step() inside no_sync context manager: the gradients accumulated "
                "there are this rank's only. Fix: leave the no_sync() block, run one more engine.backward() "
                "(it reduces everything accumulated), then call engine.step()")
        boundary = self.is_gradient_accumulation_boundary()
        if boundary:
            note(f"step {self.global_steps} (all_reduce in the gradient norm/clip_grad_norm, optimizer)")
            with self.monitor.timed("step"):
                self._take_model_step(lr_kwargs)
        self.micro_steps += 1
        samples = self.train_micro_batch_size_per_gpu() * self._dp_world_size
        self.global_samples += samples
        if boundary:
            self._maybe_print()
            if self.autosaver is not None:  # checkpoint.save_interval (flexspeed.runtime.autosave)
                self.autosaver.after_step(self)

    def _take_model_step(self, lr_kwargs: dict | None) -> None:
        params = self._strategy.grad_params()
        overflow = False
        if self.loss_scaler is not None:
            overflow = unscale_and_check_(params, 1.0 / self.loss_scaler.loss_scale, self._strategy.grad_group())
            self.loss_scaler.update_scale(overflow)
        elif self._config.precision == "bf16" and self._config.bf16.check_grad_overflow:
            overflow = unscale_and_check_(params, 1.0, self._strategy.grad_group())
        if overflow:
            self.skipped_steps += 1
            self._global_grad_norm = float("inf")
            log.warning("flexspeed: %s gradient overflow at step %d; skipped%s", self._config.precision,
                        self.global_steps, f", loss scale -> {self.loss_scale}" if self.loss_scaler else "")
        else:
            clip = self.gradient_clipping()
            norm = global_grad_norm(params)
            self._global_grad_norm = norm
            if self._nonfinite is not None and self._nonfinite.should_skip(norm, self.global_steps, self._last_loss):
                self.skipped_steps += 1
            else:
                if clip > 0:
                    clip_grads_(params, clip, norm)
                self.optimizer.step()
                self._strategy.after_step()
                if self.lr_scheduler is not None:
                    self.lr_scheduler.step(**(lr_kwargs or {}))
        self.optimizer.zero_grad(set_to_none=True)
        self.global_steps += 1

    def train(self, mode: bool = True) -> TrainingEngine:
        """Set train/eval mode on the module and on its data-parallel wrapper."""
        super().train(mode)
        self._strategy.model.train(mode)
        return self

    def zero_grad(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """No gradient reduction in the block's backwards, whatever the accumulation boundary (DeepSpeed's).

        Gradients accumulate on each rank; the first ``engine.backward()`` after the block (on an
        accumulation boundary) reduces all of them. ``step()`` inside the block, a nested
        ``no_sync()`` and ZeRO stages 2-3 (which reduce gradients into shards on every backward)
        raise ``EngineUsageError``.
        """
        stage = self._strategy.stage
        if stage >= 2:
            raise EngineUsageError(
                f"no_sync context manager is incompatible with gradient partitioning logic of ZeRO stage {stage}: "
                "gradients are reduced into shards on every backward. Fix: use stage 0 or 1, or let "
                "gradient_accumulation_steps decide when to reduce")
        if self._inside_no_sync:
            raise EngineUsageError("no_sync context manager reentry is unsupported. Fix: use one no_sync() block")
        self._inside_no_sync = True
        try:
            yield
        finally:
            self._inside_no_sync = False

    def _maybe_print(self) -> None:
        # scalars to csv/tensorboard/wandb, the progress bar, and the steps_per_print line (rank 0)
        self.monitor.on_step(self)
        every = int(getattr(self._config, "steps_per_print", 0) or 0)
        if every <= 0 or self.global_steps % every != 0 or self.global_rank != 0:
            return
        if getattr(self._config, "memory_breakdown", False):
            print(self._strategy.memory_report(self.optimizer), flush=True)

    def progress(self, total_steps: int, desc: str = "train", initial: int | None = None,
                 disable: bool | None = None) -> Any:
        """A tqdm progress bar over optimizer steps on rank 0 (loss, lr, tokens/s), advanced by ``step()``.

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

    def module_state_dict(self) -> dict[str, torch.Tensor]:
        return self.module.state_dict()

    def save_checkpoint(self, save_dir: str, tag: str | None = None, client_state: dict | None = None,
                        save_latest: bool = True, exclude_frozen_parameters: bool = False) -> bool:
        from flexspeed.runtime.checkpoint import save_checkpoint

        return save_checkpoint(self, save_dir, tag=tag, client_state=client_state or {}, save_latest=save_latest,
                               exclude_frozen_parameters=exclude_frozen_parameters)

    def load_checkpoint(self, load_dir: str, tag: str | None = None, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                        load_module_only: bool = False) -> tuple[str | None, dict | None]:
        from flexspeed.runtime.checkpoint import load_checkpoint

        return load_checkpoint(self, load_dir, tag=tag, load_module_strict=load_module_strict,
                               load_optimizer_states=load_optimizer_states,
                               load_lr_scheduler_states=load_lr_scheduler_states, load_module_only=load_module_only)

    def save_16bit_model(self, save_dir: str, save_filename: str = "pytorch_model.bin",
                         exclude_frozen_parameters: bool = False) -> bool:
        """Gather the full weights at any stage and write them in 16 bits from rank 0 (DeepSpeed's name)."""
        from flexspeed.runtime.checkpoint import save_16bit_model

        return save_16bit_model(self, save_dir, save_filename, exclude_frozen_parameters=exclude_frozen_parameters)

    save_fp16_model = save_16bit_model

    def save_pretrained(self, save_directory: str, max_shard_size: int | str = "5GB", dtype: str | None = None,
                        exclude_frozen_parameters: bool = False) -> bool:
        """Write a Hugging Face model folder (config.json, sharded safetensors) at any ZeRO stage; every rank calls."""
        from flexspeed.runtime.export import save_pretrained

        return save_pretrained(self, save_directory, max_shard_size=max_shard_size, dtype=dtype,
                               exclude_frozen_parameters=exclude_frozen_parameters)


DeepSpeedEngine = TrainingEngine  # DeepSpeed's class name (isinstance checks in Lightning and Accelerate)
