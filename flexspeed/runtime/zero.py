"""ZeRO stages as strategies over PyTorch's own data-parallel machinery.

``apply_zero(stage=..., ...)`` wraps the user's module and returns a ``ZeroStrategy``: the
module to call, the parameters whose gradients the engine post-processes, how to switch gradient
synchronisation off for non-boundary micro-steps, how to build the optimizer over the (possibly
re-registered) parameters, and a per-rank memory breakdown. The engine knows nothing else about
sharding.

- stage 0: ``DistributedDataParallel`` (plain module at world size 1).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

from flexspeed.config.errors import ConfigError

__all__ = ["ZeroStrategy", "DataParallel", "apply_zero", "OptimizerFactory", "tensor_bytes"]

OptimizerFactory = Callable[[list], torch.optim.Optimizer]

_COMM_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, None: None}


def tensor_bytes(tensors) -> int:
    """Bytes this rank holds for ``tensors`` (the local shard of a DTensor)."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


@dataclass
class ZeroStrategy:
    """Base class: what the engine needs from a ZeRO stage."""

    stage: int
    module: nn.Module  # the user's module (unwrapped)
    model: nn.Module  # what forward calls
    group: dist.ProcessGroup | None = None  # data-parallel group (None = world)
    notes: list[str] = field(default_factory=list)

    def set_requires_gradient_sync(self, enabled: bool) -> None:
        """Turn gradient reduction on (boundary micro-step) or off (accumulating)."""

    def build_optimizer(self, client: torch.optim.Optimizer | None, factory: OptimizerFactory | None,
                        allow_untested: bool = False) -> torch.optim.Optimizer | None:
        """The optimizer over this strategy's parameters: ``client`` as is, or ``factory(params)``."""
        if client is not None:
            return client
        return factory(list(self.module.parameters())) if factory is not None else None

    def grad_params(self) -> list[torch.Tensor]:
        """Parameters whose gradients the engine unscales, checks and clips."""
        return [p for p in self.module.parameters() if p.requires_grad]

    def grad_group(self) -> dist.ProcessGroup | None:
        """Ranks over which gradients may differ after reduction (for the overflow flag)."""
        return None

    def after_step(self) -> None:
        """Hook after the optimizer step (e.g. re-broadcast updated partitions)."""

    def memory_breakdown(self, optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
        """Per-rank bytes of parameters, gradients and optimizer state."""
        params = list(self.module.parameters())
        opt_bytes = 0
        if optimizer is not None:
            for state in optimizer.state.values():
                opt_bytes += tensor_bytes(v for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
        return {"parameters": tensor_bytes(params), "gradients": tensor_bytes(p.grad for p in params),
                "optimizer_states": opt_bytes}


def _comm_hook(comm_dtype: torch.dtype | None, predivide: float):
    """A DDP hook that reduces in ``comm_dtype`` and divides by ``predivide`` before the sum."""

    def hook(group: dist.ProcessGroup, bucket: dist.GradBucket) -> torch.futures.Future:
        buf = bucket.buffer()
        world = dist.get_world_size(group)
        send = buf.to(comm_dtype) if comm_dtype is not None and comm_dtype != buf.dtype else buf
        send.div_(predivide)
        fut = dist.all_reduce(send, group=group, async_op=True).get_future()

        def finish(f: torch.futures.Future) -> torch.Tensor:
            out = f.value()[0]
            buf.copy_(out.to(buf.dtype) if out is not buf else out)
            return buf.mul_(predivide / world)

        return fut.then(finish)

    return hook


class DataParallel(ZeroStrategy):
    """Stage 0: replicated everything, gradients all-reduced by DDP (in fp32 unless configured)."""

    def __init__(self, module: nn.Module, *, device: torch.device, group: dist.ProcessGroup | None = None,
                 comm_dtype: torch.dtype | None = None, predivide: float = 1.0,
                 bucket_cap_mb: float | None = None, find_unused_parameters: bool = False) -> None:
        world = dist.get_world_size(group) if dist.is_initialized() else 1
        if world > 1:
            kwargs = {"bucket_cap_mb": bucket_cap_mb} if bucket_cap_mb else {}
            model = nn.parallel.DistributedDataParallel(
                module, device_ids=[device.index] if device.type == "cuda" else None, process_group=group,
                find_unused_parameters=find_unused_parameters, **kwargs)
            if comm_dtype not in (None, torch.float32) or predivide != 1.0:
                model.register_comm_hook(group or dist.group.WORLD, _comm_hook(comm_dtype, predivide))
        else:
            model = module
        super().__init__(stage=0, module=module, model=model, group=group)

    def set_requires_gradient_sync(self, enabled: bool) -> None:
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            self.model.require_backward_grad_sync = enabled


def apply_zero(module: nn.Module, *, config, device: torch.device,
               group: dist.ProcessGroup | None = None) -> ZeroStrategy:
    """Wrap ``module`` for ``config.zero_optimization.stage`` and return the strategy."""
    zc = config.zero_optimization
    stage = int(zc.stage)
    comm_dtype = _COMM_DTYPES.get(getattr(config, "communication_data_type", None))
    predivide = float(config.gradient_predivide_factor or 1.0) if config.prescale_gradients else 1.0
    if stage == 0:
        bucket = None
        if "reduce_bucket_size" in zc.model_fields_set and isinstance(zc.reduce_bucket_size, (int, float)):
            bucket = zc.reduce_bucket_size * 4 / 2**20  # elements (fp32) -> MB
        return DataParallel(module, device=device, group=group, comm_dtype=comm_dtype, predivide=predivide,
                            bucket_cap_mb=bucket)
    raise NotImplementedError(
        f"zero_optimization.stage={stage} is not implemented yet in this build; use stage 0 "
        "(ZeRO stages 1-3 land with the ZeRO issue)")
