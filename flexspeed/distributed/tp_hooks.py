"""Forward hooks a :class:`~flexspeed.distributed.tp_discovery.TensorParallelPlan` attaches.

``all_reduce_hook`` sums a row-parallel layer's partial outputs (inference TP's local shards);
:class:`AlibiSlice` keeps a rank's heads of a BLOOM-style ALiBi bias; :class:`NarrowState` hands a
nanoGPT-style attention module (one that derives its head size from its input width) a narrowed
view of its input while its column-parallel projections still read all of it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["planned_module", "all_reduce_hook", "AlibiSlice", "NarrowState"]


def planned_module(model: nn.Module, name: str, what: str) -> nn.Module:
    """``model.get_submodule(name)``, or a RuntimeError saying a later pass replaced the planned ``what``."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise RuntimeError(f"the {what} {name!r} planned for tensor parallelism is no longer in the model; "
                           "a later pass replaced it (kernel injection with tp_size > 1?)") from None


def all_reduce_hook(group: dist.ProcessGroup | None, reduce: Callable[[torch.Tensor], None] | None = None):
    """A forward hook summing a row-parallel layer's partial output over ``group`` in place.

    ``reduce``: an in-place sum over the group's ranks for CPU outputs (inference's shared-memory
    all-reduce when every rank runs on this host); other outputs, or ``None``, go through
    ``torch.distributed``."""
    def hook(module: nn.Module, args: tuple, output: Any) -> Any:
        out = output[0] if isinstance(output, tuple) else output
        if reduce is not None and out.device.type == "cpu":
            reduce(out)
        else:
            dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
        return output
    return hook


@dataclass
class AlibiSlice:
    """Keeps this rank's heads of a ``(B * H, 1, T)`` ALiBi bias computed for all heads."""

    position: int
    heads: int
    local: int
    rank: int

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        in_kwargs = "alibi" in kwargs
        alibi = kwargs["alibi"] if in_kwargs else args[self.position] if len(args) > self.position else None
        if not isinstance(alibi, torch.Tensor) or alibi.shape[0] % self.heads:
            return args, kwargs
        rest = alibi.shape[1:]
        mine = alibi.view(-1, self.heads, *rest)[:, self.rank * self.local:(self.rank + 1) * self.local]
        mine = mine.reshape(-1, *rest)  # (B * H/tp, 1, T)
        if in_kwargs:
            return args, {**kwargs, "alibi": mine}
        return args[:self.position] + (mine,) + args[self.position + 1:], kwargs


@dataclass
class NarrowState:
    """Per attention module: the full input, and the narrowed view handed to its forward."""

    full: int
    local: int
    x: torch.Tensor | None = None
    view: torch.Tensor | None = None

    def narrow(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor) and a.dim() >= 2 and a.shape[-1] == self.full:
                self.x, self.view = a, a[..., : self.local]  # (B, T, C) -> (B, T, C/tp), no copy
                return args[:i] + (self.view,) + args[i + 1:], kwargs
        for k, a in kwargs.items():
            if isinstance(a, torch.Tensor) and a.dim() >= 2 and a.shape[-1] == self.full:
                self.x, self.view = a, a[..., : self.local]
                return args, {**kwargs, k: self.view}
        return args, kwargs

    def widen(self, module: nn.Module, args: tuple) -> tuple | None:
        if self.view is None or not args:
            return None
        if args[0] is self.view:
            return (self.x,) + tuple(args[1:])  # the projection reads the whole hidden state
        if isinstance(args[0], torch.Tensor) and args[0].shape[-1] == self.local:
            raise RuntimeError(
                f"tensor parallelism: {type(module).__name__} received a transformed copy of the narrowed "
                "attention input; the attention module changes its input before projecting it. Give the "
                "attention module a `head_dim` attribute and make it reshape with it, or pass injection_policy.")
        return None

    def clear(self, module: nn.Module, args: tuple, output: Any) -> None:
        self.x = self.view = None
