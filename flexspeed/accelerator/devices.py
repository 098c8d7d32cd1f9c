"""The accelerator interface DeepSpeed scripts call, for CUDA and for the CPU.

:class:`DeepSpeedAccelerator` declares the methods (DeepSpeed's names and arguments) and
implements those that read the same on every device; :class:`CudaAccelerator` maps the rest onto
``torch.cuda`` and :class:`CpuAccelerator` onto the process (memory is the resident set size, as
DeepSpeed's CPU accelerator reports it). DeepSpeed's op builders do not exist here: flexspeed
runs PyTorch's own kernels, so ``create_op_builder``/``get_op_builder`` raise with that fix.
"""

from __future__ import annotations

import abc
import contextlib
import os
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["DeepSpeedAccelerator", "CudaAccelerator", "CpuAccelerator"]


def _tensor_factory(dtype: torch.dtype, device: Callable[[], str]) -> Callable[..., torch.Tensor]:
    """``FloatTensor([0.0])``-style constructor making a tensor of ``dtype`` on the accelerator."""

    def make(*data: Any) -> torch.Tensor:
        if len(data) == 1 and not isinstance(data[0], int):
            return torch.tensor(data[0], dtype=dtype, device=device())
        return torch.empty(*data, dtype=dtype, device=device())

    return make


