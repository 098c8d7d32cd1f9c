"""``deepspeed.utils.safe_get_full_*`` and friends: whole tensors of a parameter at any ZeRO stage.

flexspeed keeps fp32 master weights as the module's own parameters (16-bit compute happens under
autocast), so "the fp32 parameter" is the parameter itself. How much of it a rank holds:

- stages 0 and 1: the whole parameter and, after ``backward``, its whole (reduced) gradient.
  Optimizer state at stage 1 lives only on the rank that owns the parameter's update; the
  getters fetch it from there (a collective over the data-parallel group).
- stage 2: whole parameters as at stage 1; the gradient (on the accumulation boundary) and the
  optimizer state live on the owning rank only, and the getters fetch them from there. The
  setters write where the gradient or state is held (nowhere before the first ``backward``/step).
- stage 3 (and stage 2 with optimizer offload on an accelerator): FSDP2 ``DTensor`` shards; the
  getters all-gather (``full_tensor()``) and the setters keep this rank's shard of the full value
  given. Parameters below stage 3's persistence threshold stay whole on every rank.

As in DeepSpeed, at stages 1-3 every rank of the data-parallel group must make the same calls
in the same order (they are collectives); call the gradient functions after ``engine.backward``
and before ``engine.step`` (the step frees the gradients). Gradients are as accumulated: with fp16
they still carry the loss scale until ``step()`` unscales them, as in DeepSpeed.

The optimizer-state functions find the optimizer through a registry ``flexspeed.initialize()``
fills (weak references; nothing is stored on the parameters).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.weak import WeakIdKeyDictionary

__all__ = [
    "register_optimizer", "safe_get_full_fp32_param", "safe_set_full_fp32_param", "safe_get_full_grad",
    "safe_set_full_grad", "safe_get_full_optimizer_state", "safe_set_full_optimizer_state",
    "safe_get_local_fp32_param", "safe_get_local_grad", "safe_get_local_optimizer_state",
    "safe_set_local_fp32_param", "safe_set_local_grad", "safe_set_local_optimizer_state",
]


@dataclass(frozen=True)
class _Owner:
    """Where a parameter's optimizer state lives."""

    optimizer: weakref.ref
    stage: int
    group: dist.ProcessGroup | None


_OWNERS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def register_optimizer(optimizer: torch.optim.Optimizer | None, *, stage: int,
                       group: dist.ProcessGroup | None) -> None:
    """Record which optimizer updates each of its parameters (``initialize()`` calls this).

    Args:
        optimizer: the engine's optimizer (``None``: nothing to record).
        stage: the ZeRO stage it runs under.
        group: the data-parallel group (``None``: the world).
    """
    if optimizer is None:
        return
    owner = _Owner(weakref.ref(optimizer), int(stage), group)
    for group_ in optimizer.param_groups:
        for p in group_["params"]:
            _OWNERS[p] = owner


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def _assign_full(target: torch.Tensor, value: torch.Tensor) -> None:
    """Copy the full ``value`` into ``target``: all of it, or this rank's shard of a DTensor."""
    if tuple(value.shape) != tuple(target.shape):
        raise ValueError(f"value has shape {tuple(value.shape)} but the tensor it replaces has {tuple(target.shape)}; "
                         "pass the full (unsharded) tensor, the same on every rank")
    if isinstance(target, DTensor):
        shard = distribute_tensor(value.detach().to(target.device, target.dtype), target.device_mesh,
                                  target.placements, src_data_rank=None)
        target.to_local().copy_(shard.to_local())
    else:
        target.copy_(value)


# ---- parameters ---------------------------------------------------------------------------------------
def safe_get_full_fp32_param(param: torch.Tensor) -> torch.Tensor:
    """The whole parameter in fp32 (a new tensor, on the parameter's device); all-gathered at stage 3."""
    return _full(param.detach()).float().clone()


def safe_set_full_fp32_param(param: torch.Tensor, value: torch.Tensor) -> None:
    """Overwrite the parameter with the full ``value`` (every rank passes the same tensor)."""
    _assign_full(param, value)


def safe_get_local_fp32_param(param: torch.Tensor) -> torch.Tensor:
    """This rank's part of the parameter in fp32: its shard at stage 3, else the whole parameter."""
    return _local(param.detach()).float()


@torch.no_grad()
def safe_set_local_fp32_param(param: torch.Tensor, value: torch.Tensor) -> None:
    """Overwrite this rank's part of the parameter (its shard at stage 3)."""
    _local(param).copy_(value)


# ---- gradients ----------------------------------------------------------------------------------------
def safe_get_full_grad(param: torch.Tensor) -> torch.Tensor | None:
    """The whole gradient of ``param`` (all-gathered at stage 3, fetched from its owner at stage 2),
    or ``None`` if no rank has one."""
    grad = param.grad
    if isinstance(grad, DTensor):
        return grad.full_tensor()
    owner = _owner(param)
    if not _sharded_by_rank(owner, stages=(2,)):
        return grad
    src = _holder(owner, grad is not None)
    if src is None:
        return None
    buf = grad.detach().clone() if grad is not None else torch.empty_like(param.detach())
    dist.broadcast(buf, src=dist.get_global_rank(owner.group, src) if owner.group else src, group=owner.group)
    return buf


