"""``deepspeed.runtime.utils``: the helpers DeepSpeed training scripts commonly call.

Norms go through flexspeed's own :func:`~flexspeed.runtime.precision.total_norm` (DTensor shards
at ZeRO-2/3 and tensor-parallel shards are reduced), so they are correct at every stage and with
``tensor_parallel.autotp_size``. flexspeed builds no Megatron ``mpu``: functions that take one refuse it.
"""

from __future__ import annotations

import contextlib
import gc
import math
import os
import random
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist

from flexspeed.runtime.precision import clip_grads_, total_norm

__all__ = [
    "noop_decorator", "noop_context", "ensure_directory_exists", "set_random_seed", "is_model_parallel_parameter",
    "move_to_device", "get_global_norm", "clip_grad_norm_", "get_grad_norm", "get_weight_norm",
    "see_memory_usage", "empty_cache", "call_to_str", "get_only_unique_item", "prefix_sum_inc",
    "partition_uniform",
]


def noop_decorator(func: Callable) -> Callable:
    """Return ``func`` unchanged."""
    return func


noop_context = contextlib.nullcontext
"""A context manager that does nothing (DeepSpeed's ``noop_context``)."""


def ensure_directory_exists(filename: str) -> None:
    """Create the directory that will hold ``filename``."""
    os.makedirs(os.path.dirname(filename), exist_ok=True)


def set_random_seed(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator (when installed) and torch (CPU and CUDA)."""
    random.seed(seed)
    try:
        import numpy
    except ImportError:
        pass
    else:
        numpy.random.seed(seed % 2**32)
    torch.manual_seed(seed % 2**63)


def is_model_parallel_parameter(p: torch.Tensor) -> bool:
    """Whether ``p`` is split by tensor parallelism (a DTensor on a mesh with a ``"tp"`` dimension)."""
    mesh = getattr(p, "device_mesh", None)
    return mesh is not None and "tp" in (getattr(mesh, "mesh_dim_names", None) or ())


def move_to_device(item: Any, device: torch.device | str, criterion_func: Callable[[Any], bool] | None = None) -> Any:
    """``item`` with every tensor inside lists, tuples and dicts moved to ``device`` (those passing ``criterion_func``)."""
    if torch.is_tensor(item):
        return item.to(device) if criterion_func is None or criterion_func(item) else item
    if isinstance(item, (list, tuple)):
        return type(item)(move_to_device(v, device, criterion_func) for v in item)
    if isinstance(item, dict):
        return {k: move_to_device(v, device, criterion_func) for k, v in item.items()}
    return item


def _no_mpu(mpu: Any, name: str) -> None:
    if mpu is not None:
        raise ValueError(f"{name}(mpu=...): flexspeed has no model parallelism, so there is no model-parallel group to "
                         "reduce over. Fix: call it without mpu")


def get_global_norm(norm_list: Iterable[float]) -> float:
    """The L2 norm of norms (``inf`` if any is infinite or NaN)."""
    norms = [float(n) for n in norm_list]
    if any(not math.isfinite(n) for n in norms):
        return float("inf")
    return math.sqrt(sum(n * n for n in norms))


def clip_grad_norm_(parameters: Iterable[torch.Tensor] | torch.Tensor, max_norm: float, norm_type: float = 2,
                    mpu: Any = None) -> torch.Tensor:
    """Scale the gradients so their total norm is at most ``max_norm``; return the norm before clipping.

    As DeepSpeed's: coefficient ``max_norm / (norm + 1e-6)`` capped at 1. Gradients flexspeed's engine
    reduced are equal on every data-parallel rank, so the norm needs no averaging over ranks.
    """
    _no_mpu(mpu, "clip_grad_norm_")
    params = [parameters] if torch.is_tensor(parameters) else [p for p in parameters if p.grad is not None]
    norm = total_norm([p.grad for p in params], float(norm_type))
    return clip_grads_(params, float(max_norm), norm)


def get_grad_norm(parameters: Iterable[torch.Tensor] | torch.Tensor, norm_type: float = 2,
                  mpu: Any = None) -> float:
    """Total norm of the gradients, or -1 when it is infinite or NaN (DeepSpeed's convention)."""
    _no_mpu(mpu, "get_grad_norm")
    params = [parameters] if torch.is_tensor(parameters) else list(parameters)
    norm = float(total_norm([p.grad for p in params if p.grad is not None], float(norm_type)))
    return norm if math.isfinite(norm) else -1


def get_weight_norm(parameters: Iterable[torch.Tensor] | torch.Tensor, norm_type: float = 2,
                    mpu: Any = None) -> float:
    """Total norm of the parameters, or -1 when it is infinite or NaN."""
    _no_mpu(mpu, "get_weight_norm")
    params = [parameters] if torch.is_tensor(parameters) else list(parameters)
    norm = float(total_norm([p.detach() for p in params], float(norm_type)))
    return norm if math.isfinite(norm) else -1


def see_memory_usage(message: str, force: bool = False) -> None:
    """Print device memory (allocated/reserved, current and peak) and host memory on rank 0, then reset the peak.

    Does nothing unless ``force`` (DeepSpeed's switch for its many built-in calls).
    """
    if not force or (dist.is_initialized() and dist.get_rank() != 0):
        return
    from flexspeed.accelerator import CpuAccelerator, get_accelerator

    gc.collect()
    acc, host, gib = get_accelerator(), CpuAccelerator(), 2**30
    total, free = host.total_memory(), host.available_memory()
    print(message)
    print(f"MA {acc.memory_allocated() / gib:.2f} GB  Max_MA {acc.max_memory_allocated() / gib:.2f} GB  "
          f"CA {acc.memory_reserved() / gib:.2f} GB  Max_CA {acc.max_memory_reserved() / gib:.2f} GB")
    print(f"CPU Virtual Memory:  used = {(total - free) / gib:.2f} GB, percent = {100 * (total - free) / total:.1f}%")
    acc.reset_peak_memory_stats()


def empty_cache() -> None:
    """Release the accelerator's cached memory and reset its peak statistics."""
    from flexspeed.accelerator import get_accelerator

    get_accelerator().empty_cache()
    get_accelerator().reset_peak_memory_stats()


def call_to_str(base: str, *args: Any, **kwargs: Any) -> str:
    """``"base(arg, ..., key=value)"`` with ``repr`` of each argument."""
    parts = [repr(a) for a in args] + [f"{k}={v!r}" for k, v in kwargs.items()]
    return f"{base}({', '.join(parts)})"


def get_only_unique_item(items: Iterable[Any]) -> Any:
    """The single distinct value of ``items``; RuntimeError if there are several (or none)."""
    unique = set(items)
    if len(unique) != 1:
        raise RuntimeError(f"expected there to be only one unique element in {unique}")
    return next(iter(unique))


def prefix_sum_inc(weights: Iterable[float]) -> list[float]:
    """Inclusive prefix sums: ``[3, 4, 5] -> [3, 7, 12]``."""
    out: list[float] = []
    for w in weights:
        out.append(w + (out[-1] if out else 0))
    return out


def partition_uniform(num_items: int, num_parts: int) -> list[int]:
    """``num_parts + 1`` bounds cutting ``num_items`` into near-equal runs, the first runs one longer.

    With fewer items than parts, the last parts are empty (as in DeepSpeed); otherwise the bounds
    are :func:`flexspeed.pipe.partition.partition_uniform`'s.
    """
    if num_items <= num_parts:
        return [min(p, num_items) for p in range(num_parts + 1)]
    from flexspeed.pipe.partition import partition_uniform as _uniform

    return _uniform(num_items, num_parts)