class DeepSpeedAccelerator(abc.ABC):
    """What ``get_accelerator()`` returns: device, RNG, memory, dtype and stream queries by DeepSpeed's names."""

    _name = "abstract"
    _communication_backend_name = "gloo"

    # ---- device --------------------------------------------------------------------------------
    @abc.abstractmethod
    def device_name(self, device_index: int | None = None) -> str:
        """``"cuda"``/``"cpu"``, or ``"cuda:<index>"`` when an index is given."""

    @abc.abstractmethod
    def current_device(self) -> int:
        """Index of this process's device."""

    def current_device_name(self) -> str:
        """The string ``torch.device`` accepts for this process's device (``"cuda:0"``, ``"cpu"``)."""
        return self.device_name(self.current_device())

    @abc.abstractmethod
    def device_count(self) -> int:
        """Number of devices of this kind on the node."""

    @abc.abstractmethod
    def is_available(self) -> bool:
        """Whether this accelerator can run here."""

    @abc.abstractmethod
    def synchronize(self, device_index: int | None = None) -> None:
        """Wait for the device's queued work."""

    def set_device(self, device_index: int) -> None:
        """Make ``device_index`` this process's device (no-op on the CPU)."""

    def device(self, device_index: int | None = None) -> Any:
        """A context manager selecting the device (``None`` on the CPU)."""
        return None

    def communication_backend_name(self) -> str:
        """The ``torch.distributed`` backend for this device: ``"nccl"`` or ``"gloo"``."""
        return self._communication_backend_name

    def is_synchronized_device(self) -> bool:
        """True when work runs synchronously with the host (the CPU)."""
        return self._name == "cpu"

    def use_host_timers(self) -> bool:
        return self.is_synchronized_device()

    def resolves_data_dependency(self) -> bool:
        return self.is_synchronized_device()

    def handles_memory_backpressure(self) -> bool:
        return self.is_synchronized_device()

    # ---- random numbers --------------------------------------------------------------------------
    def random(self) -> Any:
        """The module with ``manual_seed``/``fork_rng``: ``torch.random``."""
        return torch.random

    @abc.abstractmethod
    def manual_seed(self, seed: int) -> Any:
        """Seed this device's generator."""

    def manual_seed_all(self, seed: int) -> Any:
        """Seed every device's generator of this kind."""
        return self.manual_seed(seed)

    @abc.abstractmethod
    def get_rng_state(self, device_index: int | None = None) -> torch.Tensor:
        """This device's generator state."""

    @abc.abstractmethod
    def set_rng_state(self, new_state: torch.Tensor, device_index: int | None = None) -> None:
        """Restore a state from :meth:`get_rng_state`."""

    def initial_seed(self) -> int:
        return torch.initial_seed()

    # ---- memory ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def memory_allocated(self, device_index: int | None = None) -> int:
        """Bytes in use now."""

    @abc.abstractmethod
    def max_memory_allocated(self, device_index: int | None = None) -> int:
        """Peak bytes in use since the last reset."""

    @abc.abstractmethod
    def reset_peak_memory_stats(self, device_index: int | None = None) -> None:
        """Start a new peak."""

    @abc.abstractmethod
    def memory_reserved(self, device_index: int | None = None) -> int:
        """Bytes held by the allocator."""

    @abc.abstractmethod
    def max_memory_reserved(self, device_index: int | None = None) -> int:
        """Peak bytes held by the allocator."""

    @abc.abstractmethod
    def total_memory(self, device_index: int | None = None) -> int:
        """Bytes of memory of the device."""

    @abc.abstractmethod
    def available_memory(self, device_index: int | None = None) -> int:
        """Bytes of memory free for allocation now."""

    def empty_cache(self) -> None:
        """Release cached, unused memory to the system (no-op on the CPU)."""

    def memory_cached(self, device_index: int | None = None) -> int:
        return self.memory_reserved(device_index)

    def max_memory_cached(self, device_index: int | None = None) -> int:
        return self.max_memory_reserved(device_index)

    def reset_max_memory_allocated(self, device_index: int | None = None) -> None:
        self.reset_peak_memory_stats(device_index)

    def reset_max_memory_cached(self, device_index: int | None = None) -> None:
        self.reset_peak_memory_stats(device_index)

    def memory_stats(self, device_index: int | None = None) -> dict[str, int]:
        return {"allocated_bytes.all.current": self.memory_allocated(device_index),
                "allocated_bytes.all.peak": self.max_memory_allocated(device_index)}

    # ---- data types ------------------------------------------------------------------------------
    @abc.abstractmethod
    def is_bf16_supported(self) -> bool:
        """Whether bfloat16 compute is supported."""

    @abc.abstractmethod
    def is_fp16_supported(self) -> bool:
        """Whether float16 compute is supported."""

    def is_fp64_supported(self) -> bool:
        return True

    def supported_dtypes(self) -> list[torch.dtype]:
        """float32, then float16 and bfloat16 where supported."""
        out = [torch.float32]
        if self.is_fp16_supported():
            out.append(torch.float16)
        if self.is_bf16_supported():
            out.append(torch.bfloat16)
        return out

    # ---- tensors ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def on_accelerator(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor`` lives on this accelerator."""

    def pin_memory(self, tensor: torch.Tensor, align_bytes: int = 1) -> torch.Tensor:
        """A page-locked copy of a CPU tensor (the tensor itself where pinning means nothing)."""
        return tensor

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        return False

    def _device_for_new(self) -> str:
        return self.current_device_name()

    @property
    def FloatTensor(self) -> Callable[..., torch.Tensor]:  # noqa: N802 - DeepSpeed's name
        return _tensor_factory(torch.float32, self._device_for_new)

    @property
    def HalfTensor(self) -> Callable[..., torch.Tensor]:  # noqa: N802
        return _tensor_factory(torch.float16, self._device_for_new)

    @property
    def BFloat16Tensor(self) -> Callable[..., torch.Tensor]:  # noqa: N802
        return _tensor_factory(torch.bfloat16, self._device_for_new)

    @property
    def DoubleTensor(self) -> Callable[..., torch.Tensor]:  # noqa: N802
        return _tensor_factory(torch.float64, self._device_for_new)

    @property
    def IntTensor(self) -> Callable[..., torch.Tensor]:  # noqa: N802
        return _tensor_factory(torch.int32, self._device_for_new)

    @property
    def LongTensor(self) -> Callable[..., torch.Tensor]:  # noqa: N802
        return _tensor_factory(torch.int64, self._device_for_new)

    @property
    def ByteTensor(self) -> Callable[..., torch.Tensor]:  # noqa: N802
        return _tensor_factory(torch.uint8, self._device_for_new)

    # ---- streams, graphs, profiling ranges ---------------------------------------------------------
    @property
    def Stream(self) -> Any:  # noqa: N802
        return None

    @property
    def Event(self) -> Any:  # noqa: N802
        return None

    def stream(self, stream: Any) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def current_stream(self, device_index: int | None = None) -> Any:
        return None

    def default_stream(self, device_index: int | None = None) -> Any:
        return None

    def range_push(self, msg: str) -> None:
        """Open a named profiler range (NVTX on CUDA)."""

    def range_pop(self) -> None:
        """Close the innermost profiler range."""

    def lazy_call(self, callback: Callable[[], Any]) -> Any:
        return callback()

    def is_triton_supported(self) -> bool:
        return False

    def get_compile_backend(self) -> str:
        return "inductor"

    # ---- DeepSpeed's native ops ------------------------------------------------------------------
    def create_op_builder(self, class_name: str) -> Any:
        raise ValueError(
            f"create_op_builder(class_name={class_name!r}): flexspeed builds none of DeepSpeed's native ops; it runs "
            "PyTorch's kernels. Fix: use flexspeed.ops.adam.FusedAdam / DeepSpeedCPUAdam (torch.optim Adam "
            "underneath), or a torch.optim optimizer")

    def get_op_builder(self, class_name: str) -> Any:
        return self.create_op_builder(class_name)


