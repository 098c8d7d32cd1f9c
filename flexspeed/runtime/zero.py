"""ZeRO stages as strategies over PyTorch's own data-parallel machinery.

``apply_zero(module, config=..., device=...)`` wraps the user's module and returns a
``ZeroStrategy``: the module to call, the parameters whose gradients the engine post-processes,
how to switch gradient synchronisation off for non-boundary micro-steps, how to build the
optimizer over the (possibly re-registered) parameters, and a per-rank memory breakdown. The
engine knows nothing else about sharding.

- stage 0: ``DistributedDataParallel`` (plain module at world size 1); with
  ``ignore_unused_parameters`` (DeepSpeed's default) it looks for parameters a forward did not reach.
- stage 1: DDP all-reduces gradients; each rank keeps optimizer state for, and updates, only
  its own partition of the parameters, then every owner broadcasts what it updated
  (:class:`ShardedOptimizerDP`). The optimizer object stays the caller's own.
- stage 2: stage 1's partition plus gradient partitioning, full parameters in the module
  (:mod:`flexspeed.runtime.zero2`; FSDP2 with CPU offload on an accelerator).
- stage 3: FSDP2 ``fully_shard`` (see :mod:`flexspeed.runtime.fsdp`).

Gradients are produced, accumulated and reduced in fp32 at every stage (flexspeed computes in
16 bits under autocast over fp32 master weights). ``data_types.grad_accum_dtype`` "bf16"/"fp16"
reproduces 16-bit accumulation numerics by rounding the accumulated gradient after every
micro-step; it does not save memory.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from flexspeed.config.errors import ConfigError
from flexspeed.distributed.heartbeat import note
from flexspeed.utils.logging import warn_once  # re-exported (``__all__``): the engine's notes use it

if TYPE_CHECKING:
    from flexspeed.config.schema import FlexConfig

__all__ = ["ZeroStrategy", "DataParallel", "ShardedOptimizerDP", "ZeroSettings", "apply_zero", "OptimizerFactory",
           "tensor_bytes", "partition_params", "check_shardable", "sync_initial_state", "warn_once",
           "check_offload"]

OptimizerFactory = Callable[[list], torch.optim.Optimizer]

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_COMM_DTYPES = {**_DTYPES, None: None}


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes this rank holds for ``tensors`` (the local shard of a DTensor)."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if hasattr(t, "to_local") else t
        total += local.numel() * local.element_size()
    return total


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def group_size(group: dist.ProcessGroup | None) -> int:
    """Size of ``group`` (None: the world); 1 when torch.distributed is not initialized."""
    return dist.get_world_size(group) if dist.is_initialized() else 1


def group_rank(group: dist.ProcessGroup | None) -> int:
    """This process's rank in ``group`` (None: the world); 0 when torch.distributed is not initialized."""
    return dist.get_rank(group) if dist.is_initialized() else 0


def _unique_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    seen: set[int] = set()
    out = []
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def sync_initial_state(module: nn.Module, group: dist.ProcessGroup | None) -> None:
    """Every rank of ``group`` takes group rank 0's parameters and buffers, as DeepSpeed's engine does.

    Meta tensors (a model built under ``flexspeed.zero.Init``) are skipped: ``materialize_module``
    fills them from rank 0's random state. Stages 0-1 get the same from DDP's construction.
    """
    if group_size(group) == 1:
        return
    from flexspeed.distributed.collectives import broadcast_

    tensors = [t for t in (*module.parameters(), *module.buffers()) if not t.is_meta]
    broadcast_(tensors, group, group_src=0)


def check_shardable(optimizer: torch.optim.Optimizer, stage: int, allow_untested: bool) -> None:
    """Refuse an optimizer the sharded stages cannot drive, unless ``zero_allow_untested_optimizer``.

    Sharding needs per-parameter state keyed by the parameter, an independent update per tensor,
    and parameters without a gradient skipped: torch.optim's optimizers and flexspeed's own.
    """
    if stage < 1 or allow_untested:
        return
    from flexspeed.runtime.optimizers import is_supported_for_zero

    if is_supported_for_zero(optimizer):
        return
    cls = type(optimizer)
    raise ConfigError(
        f"zero_optimization.stage={stage} shards the optimizer, and {cls.__module__}.{cls.__qualname__} is not one "
        "flexspeed has tested sharded (torch.optim's optimizers except LBFGS/SparseAdam, and flexspeed's own: they "
        "keep state per parameter, update each tensor independently and skip parameters without a gradient). "
        "Fix: use one of those, or set \"zero_allow_untested_optimizer\": true if this optimizer has those "
        "properties", key="zero_allow_untested_optimizer")


