"""DeepSpeed engine methods that Hugging Face's Trainer, Accelerate and Lightning call.

A mixin of :class:`~flexspeed.runtime.engine.TrainingEngine` (kept apart from the training loop):

- ``set_gradient_accumulation_boundary(is_boundary)``: the caller decides the accumulation boundary
  (Accelerate calls ``engine.step()`` only on its boundary micro-step, so the engine's own micro-step
  count must not decide); ``None`` hands the decision back to the engine's count.
- ``zero_gather_16bit_weights_on_model_save()`` and ``_zero3_consolidated_16bit_state_dict()``: the
  whole weights on rank 0 at ZeRO-3 for ``Trainer.save_model`` / ``Accelerator.get_state_dict``, in the
  compute precision (bf16/fp16 when the config enables it, else fp32), as DeepSpeed returns them.
- ``compile(backend=, compile_kwargs=)`` and ``is_compiled``: Accelerate's dynamo-plugin path; the wrapped
  module is compiled in place with ``nn.Module.compile`` (``torch.compile``), so its hooks (ZeRO-3 gathers)
  keep running around the compiled forward, as DeepSpeed does without DeepCompile.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

__all__ = ["DeepSpeedEngineExtras"]


class DeepSpeedEngineExtras:
    """DeepSpeed engine methods used by libraries that integrate DeepSpeed (see docs/integrations.md)."""

    _boundary_override: bool | None = None
    _compile_kwargs: dict | None = None

    def compile(self, backend: Any = "inductor", compile_kwargs: dict | None = None, schedule: Any = None,
                compiled_autograd_enabled: bool = False) -> None:
        """Compile the wrapped module in place with ``torch.compile`` (DeepSpeed's signature).

        ``backend`` wins over a ``backend`` inside ``compile_kwargs`` (as DeepSpeed). A second call is a no-op.
        DeepCompile's ``schedule`` and compiled autograd are not implemented: passing them raises ValueError,
        naming the argument. The engine stays the object to call; ``engine.module`` is the same module, now compiled.
        """
        if schedule is not None:
            raise ValueError(f"engine.compile(schedule={schedule!r}): flexspeed has no DeepCompile, so it takes no "
                             "schedule. Fix: call engine.compile() without schedule (plain torch.compile)")
        if compiled_autograd_enabled:
            raise ValueError(f"engine.compile(compiled_autograd_enabled={compiled_autograd_enabled!r}): flexspeed "
                             "does not run compiled autograd. Fix: leave compiled_autograd_enabled=False")
        if compile_kwargs is not None and not isinstance(compile_kwargs, dict):
            raise TypeError(f"engine.compile(compile_kwargs={compile_kwargs!r}) needs a dict of torch.compile "
                            "arguments")
        if self.is_compiled:
            return
        kwargs = {**(compile_kwargs or {}), "backend": backend}
        self.module.compile(**kwargs)
        self._compile_kwargs = kwargs

    @property
    def is_compiled(self) -> bool:
        """Whether :meth:`compile` compiled the module."""
        return self._compile_kwargs is not None

    def set_gradient_accumulation_boundary(self, is_boundary: bool | None) -> None:
        """Say whether the coming backward/step ends an accumulation cycle (DeepSpeed's name).

        While set, ``is_gradient_accumulation_boundary()`` returns it: gradients are reduced in a
        boundary backward and ``step()`` updates the weights only on a boundary, whatever the
        micro-step count. ``None`` returns to counting ``gradient_accumulation_steps`` micro-steps.
        """
        if is_boundary is not None and not isinstance(is_boundary, bool):
            raise TypeError(f"set_gradient_accumulation_boundary(is_boundary={is_boundary!r}) needs a bool (or None "
                            "to let gradient_accumulation_steps decide)")
        self._boundary_override = is_boundary

    def zero_optimization_partition_weights(self) -> bool:
        """Whether parameters are partitioned (ZeRO stage 3)."""
        return self.zero_optimization_stage() == 3

    def zero_gather_16bit_weights_on_model_save(self) -> bool:
        """``zero_optimization.stage3_gather_16bit_weights_on_model_save`` of the config."""
        return bool(self._config.zero_optimization.stage3_gather_16bit_weights_on_model_save)

    def _zero3_consolidated_16bit_state_dict(self, exclude_frozen_parameters: bool = False
                                             ) -> dict[str, torch.Tensor] | None:
        """The whole model's state dict on rank 0 (CPU, compute precision), ``None`` on the other ranks.

        Every rank must call it (the shards are gathered). Raises ``ValueError`` below stage 3, as DeepSpeed.
        """
        if not self.zero_optimization_partition_weights():
            raise ValueError("this function requires ZeRO-3 mode")
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True,
                                ignore_frozen_params=exclude_frozen_parameters)
        state = get_model_state_dict(self.module, options=opts)
        rank = dist.get_rank() if dist.is_initialized() else 0
        if rank != 0:
            return None
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision.mode)
        if dtype is None:
            return state
        return {k: v.to(dtype) if torch.is_floating_point(v) else v for k, v in state.items()}

    def _consolidated_16bit_state_dict(self, exclude_frozen_parameters: bool = False) -> Any:
        """DeepSpeed's dispatcher: the ZeRO-3 consolidation (flexspeed has no training-time AutoTP)."""
        return self._zero3_consolidated_16bit_state_dict(exclude_frozen_parameters)