class CudaAccelerator(DeepSpeedAccelerator):
    """``torch.cuda`` under DeepSpeed's accelerator names."""

    _name = "cuda"
    _communication_backend_name = "nccl"

    def device_name(self, device_index: int | None = None) -> str:
        return "cuda" if device_index is None else f"cuda:{device_index}"

    def current_device(self) -> int:
        return torch.cuda.current_device()

    def device_count(self) -> int:
        return torch.cuda.device_count()

    def is_available(self) -> bool:
        return torch.cuda.is_available()

    def synchronize(self, device_index: int | None = None) -> None:
        torch.cuda.synchronize(device_index)

    def set_device(self, device_index: int) -> None:
        torch.cuda.set_device(device_index)

    def device(self, device_index: int | None = None) -> Any:
        return torch.cuda.device(device_index)

    def manual_seed(self, seed: int) -> Any:
        return torch.cuda.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> Any:
        return torch.cuda.manual_seed_all(seed)

    def get_rng_state(self, device_index: int | None = None) -> torch.Tensor:
        return torch.cuda.get_rng_state("cuda" if device_index is None else device_index)

    def set_rng_state(self, new_state: torch.Tensor, device_index: int | None = None) -> None:
        torch.cuda.set_rng_state(new_state, "cuda" if device_index is None else device_index)

    def memory_allocated(self, device_index: int | None = None) -> int:
        return torch.cuda.memory_allocated(device_index)

    def max_memory_allocated(self, device_index: int | None = None) -> int:
        return torch.cuda.max_memory_allocated(device_index)

    def reset_peak_memory_stats(self, device_index: int | None = None) -> None:
        torch.cuda.reset_peak_memory_stats(device_index)

    def memory_reserved(self, device_index: int | None = None) -> int:
        return torch.cuda.memory_reserved(device_index)

    def max_memory_reserved(self, device_index: int | None = None) -> int:
        return torch.cuda.max_memory_reserved(device_index)

    def total_memory(self, device_index: int | None = None) -> int:
        index = self.current_device() if device_index is None else device_index
        return torch.cuda.get_device_properties(index).total_memory

    def available_memory(self, device_index: int | None = None) -> int:
        return torch.cuda.mem_get_info(device_index)[0]

    def empty_cache(self) -> None:
        torch.cuda.empty_cache()

    def memory_stats(self, device_index: int | None = None) -> dict[str, int]:
        return torch.cuda.memory_stats(device_index)

    def is_bf16_supported(self) -> bool:
        return torch.cuda.is_bf16_supported()

    def is_fp16_supported(self) -> bool:
        major, _ = torch.cuda.get_device_capability()
        return major >= 7

    def on_accelerator(self, tensor: torch.Tensor) -> bool:
        return tensor.device.type == "cuda"

    def pin_memory(self, tensor: torch.Tensor, align_bytes: int = 1) -> torch.Tensor:
        return tensor if tensor.is_pinned() else tensor.pin_memory()

    def is_pinned(self, tensor: torch.Tensor) -> bool:
        return tensor.is_pinned()

    @property
    def Stream(self) -> Any:  # noqa: N802
        return torch.cuda.Stream

    @property
    def Event(self) -> Any:  # noqa: N802
        return torch.cuda.Event

    def stream(self, stream: Any) -> contextlib.AbstractContextManager:
        return torch.cuda.stream(stream)

    def current_stream(self, device_index: int | None = None) -> Any:
        return torch.cuda.current_stream(device_index)

    def default_stream(self, device_index: int | None = None) -> Any:
        return torch.cuda.default_stream(device_index)

    def range_push(self, msg: str) -> None:
        torch.cuda.nvtx.range_push(msg)

    def range_pop(self) -> None:
        torch.cuda.nvtx.range_pop()

    def is_triton_supported(self) -> bool:
        return torch.cuda.get_device_capability()[0] >= 8