@dataclass(frozen=True)
class ZeroSettings:
    """Everything ``apply_zero`` reads from the config, read in one place (:meth:`from_config`).

    The field defaults describe a plain data-parallel run for direct construction in tests; a
    real run takes every value from the ``FlexConfig``, whose schema holds the defaults.
    """

    stage: int = 0
    comm_dtype: torch.dtype | None = None  # communication_data_type; None = the gradient's dtype (fp32)
    param_dtype: torch.dtype | None = None  # stages 2-3: dtype of gathered parameters (bf16/fp16 runs)
    predivide: float = 1.0  # gradient_predivide_factor when prescale_gradients is on
    bucket_cap_mb: float | None = None  # stages 0/1: DDP bucket, from a non-default reduce_bucket_size
    reduce_bucket_size_set: bool = False
    reduce_bucket_elements: int = 500_000_000  # stage 3: bounds the blocks grouped in one FSDP2 unit
    prefetch_bucket_elements: int = 50_000_000  # stage 3: bounds them too (stage3_prefetch_bucket_size)
    grad_accum_dtype: torch.dtype | None = None  # None: exact fp32 accumulation
    offload_optimizer: str = "none"
    offload_param: str = "none"
    pin_memory: bool = False
    persistence_threshold: int = 0  # stage 3: parameters with fewer elements stay whole
    persistence_cap: int = 2**63 - 1  # stage 3: most elements kept whole in total
    prefetch_bucket_size: int | None = None  # stage 3, only when not the default
    max_live_parameters: int = 0  # stage 3: most elements gathered at once; 0 = reshard every block
    max_reuse_distance: int = 0  # stage 3: keep a block gathered if reused within this many elements
    allow_untested: bool = False
    ignore_unused_parameters: bool = True  # stages 0-1: DDP looks for parameters forward did not reach

    @classmethod
    def from_config(cls, config: FlexConfig) -> ZeroSettings:
        """Read a resolved ``FlexConfig`` (no ``"auto"`` left in the fields read here).

        Raises:
            ConfigError: a size still ``"auto"`` (a config that was not resolved against a model).
        """
        zc = config.zero_optimization
        explicit = {name for name in ("reduce_bucket_size", "stage3_prefetch_bucket_size") if _non_default(zc, name)}
        accum = _DTYPES[config.data_types.grad_accum_dtype or "fp32"]
        return cls(
            stage=zc.stage,
            comm_dtype=_COMM_DTYPES[config.communication_data_type],
            # 16-bit runs gather 16-bit parameters (half the bytes); master weights and optimizer
            # stay fp32 (stages 2-3 reduce bf16 gradients in bf16 unless comm_dtype says: fsdp._mp_policy)
            param_dtype=_DTYPES[config.precision] if config.precision != "fp32" else None,
            predivide=float(config.gradient_predivide_factor) if config.prescale_gradients else 1.0,
            bucket_cap_mb=_resolved(zc, "reduce_bucket_size") * 4 / 2**20 if "reduce_bucket_size" in explicit
            else None,
            reduce_bucket_size_set="reduce_bucket_size" in explicit,
            reduce_bucket_elements=_resolved(zc, "reduce_bucket_size"),
            prefetch_bucket_elements=_resolved(zc, "stage3_prefetch_bucket_size"),
            grad_accum_dtype=None if accum == torch.float32 else accum,
            offload_optimizer=zc.offload_optimizer.device if zc.offload_optimizer is not None else "none",
            offload_param=zc.offload_param.device if zc.offload_param is not None else "none",
            pin_memory=any(o is not None and o.pin_memory for o in (zc.offload_optimizer, zc.offload_param)),
            persistence_threshold=_resolved(zc, "stage3_param_persistence_threshold"),
            persistence_cap=zc.stage3_model_persistence_threshold,
            prefetch_bucket_size=_resolved(zc, "stage3_prefetch_bucket_size")
            if "stage3_prefetch_bucket_size" in explicit else None,
            max_live_parameters=zc.stage3_max_live_parameters,
            max_reuse_distance=zc.stage3_max_reuse_distance,
            allow_untested=config.zero_allow_untested_optimizer,
            ignore_unused_parameters=zc.ignore_unused_parameters,
        )


