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
from typing import TYPE_CHECKING, Any

import torch

from flexspeed.distributed.heartbeat import note
from flexspeed.runtime.engine_base import EngineBase, EngineUsageError, PassThroughToModule
from flexspeed.runtime.engine_compat import DeepSpeedEngineExtras
from flexspeed.runtime.precision import LossScaler, PrecisionPolicy
from flexspeed.runtime.zero import ZeroStrategy

if TYPE_CHECKING:
    from flexspeed.config.schema import FlexConfig

__all__ = ["TrainingEngine", "DeepSpeedEngine", "EngineUsageError", "PassThroughToModule"]

log = logging.getLogger("flexspeed")


class TrainingEngine(DeepSpeedEngineExtras, EngineBase):
    """DeepSpeed-compatible training engine (``DeepSpeedEngine``'s public methods and counters).

    The queries, the optimizer step and checkpointing are :class:`EngineBase`'s (shared with the
    pipeline engine); this class adds ``forward``/``backward``/``step`` and ``no_sync``.
    """

    def __init__(self, *, strategy: ZeroStrategy, config: FlexConfig, optimizer: torch.optim.Optimizer | None,
                 lr_scheduler: Any = None, training_dataloader: Any = None, precision: PrecisionPolicy,
                 loss_scaler: LossScaler | None, device: torch.device, launch_env: Any = None) -> None:
        super().__init__(strategy=strategy, config=config, optimizer=optimizer, lr_scheduler=lr_scheduler,
                         training_dataloader=training_dataloader, precision=precision, loss_scaler=loss_scaler,
                         device=device, launch_env=launch_env)
        self._inside_no_sync = False

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
        unused = self._strategy.params_without_grad()
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
            self._after_optimizer_step()  # checkpoint.save_interval (flexspeed.runtime.autosave)

    def train(self, mode: bool = True) -> TrainingEngine:
        """Set train/eval mode on the module and on its data-parallel wrapper."""
        super().train(mode)
        self._strategy.model.train(mode)
        return self

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
