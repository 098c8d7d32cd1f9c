"""``flexspeed.zero``: build a model larger than one rank's memory, and gather sharded parameters.

``with flexspeed.zero.Init(): model = MyModel()`` builds the module with every parameter on
the meta device (no storage). ``flexspeed.initialize()`` then shards it (ZeRO stages 2-3),
allocates only this rank's shards and fills them, so the peak during construction is about one
shard plus the largest single module.

How weights are filled, deterministically: the CPU random state is captured when ``Init`` is
entered (or ``torch.manual_seed(seed)`` when ``seed=`` is given), then every module that owns
parameters, in ``named_modules()`` order, has its ``reset_parameters()`` run on a temporary full
copy of its own parameters (then ``param_init_fn(module)`` if given), and each rank keeps its
slice. The weights therefore do not depend on the world size, and equal the eagerly built
model's whenever that model's initialisation is its layers' ``reset_parameters`` in
construction order (``nn.Linear``, ``nn.Embedding``, ``nn.LayerNorm``, ...). Custom
initialisation done in a constructor (``self.apply(self._init_weights)``) runs on meta tensors
and has no effect: pass it as ``param_init_fn``. Buffers are built normally (they are small).

Arithmetic on a parameter while it has no values would be lost, so inside ``Init`` it raises at that
line, naming the parameter and the fix (:class:`_PlaceholderWriteGuard`): ``p.data = p.data + 1``,
``p.data.mul_(2)``, ``p += 1``, ``p.copy_(t)``, ``p[0] = v`` on a parameter built under ``Init`` (outside a
``GatheredParameters`` block). Value-free fills (``normal_``, ``uniform_``, ``zero_``, ``fill_``, and
``torch.nn.init``, which skips meta tensors) stay allowed: they are the initialisers ``reset_parameters`` /
``param_init_fn`` run again when ``initialize()`` fills the shards.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from flexspeed.utils.logging import warn_once

__all__ = ["Init", "GatheredParameters", "InitRecord", "materialize_module", "as_meta_placeholders",
           "ZeroParamStatus", "ZeroParamType"]


class ZeroParamType(Enum):
    """DeepSpeed's kinds of ZeRO-3 parameter (the values of ``param.ds_param_type`` there)."""

    NORMAL = 1  # a whole tensor, replicated
    PARTITIONED = 2  # this rank holds a partition
    REMOTE = 3  # on another device


class ZeroParamStatus(Enum):
    """DeepSpeed's states of a ZeRO-3 parameter (``param.ds_status``)."""

    AVAILABLE = 1  # whole on this rank
    NOT_AVAILABLE = 2  # partitioned
    INFLIGHT = 3  # being gathered


@dataclass(frozen=True)
class InitRecord:
    """How to fill the parameters of modules built under one ``Init`` context."""

    rng_state: torch.Tensor
    seed: int | None = None
    param_init_fn: Callable[[nn.Module], None] | None = None
    group: dist.ProcessGroup | None = None


_RECORDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ACTIVE: list[Init] = []
# Parameters built under Init are flexspeed's meta placeholders: they carry DeepSpeed's ds_* attributes and
# their owners [(module ref, name)]; module -> {name: this rank's flat 1/world chunk of the values a
# GatheredParameters(modifier_rank=...) block wrote} (DeepSpeed's ds_tensor), read by initialize()
_SHARDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_NEXT_ID = [0]