def _resolved(section: Any, name: str) -> int:
    """``section.name`` as an int; ``"auto"`` here means the config skipped resolution against a model."""
    value = getattr(section, name)
    if not _is_number(value):
        raise ConfigError(f"zero_optimization.{name}={value!r} was not resolved: \"auto\" sizes come from the "
                          "model's hidden size. Fix: build the config with flexspeed.config.build_config(..., "
                          "hidden_size=...) or set a number", key=f"zero_optimization.{name}")
    return int(value)


def _non_default(section: Any, name: str) -> bool:
    """Whether ``section.name`` differs from its schema default (resolved configs set every field)."""
    return getattr(section, name) != type(section).model_fields[name].default


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass
class ZeroStrategy:
    """Base class: what the engine needs from a ZeRO stage."""

    stage: int
    module: nn.Module  # the user's module (unwrapped)
    model: nn.Module  # what forward calls
    group: dist.ProcessGroup | None = None  # data-parallel group (None = world)
    notes: list[str] = field(default_factory=list)
    grad_accum_dtype: torch.dtype | None = None  # round accumulated gradients to this dtype (None = exact)

    def set_requires_gradient_sync(self, enabled: bool) -> None:
        """Turn gradient reduction on (boundary micro-step) or off (accumulating)."""

    def after_backward(self) -> None:
        """Hook after every ``backward``: finish reductions the wrapper does not do, round gradients."""
        if self.grad_accum_dtype is not None:
            self._round_grads(self.grad_accum_dtype)

    def build_optimizer(self, client: torch.optim.Optimizer | None, factory: OptimizerFactory | None,
                        allow_untested: bool = False) -> torch.optim.Optimizer | None:
        """The optimizer over this strategy's parameters: ``client`` as is, or ``factory(params)``."""
        if client is not None:
            check_shardable(client, self.stage, allow_untested)
            return client
        if factory is None:
            return None
        optimizer = factory(list(self.module.parameters()))
        check_shardable(optimizer, self.stage, allow_untested)
        return optimizer

    def map_params(self, params: Iterable) -> list:
        """``params`` (tensors or param-group dicts) re-pointed at the parameters the module holds now."""
        return list(params)

    def grad_params(self) -> list[torch.Tensor]:
        """Parameters whose gradients the engine unscales, checks and clips."""
        return [p for p in self.module.parameters() if p.requires_grad]

    def grad_group(self) -> dist.ProcessGroup | None:
        """Ranks over which gradients may differ after reduction (for the overflow flag)."""
        return None

    def grad_norm(self, params: list[torch.Tensor]) -> torch.Tensor:
        """The global gradient norm the engine reports and clips to (stage 2 sums its partitions)."""
        from flexspeed.runtime.precision import global_grad_norm

        return global_grad_norm(params)

    def params_without_grad(self) -> list[str]:
        """Names of trainable parameters without a gradient after this accumulation step, on any rank."""
        return [n for n, p in self.module.named_parameters() if p.requires_grad and p.grad is None]

    def after_step(self) -> None:
        """Hook after the optimizer step (e.g. re-broadcast updated partitions)."""

    @contextlib.contextmanager
    def local_optimizer_steps(self) -> Iterator[None]:
        """Inside, an ``optimizer.step()`` is this rank's alone: it starts no collective.

        torch's checkpoint helpers create missing optimizer state with a zero step on the ranks
        that have none - which need not be every rank - so such steps must not communicate.
        """
        yield

    def memory_breakdown(self, optimizer: torch.optim.Optimizer | None) -> dict[str, int]:
        """Per-rank bytes of parameters (local shards), gradients and optimizer state, right now.

        ``gathered_parameters`` counts full copies a sharded stage holds at this moment for compute
        (stage 2 from forward to the end of backward; stage 3 one block at a time).
        """
        params = list(self.module.parameters())
        opt_bytes = 0
        if optimizer is not None:
            for state in optimizer.state.values():
                opt_bytes += tensor_bytes(v for v in state.values() if torch.is_tensor(v) and v.dim() > 0)
        return {"parameters": tensor_bytes(params), "gradients": tensor_bytes(p.grad for p in params),
                "optimizer_states": opt_bytes, "gathered_parameters": 0}

    def memory_report(self, optimizer: torch.optim.Optimizer | None) -> str:
        """One log line of :meth:`memory_breakdown` in MiB (for ``"memory_breakdown": true``)."""
        mb = self.memory_breakdown(optimizer)
        parts = ", ".join(f"{k}={v / 2**20:.2f}MiB" for k, v in mb.items())
        return f"[flexspeed] rank {group_rank(None)} ZeRO-{self.stage} model states: {parts}"

    @torch.no_grad()
    def _round_grads(self, dtype: torch.dtype) -> None:
        for p in self.grad_params():
            if p.grad is not None:
                g = _local(p.grad)
                g.copy_(g.to(dtype))


