"""``deepspeed.runtime.zero``: ``Init``, ``GatheredParameters`` and the ZeRO-3 parameter enums.

flexspeed's :mod:`flexspeed.zero` under DeepSpeed's package path; ``partition_parameters`` is the
submodule DeepSpeed defines them in (transformers imports it).
"""

from __future__ import annotations

from flexspeed.integrations.deepspeed.runtime.zero.partition_parameters import (
    GatheredParameters,
    Init,
    ZeroParamStatus,
    ZeroParamType,
)

__all__ = ["Init", "GatheredParameters", "ZeroParamStatus", "ZeroParamType"]