class Init:
    """Context manager: modules built inside get meta-device parameters, materialised sharded later.

    DeepSpeed's signature; flexspeed's extensions are keyword-only.

    Args:
        module: an already-built module to treat as if built here (accepted; it is sharded by
            ``initialize()`` either way, and its memory is already spent).
        data_parallel_group: the group ``initialize()`` should shard over (default: the world).
        mem_efficient_linear: accepted for compatibility; no effect.
        remote_device: ``None``/"cpu"; "nvme" is not supported yet.
        pin_memory: accepted for compatibility; no effect (see ``offload_param.pin_memory``).
        config_dict_or_path, config: accepted for compatibility; the config given to ``initialize()``
            decides the stage.
        enabled: ``False`` makes this a no-op (modules are built normally).
        dtype: must be ``None`` or ``torch.float32``: flexspeed keeps fp32 master weights and computes in
            16 bits under autocast (a 16-bit dtype is ignored with a warning).
        mpu: not supported (must be ``None``).
        seed: seed the parameter fill with ``torch.manual_seed(seed)`` instead of the random state
            at entry.
        param_init_fn: ``fn(module)`` run after ``reset_parameters()`` for every module owning
            parameters, on full temporary tensors of that module's own (non-recursive) parameters.
    """

    _empty_placeholders = False  # meta placeholders; the DeepSpeed face's Init uses 0-element ones

    def __init__(self, module: nn.Module | None = None, data_parallel_group: dist.ProcessGroup | None = None,
                 mem_efficient_linear: bool = True, remote_device: str | None = None, pin_memory: bool = False,
                 config_dict_or_path: Any = None, config: Any = None, enabled: bool = True,
                 dtype: torch.dtype | None = None, mpu: Any = None, *, seed: int | None = None,
                 param_init_fn: Callable[[nn.Module], None] | None = None) -> None:
        if mpu is not None:
            raise ValueError("zero.Init(mpu=...) is not supported: flexspeed builds its topology on DeviceMesh. "
                             "Fix: drop mpu= (pass data_parallel_group= if you shard over a subgroup)")
        if remote_device not in (None, "cpu", "none"):
            raise ValueError(f"zero.Init(remote_device={remote_device!r}) is not supported yet. Fix: use None or "
                             "\"cpu\" (offload is configured by zero_optimization.offload_param)")
        if dtype not in (None, torch.float32):
            warn_once(f"zero.Init(dtype={dtype}) is ignored: flexspeed keeps fp32 master weights and computes in "
                      "16 bits under autocast (set \"bf16\"/\"fp16\" in the config)")
        self.enabled = enabled
        self.seed = seed
        self.param_init_fn = param_init_fn
        self.group = data_parallel_group
        self._hook: Any = None
        self._record: InitRecord | None = None
        self._made: list[nn.Parameter] = []
        if module is not None and enabled:
            _RECORDS[module] = InitRecord(torch.get_rng_state(), seed, param_init_fn, data_parallel_group)

    def __enter__(self) -> Init:
        if not self.enabled or _ACTIVE:  # nested contexts: the outermost one records
            _ACTIVE.append(self)
            return self
        self._record = InitRecord(torch.get_rng_state(), self.seed, self.param_init_fn, self.group)
        _install_movable_placeholders()
        self._hook = nn.modules.module.register_module_parameter_registration_hook(self._on_parameter)
        self._guard = _PlaceholderWriteGuard()
        self._guard.__enter__()
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        _ACTIVE.pop()
        guard = getattr(self, "_guard", None)
        if guard is not None:
            self._guard = None
            guard.__exit__(None, None, None)
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        for p in self._made:  # DeepSpeed's form: a 0-element tensor on the parameter's device
            if _is_placeholder(p) and p.is_meta:
                _swap_in(p, _placeholder_data(p.ds_shape, p.dtype, p._fs_device, True))
                p._fs_empty = True
        self._made = []

    def _on_parameter(self, module: nn.Module, name: str, param: nn.Parameter | None) -> nn.Parameter | None:
        # Each parameter is created for real by its constructor (torch.empty: no pages touched) and
        # replaced here by a meta tensor, so buffers and other constructor-made tensors stay correct.
        if param is None:
            return None
        _RECORDS[module] = self._record
        if _is_placeholder(param):  # the same placeholder registered again (tied weights)
            param._fs_owners.append((weakref.ref(module), name))
            return None
        if param.is_meta:
            return None
        # meta while constructors run (their initialisers need the shape); DeepSpeed's form at exit
        placeholder = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=param.requires_grad)
        placeholder._fs_owners = [(weakref.ref(module), name)]
        placeholder._fs_device = param.device
        _set_ds_attributes(placeholder, param.shape, self.group, False)
        if self._empty_placeholders:
            self._made.append(placeholder)  # a strong reference until exit (swap_tensors refuses weakly held ones)
        return placeholder


# in-place methods that write no value derived from the tensor or from data (initialisers, metadata)
_VALUE_FREE = frozenset({"uniform_", "normal_", "zero_", "fill_", "random_", "bernoulli_", "exponential_",
                         "cauchy_", "log_normal_", "geometric_", "fill_diagonal_", "requires_grad_",
                         "share_memory_", "retain_grad", "resize_", "detach_"})