def _comm_hook(comm_dtype: torch.dtype | None, predivide: float):
    """A DDP hook that reduces in ``comm_dtype`` and divides by ``predivide`` before the sum."""

    # No annotations on ``hook``: DDP checks them against the real classes, and this module's
    # ``from __future__ import annotations`` would turn them into strings.
    def hook(group, bucket):  # (ProcessGroup, GradBucket) -> Future[Tensor]
        buf = bucket.buffer()
        world = dist.get_world_size(group)
        send = buf.to(comm_dtype) if comm_dtype is not None and comm_dtype != buf.dtype else buf
        send.div_(predivide)
        fut = dist.all_reduce(send, group=group, async_op=True).get_future()

        def finish(f: torch.futures.Future) -> torch.Tensor:
            out = f.value()[0]
            buf.copy_(out.to(buf.dtype) if out is not buf else out)
            return buf.mul_(predivide / world)

        return fut.then(finish)

    return hook


class DataParallel(ZeroStrategy):
    """Stage 0: replicated everything, gradients all-reduced by DDP (in fp32 unless configured).

    ``find_unused_parameters`` (``zero_optimization.ignore_unused_parameters``) lets a forward leave
    parameters out, also differently on each rank: one no rank used keeps ``grad=None`` (the
    optimizer skips it, as in one process), one some rank used gets the average.
    """

    def __init__(self, module: nn.Module, *, device: torch.device, group: dist.ProcessGroup | None = None,
                 comm_dtype: torch.dtype | None = None, predivide: float = 1.0,
                 bucket_cap_mb: float | None = None, find_unused_parameters: bool = False,
                 grad_accum_dtype: torch.dtype | None = None) -> None:
        if group_size(group) > 1:
            kwargs = {"bucket_cap_mb": bucket_cap_mb} if bucket_cap_mb else {}
            model = nn.parallel.DistributedDataParallel(
                module, device_ids=[device.index] if device.type == "cuda" else None, process_group=group,
                find_unused_parameters=find_unused_parameters, **kwargs)
            if comm_dtype not in (None, torch.float32) or predivide != 1.0:
                model.register_comm_hook(group or dist.group.WORLD, _comm_hook(comm_dtype, predivide))
        else:
            model = module
        super().__init__(stage=0, module=module, model=model, group=group, grad_accum_dtype=grad_accum_dtype)

    def set_requires_gradient_sync(self, enabled: bool) -> None:
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            self.model.require_backward_grad_sync = enabled


def partition_params(params: list[torch.Tensor], world: int) -> list[int]:
    """The owning rank of each parameter: largest first onto the least-loaded rank (by bytes).

    Deterministic (ties go to the lower index and rank), so every rank computes the same map.
    """
    loads = [0] * world
    owners = [0] * len(params)
    for i in sorted(range(len(params)), key=lambda i: (-params[i].numel(), i)):
        r = min(range(world), key=lambda r: (loads[r], r))
        owners[i] = r
        loads[r] += params[i].numel() * params[i].element_size()
    return owners


