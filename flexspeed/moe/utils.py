"""``deepspeed.moe.utils`` for models without expert parameters (flexspeed has no MoE layers)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["is_moe_param", "split_params_into_different_moe_groups_for_optimizer"]


def is_moe_param(param: Any) -> bool:
    """DeepSpeed marks expert parameters ``allreduce=False``; flexspeed builds none."""
    return hasattr(param, "allreduce") and not param.allreduce


def split_params_into_different_moe_groups_for_optimizer(param_groups: Mapping | Iterable,
                                                         max_group_size: int = 178956971) -> list[dict]:
    """The optimizer parameter groups with expert parameters split into groups of their own.

    With no expert parameters (always the case in flexspeed) this is ``param_groups`` as a list of
    dicts with list-valued ``params``, as DeepSpeed returns it.

    Raises:
        ValueError: a parameter is marked as an expert's (DeepSpeed's ``allreduce=False``).
    """
    del max_group_size
    groups = [param_groups] if isinstance(param_groups, Mapping) else list(param_groups)
    out = []
    for group in groups:
        group = dict(group)
        group["params"] = list(group["params"])
        if any(is_moe_param(p) for p in group["params"]):
            raise ValueError("a parameter is marked as a mixture-of-experts expert's (allreduce=False), and flexspeed "
                             "has no MoE layers. Fix: build the model without DeepSpeed's MoE")
        out.append(group)
    return out
