"""``deepspeed.accelerator`` for flexspeed: ``get_accelerator()`` and the device object it returns.

DeepSpeed scripts write device-neutral code against this object
(``get_accelerator().current_device_name()``, ``.manual_seed(s)``, ``.max_memory_allocated()``...).
flexspeed has two implementations, CUDA and CPU, chosen the way flexspeed chooses its compute
device (:func:`flexspeed.distributed.default_device`: a GPU when CUDA is available), or by
DeepSpeed's ``DS_ACCELERATOR`` environment variable (``"cuda"`` or ``"cpu"``).
"""

from __future__ import annotations

import os

from flexspeed.accelerator.devices import CpuAccelerator, CudaAccelerator, DeepSpeedAccelerator

__all__ = [
    "DeepSpeedAccelerator",
    "CudaAccelerator",
    "CpuAccelerator",
    "get_accelerator",
    "set_accelerator",
    "is_current_accelerator_supported",
]

SUPPORTED_ACCELERATORS = ("cuda", "cpu")
_current: DeepSpeedAccelerator | None = None


def _from_environment() -> DeepSpeedAccelerator:
    import torch

    name = os.environ.get("DS_ACCELERATOR")
    if name is None:
        from flexspeed.distributed import default_device

        name = default_device().type
    if name not in SUPPORTED_ACCELERATORS:
        raise ValueError(f"DS_ACCELERATOR={name!r} is not an accelerator flexspeed supports. Fix: unset it, or set "
                         f"it to one of {list(SUPPORTED_ACCELERATORS)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("DS_ACCELERATOR='cuda' but torch sees no CUDA device. Fix: unset DS_ACCELERATOR (flexspeed "
                         "then runs on the CPU) or install a CUDA build of torch")
    return CudaAccelerator() if name == "cuda" else CpuAccelerator()


def get_accelerator() -> DeepSpeedAccelerator:
    """The accelerator of this process (made on first call, then the same object)."""
    global _current
    if _current is None:
        _current = _from_environment()
    return _current


def set_accelerator(accel: DeepSpeedAccelerator) -> None:
    """Replace the accelerator ``get_accelerator()`` returns (DeepSpeed's name)."""
    global _current
    if not isinstance(accel, DeepSpeedAccelerator):
        raise TypeError(f"set_accelerator() needs a DeepSpeedAccelerator, got {type(accel).__name__}")
    _current = accel


def is_current_accelerator_supported() -> bool:
    """Whether the current accelerator is one flexspeed implements (always true once one exists)."""
    return get_accelerator().device_name() in SUPPORTED_ACCELERATORS