class ShardedOptimizerDP(DataParallel):
    """Stage 1: DDP gradients, optimizer state sharded by parameter, updates broadcast by owners.

    The optimizer is the caller's own object with all its param groups (schedulers and
    ``get_lr`` see every group). Two optimizer step hooks make it sharded: before the step, the
    gradients of parameters another rank owns are dropped, so the optimizer neither creates state
    for them nor updates them (torch.optim and flexspeed's optimizers skip parameters without a
    gradient); after the step, every owner broadcasts its updated parameters in one flat buffer
    per dtype. Each owner runs exactly the update a single process would, so fp32 results match
    a single-process run bit for bit.
    """

    def __init__(self, module: nn.Module, **kwargs: Any) -> None:
        super().__init__(module, **kwargs)
        self.stage = 1
        self._layout: list[tuple[int, list[torch.Tensor]]] = []  # (owner rank, same-dtype tensors)
        self._foreign: list[torch.Tensor] = []
        self._local_steps = False

    def build_optimizer(self, client: torch.optim.Optimizer | None, factory: OptimizerFactory | None,
                        allow_untested: bool = False) -> torch.optim.Optimizer | None:
        optimizer = super().build_optimizer(client, factory, allow_untested)
        if optimizer is not None and group_size(self.group) > 1:
            self._shard(optimizer)
        return optimizer

    @contextlib.contextmanager
    def local_optimizer_steps(self) -> Iterator[None]:
        self._local_steps = True
        try:
            yield
        finally:
            self._local_steps = False

    def _shard(self, optimizer: torch.optim.Optimizer) -> None:
        world, rank = group_size(self.group), group_rank(self.group)
        # frozen parameters get no owner (DeepSpeed partitions trainable ones only), so they do
        # not unbalance the partition or leave a rank owning nothing that is ever stepped
        params = [p for p in _unique_params(optimizer) if p.requires_grad]
        owners = partition_params(params, world)
        self._foreign = [p for p, r in zip(params, owners) if r != rank]
        foreign_ids = {id(p) for p in self._foreign}
        for p in list(optimizer.state):  # state made at construction (e.g. Adagrad's sums)
            if id(p) in foreign_ids:
                del optimizer.state[p]
        self._layout = []
        for r in range(world):
            by_kind: dict[tuple, list[torch.Tensor]] = {}
            for p, owner in zip(params, owners):
                if owner == r:
                    by_kind.setdefault((p.device, p.dtype), []).append(p)
            self._layout += [(r, tensors) for tensors in by_kind.values()]
        optimizer.register_step_pre_hook(self._drop_foreign_grads)
        optimizer.register_step_post_hook(self._broadcast_updates)

    def _drop_foreign_grads(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for p in self._foreign:
            p.grad = None

    @torch.no_grad()
    def _broadcast_updates(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if self._local_steps:
            return
        note("ZeRO-1 broadcast of the updated parameter partitions (after the optimizer step)")
        rank = group_rank(self.group)
        pending = []
        for owner, tensors in self._layout:
            tensors = [_local(t) for t in tensors]  # tensor parallelism: this rank's DTensor shards
            if owner == rank:
                flat = _flatten_dense_tensors([t.detach() for t in tensors])
            else:
                flat = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=tensors[0].device)
            src = dist.get_global_rank(self.group, owner) if self.group is not None else owner
            work = dist.broadcast(flat, src=src, group=self.group, async_op=True)
            pending.append((owner, tensors, flat, work))
        for owner, tensors, flat, work in pending:
            work.wait()
            if owner != rank:
                for t, new in zip(tensors, _unflatten_dense_tensors(flat, tensors)):
                    t.copy_(new)


def check_offload(settings: ZeroSettings, device: torch.device, notes: list[str]) -> None:
    """nvme is refused; cpu offload at stage 1, or anywhere on a CPU-only run, is explained."""
    for key, where in (("offload_optimizer", settings.offload_optimizer), ("offload_param", settings.offload_param)):
        if where == "nvme":
            raise ConfigError(f'zero_optimization.{key}.device="nvme" is not supported yet by flexspeed. Fix: use '
                              '"cpu" (or "none")', key=f"zero_optimization.{key}.device")
        if where == "cpu" and key == "offload_param" and settings.stage < 3:
            raise ConfigError(f'zero_optimization.offload_param.device="cpu" needs stage 3, but stage is '
                              f'{settings.stage}. Fix: set "stage": 3 or remove offload_param',
                              key="zero_optimization.offload_param")
    wants = settings.offload_optimizer == "cpu" or settings.offload_param == "cpu"
    if not wants:
        return
    if device.type == "cpu":
        warn_once("zero_optimization offload to \"cpu\" has no effect here: parameters, gradients and optimizer "
                  "state already live in CPU memory", notes)
    elif settings.stage < 2:
        raise ConfigError(f'zero_optimization.offload_optimizer.device="cpu" on {device.type} is supported at '
                          f'stages 2 and 3 (FSDP2 CPUOffloadPolicy), and stage is {settings.stage}. Fix: set '
                          '"stage": 2', key="zero_optimization.offload_optimizer")


def apply_zero(module: nn.Module, *, config: FlexConfig, device: torch.device,
               group: dist.ProcessGroup | None = None, mesh: Any = None) -> ZeroStrategy:
    """Wrap ``module`` for ``config.zero_optimization.stage`` and return the strategy.

    Args:
        module: the model, on ``device`` - or on the meta device when built under ``flexspeed.zero.Init``
            (it is materialised here: as local shards at stage 3, whole at stages 0-2).
        config: the validated ``FlexConfig``.
        device: the device this rank computes on.
        group: the data-parallel process group (default: the world).
        mesh: the data-parallel ``DeviceMesh`` from ``ParallelDims.mesh("dp")`` (stages 2-3 shard over it, so
            FSDP2 composes with the other dimensions of the same root mesh); default: a mesh over ``group``.
    Returns:
        the ``ZeroStrategy`` the engine drives.
    """
    from flexspeed.zero import as_meta_placeholders

    as_meta_placeholders(module)  # zero.Init placeholders in DeepSpeed's 0-element form -> meta, full shape
    settings = ZeroSettings.from_config(config)
    notes: list[str] = []
    check_offload(settings, device, notes)
    grad_sum = getattr(config, "gradient_allreduce_op", "mean") == "sum"
    # stage 2 runs as DeepSpeed's (full parameters, partitioned gradients: flexspeed.runtime.zero2) except
    # with optimizer offload on an accelerator (FSDP2's CPUOffloadPolicy provides it) and over a
    # ``mesh`` (tensor or pipeline parallelism: the stage composes with the other mesh dimensions on FSDP2)
    offload = device.type != "cpu" and "cpu" in (settings.offload_optimizer, settings.offload_param)
    fsdp = settings.stage == 3 or (settings.stage == 2 and (offload or mesh is not None))
    if grad_sum and mesh is not None:
        raise ConfigError('gradient_allreduce_op="sum" is not supported with tensor or pipeline parallelism yet '
                          '(their data-parallel reduction averages). Fix: use "mean" (the default) and multiply the '
                          "learning rate by the data-parallel size", key="gradient_allreduce_op")
    from flexspeed.runtime.fsdp_reuse import AdoptedFullyShardedDP, is_fsdp_sharded

    if is_fsdp_sharded(module):  # a second initialize() on a model an earlier one sharded at stage 3
        return AdoptedFullyShardedDP(module, stage=settings.stage, device=device, group=group, settings=settings,
                                     notes=notes)
    if fsdp:
        from flexspeed.runtime.fsdp import FullyShardedDP

        if grad_sum:
            why = "" if settings.stage == 3 else "and optimizer offload "
            raise ConfigError(f'gradient_allreduce_op="sum" is not supported with ZeRO stage {settings.stage} '
                              f'{why}(FSDP2 averages). Fix: use "mean" and multiply the learning rate by the '
                              "data-parallel size", key="gradient_allreduce_op")
        if mesh is not None:
            group = mesh.get_group()
        return FullyShardedDP(module, stage=settings.stage, device=device, group=group, mesh=mesh,
                              settings=settings, notes=notes)
    if mesh is not None:
        group = mesh.get_group()
    if any(p.is_meta for p in module.parameters()):
        from flexspeed.zero import materialize_module

        materialize_module(module, device, group=group)
    if settings.stage == 2:
        from flexspeed.runtime.zero2 import PartitionedGradientsDP

        return PartitionedGradientsDP(module, group=group, settings=settings, grad_sum=grad_sum, notes=notes)
    cls = DataParallel if settings.stage == 0 else ShardedOptimizerDP
    strategy = cls(module, device=device, group=group, comm_dtype=None if grad_sum else settings.comm_dtype,
                   predivide=1.0 if grad_sum else settings.predivide, bucket_cap_mb=settings.bucket_cap_mb,
                   grad_accum_dtype=settings.grad_accum_dtype, find_unused_parameters=settings.ignore_unused_parameters)
    if grad_sum and isinstance(strategy.model, nn.parallel.DistributedDataParallel):
        from flexspeed.runtime.zero2 import sum_comm_hook

        strategy.model.register_comm_hook(group or dist.group.WORLD, sum_comm_hook(settings.comm_dtype))
    strategy.notes.extend(notes)
    return strategy