_WRITES = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__",
                     "__imod__", "__ipow__", "__imatmul__", "__iand__", "__ior__", "__ixor__", "__ilshift__",
                     "__irshift__"})


def _param_label(p: nn.Parameter) -> str:
    for ref, name in p._fs_owners:
        module = ref()
        if module is not None:
            return f"{type(module).__name__}.{name} (shape {tuple(p.ds_shape)})"
    return f"a parameter of shape {tuple(p.ds_shape)}"


class _PlaceholderWriteGuard(TorchFunctionMode):
    """Active inside ``Init``: a write of values into a parameter that has none yet (a placeholder, its ``.data``
    or a view of them) raises at that line instead of being lost when ``initialize()`` fills the parameter."""

    def __init__(self) -> None:
        super().__init__()
        self._aliases = WeakIdKeyDictionary()  # tensor -> the placeholder whose (absent) storage it shows

    def _placeholder(self, t: Any) -> nn.Parameter | None:
        if not isinstance(t, torch.Tensor):
            return None
        if _is_placeholder(t):
            return t
        p = self._aliases.get(t)
        return p if p is not None and _is_placeholder(p) else None

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        target = self._placeholder(args[0]) if args else None
        out_target = self._placeholder(kwargs.get("out"))
        if out_target is not None:
            self._refuse(out_target, f"{name}(..., out=<it>)")
        if target is not None:
            attr = getattr(getattr(func, "__self__", None), "__name__", "")
            if name == "__set__" and attr == "data":
                self._refuse(target, ".data = <a new value>")
            if name in _WRITES or (name.endswith("_") and not name.startswith("_") and name not in _VALUE_FREE):
                self._refuse(target, f"{name}()")
        result = func(*args, **kwargs)
        if target is not None and isinstance(result, torch.Tensor) and result is not target:
            attr = getattr(getattr(func, "__self__", None), "__name__", "")
            if (name == "__get__" and attr == "data") or result._is_view():
                self._aliases[result] = target
        return result

    @staticmethod
    def _refuse(p: nn.Parameter, what: str) -> None:
        raise RuntimeError(
            f"zero.Init: {what} on parameter {_param_label(p)} would be lost: a parameter built under zero.Init "
            "holds no values until flexspeed.initialize() (or deepspeed.initialize()) fills its shards by running "
            "reset_parameters() again. Fix: compute it in the module's reset_parameters(), or pass "
            "zero.Init(param_init_fn=fn) where fn(module) does it (it runs on whole temporary copies), or build "
            "this module outside zero.Init (or with zero.Init(enabled=False))")


def _find_record(module: nn.Module) -> InitRecord | None:
    for m in module.modules():
        record = _RECORDS.get(m)
        if record is not None:
            return record
    return None


# ---- placeholders: DeepSpeed's attributes, moves, and values written before initialize() ------------------
def _placeholder_data(shape: torch.Size, dtype: torch.dtype, device: torch.device, empty: bool) -> torch.Tensor:
    """A placeholder's storage-less value: meta with the full shape, or DeepSpeed's 0-element tensor on the device."""
    return torch.empty(0, dtype=dtype, device=device) if empty else torch.empty(shape, dtype=dtype, device="meta")


def _set_ds_attributes(p: nn.Parameter, shape: torch.Size, group: dist.ProcessGroup | None, empty: bool) -> None:
    """DeepSpeed's ZeRO-3 parameter attributes, which integrating code reads (``p.ds_numel``, ``p.ds_status``)."""
    p.ds_id = _NEXT_ID[0]
    _NEXT_ID[0] += 1
    p.ds_shape = torch.Size(shape)
    p.ds_numel = p.ds_shape.numel()
    p._fs_empty = empty
    p.ds_status = ZeroParamStatus.NOT_AVAILABLE
    p.ds_persist = False
    p.ds_tensor = None  # this rank's flat partition, once values were written (GatheredParameters)
    p.ds_process_group = group


def _is_placeholder(t: Any) -> bool:
    """A parameter built under Init that holds no values right now (not inside a GatheredParameters block)."""
    return (isinstance(t, torch.Tensor) and "_fs_owners" in t.__dict__
            and t.__dict__.get("ds_status") == ZeroParamStatus.NOT_AVAILABLE)


