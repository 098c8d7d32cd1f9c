"""``deepspeed.runtime.zero.partition_parameters``: where DeepSpeed defines ``Init`` and ``GatheredParameters``.

The classes are ``deepspeed.zero``'s (:mod:`flexspeed.integrations.deepspeed.zero`). transformers' ``prevent_arange_dtype_change``
swaps ``zero_wrapper_for_fp_tensor_constructor`` for the duration of a ``zero.Init``: flexspeed's
``Init`` changes no tensor constructor (it keeps fp32 master weights), so the function is here for
that swap and returns the constructor unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from flexspeed.accelerator import get_accelerator
from flexspeed.integrations.deepspeed.zero import GatheredParameters, Init, ZeroParamStatus, ZeroParamType

__all__ = ["Init", "GatheredParameters", "ZeroParamStatus", "ZeroParamType", "zero_wrapper_for_fp_tensor_constructor", "get_accelerator"]

_orig_torch_tensor = torch.tensor
_orig_torch_empty = torch.empty
_orig_torch_zeros = torch.zeros
_orig_torch_ones = torch.ones
_orig_torch_full = torch.full
_orig_torch_arange = torch.arange
_orig_torch_eye = torch.eye
_orig_torch_randn = torch.randn


def zero_wrapper_for_fp_tensor_constructor(fn: Callable, *args: Any, **kwargs: Any) -> Callable:
    """DeepSpeed wraps tensor constructors to change their dtype/device under ``Init``; flexspeed does not."""
    return fn
