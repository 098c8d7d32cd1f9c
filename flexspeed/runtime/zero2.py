"""ZeRO stage 2 as DeepSpeed runs it: full parameters, partitioned gradients and optimizer state.

Stage 1 (:class:`~flexspeed.runtime.zero.ShardedOptimizerDP`) gives every trainable parameter an
owning rank: only the owner keeps optimizer state for it and updates it, then broadcasts the
result. Stage 2 keeps that partition and also partitions the gradients:

- the module keeps its own full parameters on every rank (no wrapper, no DTensor): ``engine.module``
  is the model the user built, as at DeepSpeed's stages 0-2;
- gradients are reduced during backward: each parameter's post-accumulate-grad hook copies its
  gradient into its bucket's send buffer (``reduce_bucket_size`` elements, in backward order; one
  buffer per owning rank) and frees it; a bucket is reduced as soon as all its parameters arrived -
  one ``reduce`` to each owner of a parameter in it (the owner receives the sum). About two buckets
  are in flight at a time. Buckets are launched in the same order on every rank; whatever backward
  did not reach is reduced after it, as zeros plus a "used" flag, so a parameter no rank used keeps
  ``grad=None`` (the optimizer skips it);
- every micro-step is reduced (DeepSpeed's stage 2 does the same); the owner accumulates the
  reduced micro-step gradients and exposes them as ``param.grad`` on the accumulation boundary.
  Other ranks hold no gradient for the parameter at all;
- the global gradient norm (clipping, ``get_global_grad_norm``) sums each rank's partition;
- the owner steps and broadcasts (stage 1's hooks).

``gradient_allreduce_op: "sum"`` sums instead of averaging; ``gradient_predivide_factor`` (with
``prescale_gradients``) and ``communication_data_type`` apply as in stages 0-1.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from flexspeed.config.errors import ConfigError
from flexspeed.runtime.zero import (ShardedOptimizerDP, ZeroSettings, ZeroStrategy, group_rank, group_size,
                                    sync_initial_state)

__all__ = ["PartitionedGradientsDP", "sum_comm_hook", "DEFAULT_BUCKET_ELEMENTS"]

DEFAULT_BUCKET_ELEMENTS = 500_000_000  # DeepSpeed's reduce_bucket_size default


def sum_comm_hook(comm_dtype: torch.dtype | None):
    """A DDP communication hook that sums gradients over the ranks (``gradient_allreduce_op: "sum"``).

    DeepSpeed's "sum" is a plain all-reduce: no division by the world size and no predivide factor.
    """

    # no annotations: DDP checks them against the real classes (see zero._comm_hook)
    def hook(group, bucket):  # (ProcessGroup, GradBucket) -> Future[Tensor]
        buf = bucket.buffer()
        send = buf.to(comm_dtype) if comm_dtype is not None and comm_dtype != buf.dtype else buf
        fut = dist.all_reduce(send, group=group, async_op=True).get_future()

        def finish(f: torch.futures.Future) -> torch.Tensor:
            out = f.value()[0]
            return buf.copy_(out.to(buf.dtype)) if out is not buf else buf

        return fut.then(finish)

    return hook


class _Reduction:
    """One launched collective: the gradients of ``params`` (one owner) flattened, plus used-flags."""

    __slots__ = ("params", "owner", "flat", "work")

    def __init__(self, params: list[torch.Tensor], owner: int | None, flat: torch.Tensor, work: Any) -> None:
        self.params, self.owner, self.flat, self.work = params, owner, flat, work


class PartitionedGradientsDP(ShardedOptimizerDP):
    """Stage 2: stage 1's owner partition, with each gradient kept only by its owner (see the module doc)."""

    def __init__(self, module: nn.Module, *, group: dist.ProcessGroup | None, settings: ZeroSettings,
                 grad_sum: bool = False, notes: list[str] | None = None) -> None:
        # no DDP: the gradients are reduced by this class's hooks, the module stays as the user built it
        ZeroStrategy.__init__(self, stage=2, module=module, model=module, group=group, notes=list(notes or []),
                              grad_accum_dtype=settings.grad_accum_dtype)
        self._layout, self._foreign, self._local_steps = [], [], False  # ShardedOptimizerDP's state
        self._comm_dtype = settings.comm_dtype
        self._predivide = 1.0 if grad_sum else settings.predivide
        self._average = not grad_sum
        bucket = settings.bucket_cap_mb * 2**20 / 4 if settings.bucket_cap_mb else DEFAULT_BUCKET_ELEMENTS
        self._bucket_elements = max(int(bucket), 1)
        self._owner: dict[int, int | None] = {}  # id(param) -> owning group rank (None: all-reduced, not stepped)
        self._names: dict[int, str] = {}
        self._buckets: list[list[torch.Tensor]] = []
        self._bucket_of: dict[int, int] = {}
        self._groups: list[list[tuple[int | None, list[torch.Tensor]]]] = []
        self._slot: dict[int, tuple[int, int, int]] = {}
        self._hooks: list[Any] = []
        self._acc: dict[int, torch.Tensor] = {}  # reduced gradients accumulated over micro-steps (owner only)
        self._sync = True
        self._armed = False
        self._reset_micro_step()
        sync_initial_state(module, group)  # DeepSpeed broadcasts rank 0's weights at construction

    # ---- setup ---------------------------------------------------------------------------------------
    def _shard(self, optimizer: torch.optim.Optimizer) -> None:
        super()._shard(optimizer)  # owners, foreign-gradient drop, broadcast of updates
        names = {}
        for name, p in self.module.named_parameters(remove_duplicate=False):
            names.setdefault(id(p), name)
        stepped = {id(t): owner for owner, tensors in self._layout for t in tensors}
        strays = [tuple(p.shape) for p in _stepped_params(self._layout) if id(p) not in names]
        if strays:
            raise ConfigError(
                f"the optimizer holds tensor(s) of shape {strays[:3]} that are not parameters of the model, so ZeRO "
                "stage 2 cannot reduce their gradients. Fix: build the optimizer over model.parameters() (or groups "
                "of them)", key="zero_optimization.stage")
        tracked = [p for p in _unique(self.module.parameters()) if p.requires_grad]
        self._owner = {id(p): stepped.get(id(p)) for p in tracked}
        self._names = {id(p): names[id(p)] for p in tracked}
        self._buckets = _buckets(list(reversed(tracked)), self._bucket_elements)
        self._bucket_of = {id(p): b for b, params in enumerate(self._buckets) for p in params}
        # per bucket, one send buffer per owner: where each parameter's gradient and used-flag go
        self._groups = [_by_owner(params, self._owner) for params in self._buckets]
        self._slot = {}
        for groups in self._groups:
            for gi, (_, params) in enumerate(groups):
                offset = 0
                for index, p in enumerate(params):
                    self._slot[id(p)] = (gi, offset, index)
                    offset += p.numel()
        ref = weakref.ref(self)
        for p in tracked:
            self._hooks.append(p.register_post_accumulate_grad_hook(_make_hook(ref)))
        self._reset_micro_step()

    def _reset_micro_step(self) -> None:
        self._bufs: dict[int, list[torch.Tensor]] = {}
        self._ready = [0] * len(self._buckets)
        self._seen: set[int] = set()
        self._next = 0
        self._pending: list[_Reduction] = []

    # ---- the engine's interface ----------------------------------------------------------------------
    def set_requires_gradient_sync(self, enabled: bool) -> None:
        # every micro-step is reduced (into the owner's partition); ``enabled`` marks the boundary,
        # where the accumulated partition becomes ``param.grad``. Arming here (the engine calls it in
        # forward and backward) keeps another engine's hooks on the same parameters silent.
        self._sync = enabled
        self._armed = bool(self._buckets)

    def after_backward(self) -> None:
        if self._armed:
            self._armed = False
            self._finish_reductions()
            if self._sync:
                self._expose()
        super().after_backward()

    def grad_group(self) -> dist.ProcessGroup | None:
        return self.group

    def grad_norm(self, params: list[torch.Tensor]) -> torch.Tensor:
        """The 2-norm of all gradients: this rank's partition summed over the ranks, plus the all-reduced
        gradients of trainable parameters outside the optimizer (the same on every rank) once."""
        from flexspeed.runtime.precision import total_norm

        if group_size(self.group) == 1 or not self._owner:
            return total_norm([p.grad for p in params if p.grad is not None])
        own = [p.grad for p in params if p.grad is not None and self._owner.get(id(p)) is not None]
        shared = [p.grad for p in params if p.grad is not None and self._owner.get(id(p), -1) is None]
        sq = total_norm(own).float() ** 2 if own else torch.zeros((), device=_device(params))
        sq = sq.to(_device(params))
        dist.all_reduce(sq, group=self.group)
        if shared:
            sq = sq + total_norm(shared).float().to(sq.device) ** 2
        return sq.sqrt()

    def params_without_grad(self) -> list[str]:
        """Trainable parameters no rank produced a gradient for (a collective over the group at stage 2)."""
        if group_size(self.group) == 1 or not self._owner:
            return super().params_without_grad()
        me = group_rank(self.group)
        local = [self._names[id(p)] for p in _unique(self.module.parameters())
                 if id(p) in self._owner and self._owner[id(p)] in (me, None) and p.grad is None]
        gathered: list[Any] = [None] * group_size(self.group)
        dist.all_gather_object(gathered, local, group=self.group)
        return sorted(set().union(*gathered))

    # ---- reduction -----------------------------------------------------------------------------------
    def _on_grad(self, p: torch.Tensor) -> None:
        """A parameter's gradient is complete for this backward: copy it into its bucket, free it."""
        if not self._armed:
            return
        key = id(p)
        b = self._bucket_of.get(key)
        if b is None or b < self._next or p.grad is None:
            # a gradient after its bucket left (e.g. reentrant recomputation): it stays in p.grad and
            # is reduced after backward (see _finish_reductions)
            return
        gi, offset, index = self._slot[key]
        flat = self._buffers(b)[gi]
        with torch.no_grad():
            flat[offset:offset + p.numel()].add_(p.grad.detach().reshape(-1))  # add: a repeat sums
            flat[flat.numel() - len(self._groups[b][gi][1]) + index] = 1.0  # "used"
        p.grad = None
        if key in self._seen:
            return
        self._seen.add(key)
        self._ready[b] += 1
        while self._next < len(self._buckets) and self._ready[self._next] == len(self._buckets[self._next]):
            self._launch_bucket(self._next)
            self._next += 1

    def _buffers(self, b: int) -> list[torch.Tensor]:
        """Bucket ``b``'s send buffers, one per owner (gradients then used-flags), made on first use."""
        bufs = self._bufs.get(b)
        if bufs is None:
            bufs = []
            for _, params in self._groups[b]:
                dtype = self._comm_dtype or params[0].dtype
                bufs.append(torch.zeros(sum(p.numel() for p in params) + len(params), dtype=dtype,
                                        device=params[0].device))
            self._bufs[b] = bufs
        return bufs

    @torch.no_grad()
    def _launch_bucket(self, b: int) -> None:
        """Start bucket ``b``'s collectives (zeros and a 0 flag for what this rank did not produce)."""
        bufs = self._buffers(b)
        del self._bufs[b]
        for (owner, params), flat in zip(self._groups[b], bufs):
            self._send(owner, params, flat)
        self._bound_in_flight()

    @torch.no_grad()
    def _launch_late(self, params: list[torch.Tensor]) -> None:
        """Reduce the gradients still in ``p.grad`` (zeros where none), one collective per owner."""
        for owner, group_params in _by_owner(params, self._owner):
            grads = [p.grad.detach() if p.grad is not None else torch.zeros_like(p) for p in group_params]
            used = torch.tensor([float(p.grad is not None) for p in group_params], dtype=grads[0].dtype,
                                device=grads[0].device)
            flat = _flatten_dense_tensors(grads + [used])
            if self._comm_dtype is not None and self._comm_dtype != flat.dtype:
                flat = flat.to(self._comm_dtype)
            for p in group_params:
                p.grad = None
            self._send(owner, group_params, flat)
        self._bound_in_flight()

    def _send(self, owner: int | None, params: list[torch.Tensor], flat: torch.Tensor) -> None:
        if self._predivide != 1.0:
            flat.div_(self._predivide)
        if owner is None:
            work = dist.all_reduce(flat, group=self.group, async_op=True)
        else:
            dst = dist.get_global_rank(self.group, owner) if self.group is not None else owner
            work = dist.reduce(flat, dst=dst, group=self.group, async_op=True)
        self._pending.append(_Reduction(params, owner, flat, work))

    def _bound_in_flight(self) -> None:
        # at most about two buckets in flight: finish the oldest (the owner accumulates it, every rank
        # frees its buffer), so no rank holds a whole model's gradient in send buffers
        while len(self._pending) > 1 and sum(r.flat.numel() for r in self._pending) > 2 * self._bucket_elements:
            self._complete(self._pending.pop(0))

    @torch.no_grad()
    def _finish_reductions(self) -> None:
        """Launch what backward did not, in bucket order; reduce late gradients; accumulate on the owners."""
        while self._next < len(self._buckets):
            self._launch_bucket(self._next)
            self._next += 1
        tracked = [p for bucket in self._buckets for p in bucket]
        late = torch.tensor([float(any(p.grad is not None for p in tracked))], device=tracked[0].device)
        dist.all_reduce(late, op=dist.ReduceOp.MAX, group=self.group)
        if late.item() > 0:  # the same collective on every rank, whatever each rank holds
            self._launch_late(tracked)
        for r in self._pending:
            self._complete(r)
        if self.grad_accum_dtype is not None:
            for acc in self._acc.values():
                acc.copy_(acc.to(self.grad_accum_dtype))
        self._reset_micro_step()

    @torch.no_grad()
    def _complete(self, r: _Reduction) -> None:
        """Wait for one reduction; its owner (every rank for an all-reduce) adds it to the partition."""
        r.work.wait()
        if r.owner is not None and r.owner != group_rank(self.group):
            return
        flat = r.flat
        if self._average:
            flat = flat.float() if flat.dtype != torch.float32 else flat
            flat.mul_(self._predivide / group_size(self.group))
        *grads, used = _unflatten_dense_tensors(flat, [*r.params, torch.empty(len(r.params))])
        for p, g, n in zip(r.params, grads, used.tolist()):
            if n <= 0:
                continue
            g = g.to(p.dtype)
            acc = self._acc.get(id(p))
            self._acc[id(p)] = g.clone() if acc is None else acc.add_(g)

    def memory_breakdown(self, optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
        """Stage 1's count, plus the reduced partition held aside between accumulation micro-steps."""
        from flexspeed.runtime.zero import tensor_bytes

        out = super().memory_breakdown(optimizer)
        out["gradients"] += tensor_bytes(self._acc.values())
        return out

    def _expose(self) -> None:
        """On the boundary, the accumulated partition becomes ``param.grad`` (owners only)."""
        for bucket in self._buckets:
            for p in bucket:
                p.grad = self._acc.pop(id(p), None)
        self._acc.clear()


def _by_owner(params: list[torch.Tensor], owners: dict[int, int | None]
              ) -> list[tuple[int | None, list[torch.Tensor]]]:
    """``params`` grouped by owning rank (None, the all-reduced ones, first), each in the given order."""
    groups: dict[int | None, list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault(owners[id(p)], []).append(p)
    return [(o, groups[o]) for o in sorted(groups, key=lambda o: -1 if o is None else o)]


def _stepped_params(layout: list[tuple[int, list[torch.Tensor]]]) -> list[torch.Tensor]:
    return [t for _, tensors in layout for t in tensors]


def _unique(params: Any) -> list[torch.Tensor]:
    seen: set[int] = set()
    out = []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


def _buckets(params: list[torch.Tensor], cap: int) -> list[list[torch.Tensor]]:
    """Consecutive runs of ``params`` of one device and dtype, each up to ``cap`` elements (at least one)."""
    out: list[list[torch.Tensor]] = []
    size = 0
    for p in params:
        if out and size + p.numel() <= cap and (p.device, p.dtype) == (out[-1][0].device, out[-1][0].dtype):
            out[-1].append(p)
            size += p.numel()
        else:
            out.append([p])
            size = p.numel()
    return out


def _device(params: list[torch.Tensor]) -> torch.device:
    return params[0].device if params else torch.device("cpu")


def _make_hook(ref: weakref.ref):
    def hook(p: torch.Tensor) -> None:
        strategy = ref()
        if strategy is not None:
            strategy._on_grad(p)

    return hook