def as_meta_placeholders(module: nn.Module) -> None:
    """Turn DeepSpeed-style (0-element) placeholders of ``module`` into meta tensors of their full shape, the
    form ``initialize()`` shards and fills (called by ``apply_zero``)."""
    for p in module.parameters():
        if _is_placeholder(p) and not p.is_meta:
            _swap_in(p, torch.empty(p.ds_shape, dtype=p.dtype, device="meta"))
            p._fs_empty = False


def _swap_in(p: nn.Parameter, value: torch.Tensor) -> None:
    """Give parameter ``p`` the storage of ``value`` in place (same object: callers hold it), keeping its attributes
    (``.data =`` cannot move a tensor between meta and a real device)."""
    attrs = dict(p.__dict__)
    torch.utils.swap_tensors(p, nn.Parameter(value, requires_grad=p.requires_grad))
    p.__dict__.update(attrs)


_MOVABLE = [False]


def _install_movable_placeholders() -> None:
    """``module.cpu()``/``.to(device)`` keep placeholders as they are (DeepSpeed's partitioned parameters move
    with no data to copy; a meta tensor refuses the copy). Installed once; other tensors are untouched."""
    if _MOVABLE[0]:
        return
    original = nn.Module._apply

    def _apply(self: nn.Module, fn: Callable, *args: Any, **kwargs: Any) -> nn.Module:
        if getattr(fn, "_fs_keeps_placeholders", False):  # already wrapped by the parent module's call
            return original(self, fn, *args, **kwargs)

        def keep_placeholders(t: torch.Tensor) -> torch.Tensor:
            if _is_placeholder(t):
                try:
                    return fn(t)  # a dtype change applies to the placeholder
                except NotImplementedError:  # a device move: nothing to copy
                    return t
            return fn(t)

        keep_placeholders._fs_keeps_placeholders = True
        return original(self, keep_placeholders, *args, **kwargs)

    nn.Module._apply = _apply
    _MOVABLE[0] = True


def _group_of(p: nn.Parameter) -> dist.ProcessGroup | None:
    return getattr(p, "ds_process_group", None)


def _world_rank(group: dist.ProcessGroup | None) -> tuple[int, int]:
    if not dist.is_initialized():
        return 1, 0
    return dist.get_world_size(group), dist.get_rank(group)