class CpuAccelerator(DeepSpeedAccelerator):
    """The CPU as an accelerator: memory figures are this process's resident set size (as DeepSpeed's)."""

    _name = "cpu"
    _communication_backend_name = "gloo"

    def __init__(self) -> None:
        self._peak_rss = self._rss()

    @staticmethod
    def _rss() -> int:
        try:
            import psutil
        except ImportError:  # Linux without psutil: resident pages from /proc
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        return psutil.Process().memory_info().rss

    def device_name(self, device_index: int | None = None) -> str:
        return "cpu"

    def current_device(self) -> int:
        return int(os.environ.get("LOCAL_RANK", 0))

    def current_device_name(self) -> str:
        return "cpu"

    def device_count(self) -> int:
        return int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)

    def is_available(self) -> bool:
        return True

    def synchronize(self, device_index: int | None = None) -> None:
        """Nothing to wait for: CPU work runs synchronously."""

    def manual_seed(self, seed: int) -> Any:
        return torch.manual_seed(seed)

    def get_rng_state(self, device_index: int | None = None) -> torch.Tensor:
        return torch.get_rng_state()

    def set_rng_state(self, new_state: torch.Tensor, device_index: int | None = None) -> None:
        torch.set_rng_state(new_state)

    def memory_allocated(self, device_index: int | None = None) -> int:
        rss = self._rss()
        self._peak_rss = max(self._peak_rss, rss)
        return rss

    def max_memory_allocated(self, device_index: int | None = None) -> int:
        self.memory_allocated()
        return self._peak_rss

    def reset_peak_memory_stats(self, device_index: int | None = None) -> None:
        self._peak_rss = self._rss()

    def memory_reserved(self, device_index: int | None = None) -> int:
        return self.memory_allocated()

    def max_memory_reserved(self, device_index: int | None = None) -> int:
        return self.max_memory_allocated()

    def total_memory(self, device_index: int | None = None) -> int:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")

    def available_memory(self, device_index: int | None = None) -> int:
        try:
            import psutil
        except ImportError:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        return psutil.virtual_memory().available

    def is_bf16_supported(self) -> bool:
        return True

    def is_fp16_supported(self) -> bool:
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
        except (AttributeError, RuntimeError):
            return False

    def on_accelerator(self, tensor: torch.Tensor) -> bool:
        return tensor.device.type == "cpu"