@torch.no_grad()
def safe_set_full_grad(param: torch.Tensor, value: torch.Tensor) -> None:
    """Replace the gradient of ``param`` with the full ``value`` (created if ``param`` has none; at
    stage 2 only where the gradient is held - its owner, after ``backward``)."""
    if param.grad is None:
        if _sharded_by_rank(_owner(param), stages=(2,)):
            return  # another rank owns this gradient (or none exists yet), as in DeepSpeed's partitions
        param.grad = torch.zeros_like(param)
    _assign_full(param.grad, value)


def safe_get_local_grad(param: torch.Tensor) -> torch.Tensor | None:
    """This rank's part of the gradient (its shard at stage 3), or ``None``."""
    return None if param.grad is None else _local(param.grad)


@torch.no_grad()
def safe_set_local_grad(param: torch.Tensor, value: torch.Tensor) -> None:
    """Overwrite this rank's part of the gradient."""
    if param.grad is None:
        raise ValueError("the parameter has no gradient to overwrite. Fix: call this after engine.backward(), or use "
                         "safe_set_full_grad(param, value) with the full gradient")
    _local(param.grad).copy_(value)


# ---- optimizer state ----------------------------------------------------------------------------------
def _owner(param: torch.Tensor) -> _Owner | None:
    owner = _OWNERS.get(param)
    if owner is None or owner.optimizer() is None:
        return None
    return owner


def _state(param: torch.Tensor, owner: _Owner, key: str) -> torch.Tensor | None:
    value = owner.optimizer().state.get(param, {}).get(key)
    if value is not None and not torch.is_tensor(value):
        raise ValueError(f"optimizer state {key!r} is {type(value).__name__}, not a tensor")
    return value


def _holder(owner: _Owner, has: bool) -> int | None:
    """Group rank of the first rank holding the state at stage 1 (``None``: no rank holds it yet)."""
    flags: list[bool] = [False] * dist.get_world_size(owner.group)
    dist.all_gather_object(flags, has, group=owner.group)
    return next((r for r, f in enumerate(flags) if f), None)


def _sharded_by_rank(owner: _Owner | None, stages: tuple[int, ...] = (1, 2)) -> bool:
    """Stages 1-2 (and a pipeline's stage 1): optimizer state (stage 2: the gradient too) lives on one
    rank of a group of several."""
    return (owner is not None and owner.stage in stages and dist.is_initialized()
            and dist.get_world_size(owner.group) > 1)


def safe_get_full_optimizer_state(param: torch.Tensor, optim_state_key: str) -> torch.Tensor | None:
    """The whole optimizer state ``optim_state_key`` (e.g. ``"exp_avg"``) of ``param``.

    Returns:
        A tensor on the parameter's device, or ``None`` when the parameter is not in an engine's
        optimizer or has no such state yet (before the first step).
    """
    owner = _owner(param)
    if owner is None:
        return None
    value = _state(param, owner, optim_state_key)
    if isinstance(value, DTensor):
        return value.full_tensor()
    if not _sharded_by_rank(owner):
        return None if value is None else value.clone()
    src = _holder(owner, value is not None)
    if src is None:
        return None
    box = [value.detach().cpu() if value is not None else None]
    dist.broadcast_object_list(box, src=dist.get_global_rank(owner.group, src) if owner.group else src,
                               group=owner.group)
    return box[0].to(param.device)


def safe_set_full_optimizer_state(param: torch.Tensor, value: torch.Tensor, optim_state_key: str) -> None:
    """Overwrite optimizer state ``optim_state_key`` of ``param`` with the full ``value`` where it is held."""
    owner = _owner(param)
    target = None if owner is None else _state(param, owner, optim_state_key)
    if target is None:
        return  # no state here (another rank owns it at stages 1-2, or no step yet), as in DeepSpeed
    _assign_full(target, value)


def safe_get_local_optimizer_state(param: torch.Tensor, optim_state_key: str) -> torch.Tensor | None:
    """This rank's part of the optimizer state (its shard at stage 3), or ``None`` if not held here."""
    owner = _owner(param)
    value = None if owner is None else _state(param, owner, optim_state_key)
    return None if value is None else _local(value)


@torch.no_grad()
def safe_set_local_optimizer_state(param: torch.Tensor, value: torch.Tensor, optim_state_key: str) -> None:
    """Overwrite this rank's part of the optimizer state."""
    local = safe_get_local_optimizer_state(param, optim_state_key)
    if local is None:
        raise ValueError(f"this rank holds no optimizer state {optim_state_key!r} for the parameter. Fix: call it "
                         "after the first engine.step(), on the rank that owns the parameter at stages 1-2")
    local.copy_(value)