def _chunk(full: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    """This rank's flat chunk of ``full`` (zero-padded to ``ceil(numel / world)``), a copy."""
    world, rank = _world_rank(group)
    size = -(-full.numel() // world)
    flat = full.detach().reshape(-1)
    out = torch.zeros(size, dtype=full.dtype)
    part = flat[rank * size:(rank + 1) * size]
    out[:part.numel()].copy_(part)
    return out


def _unchunk(chunk: torch.Tensor, shape: torch.Size, group: dist.ProcessGroup | None) -> torch.Tensor:
    """The whole tensor from every rank's chunk (an all-gather over ``group``)."""
    world, _ = _world_rank(group)
    if world == 1:
        return chunk[:shape.numel()].reshape(shape).clone()
    dev = _comm_device(group)
    parts = [torch.empty(chunk.numel(), dtype=chunk.dtype, device=dev) for _ in range(world)]
    dist.all_gather(parts, chunk.to(dev), group=group)
    return torch.cat(parts)[:shape.numel()].reshape(shape).cpu()


def _comm_device(group: dist.ProcessGroup | None) -> torch.device:
    """Where collectives over ``group`` take their tensors (NCCL-only groups need CUDA ones)."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _record_values(p: nn.Parameter, full: torch.Tensor) -> None:
    """Keep this rank's chunk of ``full`` as the value of placeholder ``p`` (for every module that owns it)."""
    chunk = _chunk(full, _group_of(p))
    p.ds_tensor = chunk
    for ref, name in p._fs_owners:
        module = ref()
        if module is not None:
            _SHARDS.setdefault(module, {})[name] = (chunk, p.ds_shape, _group_of(p))


def _fill_from_full(dst: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's part of ``full`` into ``dst`` (a DTensor shard or a whole tensor)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(dst, DTensor):
        local = distribute_tensor(full.to(dst.device), dst.device_mesh, dst.placements, src_data_rank=None)
        dst.to_local().copy_(local.to_local())
    else:
        dst.copy_(full)


def _init_module(module: nn.Module, name: str, param_init_fn: Callable[[nn.Module], None] | None) -> None:
    """Fill ``module``'s own parameters: from values written under Init (a ``GatheredParameters`` block
    with a modifier rank, e.g. a pretrained checkpoint), else by its initialisers on full CPU copies;
    either way this rank keeps its part."""
    own = {n: p for n, p in module._parameters.items() if p is not None}
    written = {n: v for n, v in _SHARDS.get(module, {}).items() if n in own}
    todo = [n for n in own if n not in written]
    if todo:
        _reset_into(module, name, own, todo, param_init_fn)
    with torch.no_grad():
        for n, (chunk, shape, group) in written.items():  # one whole tensor at a time
            _fill_from_full(own[n], _unchunk(chunk, shape, group).to(own[n].dtype))


def _reset_into(module: nn.Module, name: str, own: dict[str, nn.Parameter], todo: list[str],
                param_init_fn: Callable[[nn.Module], None] | None) -> None:
    reset = getattr(module, "reset_parameters", None) or getattr(module, "_reset_parameters", None)
    if reset is None and param_init_fn is None:
        raise ValueError(
            f"module {name or '<root>'} ({type(module).__name__}) owns parameters {sorted(todo)} built under "
            "zero.Init but has no reset_parameters() to fill them. Fix: add reset_parameters() to the class, "
            "pass zero.Init(param_init_fn=fn) with fn(module) initialising them, or write their values inside "
            "GatheredParameters(params, modifier_rank=0) before initialize()")
    temps = {n: nn.Parameter(torch.empty(p.shape, dtype=p.dtype), requires_grad=p.requires_grad)
             for n, p in own.items()}
    module._parameters.update(temps)
    try:
        with torch.no_grad():
            if reset is not None:
                reset()
            if param_init_fn is not None:
                param_init_fn(module)
    finally:
        module._parameters.update(own)
    with torch.no_grad():
        for n in todo:
            _fill_from_full(own[n], temps[n].detach())


def materialize_module(module: nn.Module, device: torch.device, record: InitRecord | None = None,
                       group: dist.ProcessGroup | None = None) -> None:
    """Allocate the meta parameters of ``module`` on ``device`` (only local shards) and fill them.

    Called by ``apply_zero`` after sharding; see the module docstring for how values are chosen.
    Buffers and non-meta parameters are moved to ``device`` unchanged. Every rank of ``group``
    (default: the world) fills from rank 0's random state, so the ranks agree on the weights
    whatever each one seeded.
    """
    record = record or _find_record(module)
    module._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t.to(device))
    with torch.random.fork_rng(devices=[]):
        if record is not None:
            torch.set_rng_state(record.rng_state)
            if record.seed is not None:
                torch.manual_seed(record.seed)
        _use_rank0_rng_state(group, device)
        init_fn = record.param_init_fn if record is not None else None
        for name, m in module.named_modules():
            if any(p is not None for p in m._parameters.values()):
                _init_module(m, name, init_fn)


def _use_rank0_rng_state(group: dist.ProcessGroup | None, device: torch.device) -> None:
    """Continue from rank 0's CPU random state (sent through ``device``: NCCL-only groups need it)."""
    if not dist.is_initialized() or dist.get_world_size(group) == 1:
        return
    from flexspeed.distributed.collectives import broadcast_

    state = torch.get_rng_state().to(device)
    broadcast_([state], group, group_src=0)
    torch.set_rng_state(state.cpu())


class GatheredParameters:
    """Context manager giving full copies of (possibly sharded) parameters.

    ``with GatheredParameters(params, modifier_rank=0) as full:`` - ``full`` is a list of whole
    tensors, one per parameter (the parameter itself when it is not sharded). Read them anywhere;
    to change weights, write into ``full`` on ``modifier_rank``: on exit its values are broadcast
    and every rank keeps its shard. Unlike DeepSpeed, a sharded parameter object does not itself
    turn whole inside the block (FSDP2 keeps it a DTensor): use the yielded tensors.

    Args:
        params: a parameter or an iterable of them.
        modifier_rank: the rank whose changes are kept; ``None`` = read-only (changes to a sharded
            parameter's copy are dropped; an in-place change of an unsharded one's is a ``RuntimeError``).
        fwd_module: accepted for compatibility; no effect.
        enabled: ``False`` yields the parameters unchanged and does nothing on exit.
    """

    def __init__(self, params: torch.Tensor | Iterable[torch.Tensor], modifier_rank: int | None = None,
                 fwd_module: nn.Module | None = None, enabled: bool = True) -> None:
        self.params = [params] if torch.is_tensor(params) else [p for p in params if p is not None]
        self.modifier_rank = modifier_rank
        self.enabled = enabled
        self.full: list[torch.Tensor] = []

    def __enter__(self) -> list[torch.Tensor]:
        from torch.distributed.tensor import DTensor

        if not self.enabled:
            return self.params
        holders = [p for p in self.params if _is_placeholder(p)]
        blank = [tuple(p.shape) for p in self.params if p.is_meta and not _is_placeholder(p)]
        blank += [tuple(p.ds_shape) for p in holders if p.ds_tensor is None and self.modifier_rank is None]
        if blank:  # reads would see no values and writes would be lost: say so
            raise RuntimeError(
                f"GatheredParameters got {len(blank)} parameter(s) with no storage yet (shapes {blank[:3]}): modules "
                "built under zero.Init() are filled when flexspeed.initialize() shards them (or by a "
                "GatheredParameters(..., modifier_rank=r) block writing their values first). Fix: gather "
                "engine.module's parameters after initialize(), write them with modifier_rank=0, or set initial "
                "values with zero.Init(param_init_fn=fn)")
        self._placeholders = holders
        self._devices = {id(p): p.device for p in holders}
        with torch.no_grad():
            for p in self._placeholders:  # whole in place, as DeepSpeed's are (HF loads into the parameter)
                written = p.ds_tensor is not None
                _swap_in(p, _unchunk(p.ds_tensor, p.ds_shape, _group_of(p)).to(p.dtype) if written
                         else torch.zeros(p.ds_shape, dtype=p.dtype))
                p.ds_status = ZeroParamStatus.AVAILABLE
            self.full = [p.full_tensor().detach() if isinstance(p, DTensor) else p.data for p in self.params]
        self._versions = [t._version for t in self.full]
        return self.full

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if not self.enabled:
            return
        try:
            if exc_type is None:
                self._check_or_publish()
        finally:
            for p in getattr(self, "_placeholders", []):  # back to a placeholder, whatever happened
                _swap_in(p, _placeholder_data(p.ds_shape, p.dtype, self._devices[id(p)], p._fs_empty))
                p.ds_status = ZeroParamStatus.NOT_AVAILABLE

    def _check_or_publish(self) -> None:
        from torch.distributed.tensor import DTensor

        if self.modifier_rank is None:
            # a sharded parameter's yielded tensor is a copy (changes are dropped); an unsharded one's is the
            # parameter's own storage, so a change there would reach this rank's weights only
            changed = [i for i, (p, t, v) in enumerate(zip(self.params, self.full, self._versions))
                       if not isinstance(p, DTensor) and t._version != v]
            if changed:
                raise RuntimeError(
                    f"in-place modification of gathered parameter(s) {changed} inside GatheredParameters with "
                    "modifier_rank=None (read-only): they are not sharded, so the change reached this rank's "
                    "weights only. Fix: pass modifier_rank=<the rank whose values every rank should keep>")
            return
        placeholders = {id(p) for p in self._placeholders}
        with torch.no_grad():
            for p, full in zip(self.params, self.full):
                if id(p) in placeholders:  # its storage now: `p.data = new` inside the block replaced the yielded one
                    full = p.detach()
                group = p.device_mesh.get_group() if isinstance(p, DTensor) else _group_of(p)
                if dist.is_initialized() and dist.get_world_size(group) > 1:
                    src = dist.get_global_rank(group, self.modifier_rank) if group is not None else self.modifier_rank
                    dev = _comm_device(group)
                    moved = full if full.device == dev else full.to(dev)
                    dist.broadcast(moved, src=src, group=group)
                    if moved is not full:
                        full.copy_(moved)
                if isinstance(p, DTensor):
                    _fill_from_full(p, full)
                elif id(p) in placeholders:
                    _record_values(p, full)
