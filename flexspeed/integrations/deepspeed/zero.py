"""``deepspeed.zero`` in a process with flexspeed's DeepSpeed identity.

flexspeed's :mod:`flexspeed.zero` with one difference of representation, so code written against
DeepSpeed runs unchanged: a parameter built under this ``Init`` holds a 0-element tensor on its device
(DeepSpeed's partitioned form; ``param.ds_shape`` is the full shape), not a meta tensor of the full shape.
Hugging Face's loading code reads ``model.device`` from the first parameter, which must be a real device.
Everything else (``GatheredParameters``, what ``initialize()`` does with the values) is the same.
"""

from __future__ import annotations

from typing import Any

from flexspeed.zero import GatheredParameters, ZeroParamStatus, ZeroParamType
from flexspeed.zero import Init as _FlexInit

__all__ = ["Init", "GatheredParameters", "ZeroParamStatus", "ZeroParamType"]


class Init(_FlexInit):
    __doc__ = (_FlexInit.__doc__ or "") + (
        "\n    Under the DeepSpeed identity, parameters built inside hold 0-element tensors on their device\n"
        "    (DeepSpeed's partitioned form), their full shape in ``param.ds_shape``; and, as DeepSpeed's does,\n"
        "    ``Init(enabled=True)`` initialises torch.distributed when no group exists (the launcher's\n"
        "    environment, or one process: ``flexspeed.init_distributed``).\n")
    _empty_placeholders = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        import torch.distributed as dist

        if self.enabled and not dist.is_initialized():
            from flexspeed.distributed import init_distributed

            init_distributed()
