"""Tensor-parallel training on ``torch.distributed.tensor.parallel`` (DeepSpeed's AutoTP training).

``apply_tensor_parallel(model, tp_mesh, plan=None)`` shards a model's transformer blocks over
the ranks of ``tp_mesh`` with PyTorch's DTensor parallel styles. Without a plan, one is derived
from the module tree by the same discovery inference TP uses
(:func:`flexspeed.distributed.tp_discovery.plan_tensor_parallel`: layer names, head counts, fused widths),
mapped to styles:

- a column layer (``q_proj k_proj v_proj gate_proj up_proj fc1 c_fc ...``) ->
  ``ColwiseParallel`` (an HF ``Conv1D``, whose weight is ``(in, out)``, shards dim 1);
- a row layer (``o_proj down_proj out_proj fc2 c_proj ...``) -> ``RowwiseParallel`` (its output
  all-reduced back to a replicated tensor; the bias stays whole);
- a fused column layer whose rows are ``[q | k | v]`` (nanoGPT's and GPT-2's ``c_attn``) ->
  :class:`PackedColwise`: each rank computes only its heads' rows of q, k and v; the weight stays
  whole (replicated over tp, a plain tensor) because no contiguous DTensor shard holds those rows
  and DCP cannot store a strided one; its gradient is summed over tp in backward;
- everything else (embeddings, norms, ``lm_head``) stays replicated: plain tensors whose
  gradients are equal on every tp rank (the column layers all-reduce their input gradient).

Attention modules get their per-rank head counts and widths (``num_heads``, ``n_head``,
``split_size``, a private copy of an HF ``config``'s counts...) the way torchtitan's
``parallelize`` divides ``n_heads`` by the tp degree; modules that derive their head size from the
input width (nanoGPT) get inference TP's narrowing hooks. Everything is validated before a
weight moves: tp must divide the heads, key/value heads and every split width (ConfigError
naming the module, the numbers and the fix).

For training, :func:`setup_tensor_parallel` builds a 2-D ``("dp", "tp")`` mesh, applies the plan
over ``tp`` and then ZeRO over ``dp``: stages 2-3 are FSDP2 ``fully_shard(mesh=dp_mesh)`` on the
TP'd module (torchtitan's order, 2-D DTensors), stages 0-1 are :class:`TensorParallelDP`
(gradients averaged over the dp group on accumulation boundaries; stage 1 also partitions the
optimizer state over dp, as :class:`~flexspeed.runtime.zero.ShardedOptimizerDP` does).
"""

from __future__ import annotations

import types
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import ColwiseParallel, ParallelStyle, RowwiseParallel, parallelize_module

from flexspeed.config.errors import ConfigError, did_you_mean
from flexspeed.distributed.tp_discovery import (
    QKV_NAMES,
    Placement,
    TensorParallelPlan,
    attention_shard,
    fused_pieces,
    is_conv1d,
    is_linear,
    linear_features,
    localize_attention,
    plan_tensor_parallel,
)
from flexspeed.runtime.zero import ShardedOptimizerDP, ZeroSettings, ZeroStrategy, check_offload

__all__ = ["TrainingTPPlan", "PackedColwise", "derive_tp_plan", "validate_tp_plan", "apply_tensor_parallel",
           "TensorParallelDP", "setup_tensor_parallel", "tp_model_init", "resolve_tp", "check_tp_dtype", "remap_params",
           "build_dp_tp_mesh"]

_KEY = "tensor_parallel.autotp_size"
_PLAN_HINT = ("Fix: choose a tensor_parallel.autotp_size that divides it, or give your own plan with "
              "flexspeed.tp_model_init(model, tp_size, dtype, plan={'module.name': 'colwise' | 'rowwise'})")


@dataclass
class TrainingTPPlan:
    """Module name -> ParallelStyle, plus the attention bookkeeping from the shared discovery."""

    tp_size: int
    styles: dict[str, ParallelStyle] = field(default_factory=dict)
    layout: TensorParallelPlan | None = None

    def describe(self) -> str:
        """One line for logs: how many layers of each style and the heads per rank."""
        kinds: dict[str, int] = {}
        for style in self.styles.values():
            kinds[type(style).__name__] = kinds.get(type(style).__name__, 0) + 1
        heads = ""
        if self.layout is not None and self.layout.attention:
            att = next(iter(self.layout.attention.values()))
            heads = f", {att.heads // self.tp_size}/{att.kv_heads // self.tp_size} (kv) heads per rank"
        return f"tp={self.tp_size}: " + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())) + heads


# ----------------------------------------------------------------------------------------- styles

class _ColwiseAny(ColwiseParallel):
    """``ColwiseParallel`` that also takes an HF ``Conv1D`` (weight ``(in, out)``: shard dim 1)."""

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        if not is_conv1d(module):
            return super()._apply(module, device_mesh)
        return distribute_module(module, device_mesh, partial(_partition, {"weight": Shard(1), "bias": Shard(0)},
                                                              self.src_data_rank),
                                 partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
                                 partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))


class _RowwiseAny(RowwiseParallel):
    """``RowwiseParallel`` that also takes an HF ``Conv1D`` (weight ``(in, out)``: shard dim 0)."""

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        if not is_conv1d(module):
            return super()._apply(module, device_mesh)
        self.desired_input_layouts = (Shard(-1),)
        return distribute_module(module, device_mesh, partial(_partition, {"weight": Shard(0), "bias": Replicate()},
                                                              self.src_data_rank),
                                 partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
                                 partial(self._prepare_output_fn, self.output_layouts, self.use_local_output))


def _partition(placements: dict, src_data_rank: int | None, name: str, module: nn.Module, mesh: Any) -> None:
    for pname, param in list(module.named_parameters(recurse=False)):
        dt = distribute_tensor(param, mesh, [placements[pname]], src_data_rank=src_data_rank)
        module.register_parameter(pname, nn.Parameter(dt, requires_grad=param.requires_grad))


class _SumGradOverTP(torch.autograd.Function):
    """Identity forward; backward sums the gradient over the tp group (Megatron's ``f``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class PackedColwise(ParallelStyle):
    """Column parallelism for a fused layer whose output rows are ``pieces`` concatenated (``[q | k | v]``).

    Rank ``r`` computes rows ``r/tp`` of every piece (its heads of q, k and v) from the whole
    weight, which stays a plain replicated tensor (so checkpoints keep the original layout); the
    weight's, bias's and input's gradients are summed over tp in backward.
    """

    def __init__(self, pieces: Iterable[int]) -> None:
        super().__init__()
        self.pieces = tuple(int(p) for p in pieces)
        self.src_data_rank = None

    def _apply(self, module: nn.Module, device_mesh: Any) -> nn.Module:
        tp, rank = device_mesh.size(), device_mesh.get_local_rank()
        rows = torch.cat([torch.arange(a, b) for a, b in Placement("shard", 0, self.pieces).ranges(rank, tp)])
        module.forward = types.MethodType(_packed_forward(rows, is_conv1d(module), device_mesh.get_group()), module)
        return module

    def __repr__(self) -> str:
        return f"PackedColwise(pieces={self.pieces})"


def _packed_forward(rows: torch.Tensor, conv1d: bool, group: dist.ProcessGroup):
    def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x = _SumGradOverTP.apply(x, group)
        w = _SumGradOverTP.apply(self.weight, group)
        b = _SumGradOverTP.apply(self.bias, group) if self.bias is not None else None
        idx = rows.to(w.device)
        if conv1d:  # as HF Conv1D: addmm(bias, x, w) with w (in, out)
            w = w.index_select(1, idx)
            out = torch.addmm(b.index_select(0, idx), x.reshape(-1, x.size(-1)), w) if b is not None \
                else x.reshape(-1, x.size(-1)) @ w
            return out.view(*x.shape[:-1], w.shape[1])  # (B, T, 3C/tp)
        return F.linear(x, w.index_select(0, idx), b.index_select(0, idx) if b is not None else None)
    return forward


def _column_style(module: nn.Module, pieces: tuple[int, ...]) -> ParallelStyle:
    return PackedColwise(pieces) if len(pieces) > 1 else _ColwiseAny()


# ----------------------------------------------------------------------------------------- planning

def _rekey(err: ConfigError) -> ConfigError:
    msg = str(err).split("] ", 1)[1] if err.key else str(err)
    msg = msg.replace("tp_size=", "autotp_size=").replace("or set autotp_size=1", "or set autotp_size to one of those")
    msg = msg.replace("set tp_size to", "set tensor_parallel.autotp_size to").replace(
        "with injection_policy", "with a plan: flexspeed.tp_model_init(model, tp_size, dtype, plan={...})")
    if "injection_policy" in msg or "cannot tell" in msg:
        msg += (". For training: make the module's views use -1 (or record head_dim/num_heads on it), or give a plan "
                "with flexspeed.tp_model_init(model, tp_size, dtype, plan={'module.name': 'colwise' | 'rowwise'})")
    return ConfigError(msg, key=_KEY if err.key in (None, "tensor_parallel.tp_size") else err.key)


def derive_tp_plan(model: nn.Module, tp_size: int) -> TrainingTPPlan:
    """The automatic plan for ``model`` at ``tp_size`` (see the module docstring); changes nothing.

    Raises:
        ConfigError: ``tp_size`` does not divide a head count or split width, or no layer can be planned.
    """
    try:
        layout = plan_tensor_parallel(model, tp_size)
    except ConfigError as e:
        raise _rekey(e) from None
    plan = TrainingTPPlan(tp_size=tp_size, layout=layout)
    modules = dict(model.named_modules())
    for name in layout.column:
        plan.styles[name] = _column_style(modules[name], layout.params[f"{name}.weight"].pieces)
    for name in layout.row:
        plan.styles[name] = _RowwiseAny()
    return plan


def validate_tp_plan(model: nn.Module, plan: Mapping[str, Any], tp: int) -> TrainingTPPlan:
    """Validate a user plan ``{module name: "colwise" | "rowwise" | ParallelStyle}`` for ``model`` at ``tp``.

    A ``"colwise"`` layer the shared discovery knows as fused (``c_attn``-style ``[q | k | v]``,
    ``gate_up_proj``) becomes :class:`PackedColwise`, so a plan cannot silently mix q with k.
    """
    modules = dict(model.named_modules())
    out = TrainingTPPlan(tp_size=tp, layout=TensorParallelPlan(tp_size=tp))
    kinds: dict[str, str] = {}
    for name, style in plan.items():
        key = f"plan[{name!r}]"
        if name not in modules or not name:
            raise ConfigError(f"the tensor-parallel plan names {name!r}, which is not a submodule of "
                              f"{type(model).__name__}.{did_you_mean(name, modules)} Fix: use names from "
                              "model.named_modules()", key=key)
        mod = modules[name]
        if isinstance(style, ParallelStyle):
            out.styles[name] = style
            continue
        kind = str(style).lower()
        if kind not in ("colwise", "rowwise") or not is_linear(mod):
            what = type(mod).__name__
            raise ConfigError(f"the plan gives {name!r} ({what}) the style {style!r}; a plan entry is 'colwise' or "
                              "'rowwise' on an nn.Linear / HF Conv1D, or a torch ParallelStyle object", key=key)
        n_in, n_out = linear_features(mod)
        width = n_out if kind == "colwise" else n_in
        if width % tp:
            raise ConfigError(f"{name} ({type(mod).__name__}) has {width} {'output' if kind == 'colwise' else 'input'} "
                              f"features, which autotp_size={tp} does not divide. {_PLAN_HINT}", key=_KEY)
        kinds[name] = kind
        (out.layout.column if kind == "colwise" else out.layout.row).append(name)
    by_parent: dict[str, dict[str, nn.Module]] = {}
    for c in out.layout.column:
        parent, _, leaf = c.rpartition(".")
        by_parent.setdefault(parent, {})[leaf] = modules[c]
    for parent, children in by_parent.items():
        if any(leaf in QKV_NAMES for leaf in children):
            try:
                out.layout.attention[parent] = attention_shard(parent, modules[parent], children, tp)
            except ConfigError as e:
                raise _rekey(e) from None
    for name, kind in kinds.items():
        if kind == "rowwise":
            out.styles[name] = _RowwiseAny()
            continue
        parent, _, leaf = name.rpartition(".")
        pieces = fused_pieces(leaf, linear_features(modules[name])[1], out.layout.attention.get(parent))
        if any(p % tp for p in pieces):
            raise ConfigError(f"{name} is a fused layer of widths {pieces}, which autotp_size={tp} does not all "
                              f"divide. {_PLAN_HINT}", key=_KEY)
        out.styles[name] = _column_style(modules[name], pieces)
    return out


def apply_tensor_parallel(model: nn.Module, tp_mesh: Any, plan: Mapping[str, Any] | None = None) -> TrainingTPPlan:
    """Shard ``model`` in place over the 1-D ``tp_mesh`` for training; return the plan applied.

    Args:
        model: the model with its full weights (any values: tp rank 0's are taken).
        tp_mesh: a 1-D DeviceMesh (e.g. ``mesh["tp"]`` of a ``("dp", "tp")`` mesh).
        plan: ``None`` (derive one) or ``{module name: "colwise" | "rowwise" | ParallelStyle}``.
    Returns:
        the :class:`TrainingTPPlan` (its ``describe()`` is a log line).
    Raises:
        ConfigError: the plan cannot be derived or is invalid; raised before any weight moves.
    """
    tp = tp_mesh.size()
    tplan = derive_tp_plan(model, tp) if plan is None else validate_tp_plan(model, plan, tp)
    if tp == 1:
        return tplan
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise ConfigError("this model already holds DTensor parameters (tensor parallelism or FSDP was applied "
                          "before). Fix: build a fresh model for each engine", key=_KEY)
    if any(p.is_meta for p in model.parameters()):
        raise ConfigError("tensor-parallel training needs the model's weights, and this one is on the meta device "
                          "(flexspeed.zero.Init). Fix: build the model without zero.Init when autotp_size > 1",
                          key=_KEY)
    from flexspeed.distributed.collectives import broadcast_

    group = tp_mesh.get_group()
    broadcast_([t for t in (*model.parameters(), *model.buffers())], group, group_src=0)  # tp rank 0's weights
    if tplan.layout is not None:
        localize_attention(model, tplan.layout)
        tplan.layout.attach(model, group, all_reduce_rows=False)  # nanoGPT narrowing, before the style hooks
    for style in tplan.styles.values():
        style.src_data_rank = None  # every rank holds the same full weights: slice locally
    parallelize_module(model, tp_mesh, tplan.styles)
    return tplan


# ----------------------------------------------------------------------------------------- meshes

def build_dp_tp_mesh(world_size: int, tp_size: int, device_type: str) -> Any:
    """The job's ``ParallelDims`` mesh, ``("dp", "pp", "tp")`` with ``pp = 1``: tp ranks adjacent
    (``rank = dp_index * tp + tp_index``); ``mesh["dp"]`` and ``mesh["tp"]`` are its slices."""
    from flexspeed.distributed.parallel_dims import ParallelDims

    if tp_size < 1 or world_size % tp_size:
        ok = [t for t in range(1, world_size + 1) if world_size % t == 0]
        raise ConfigError(f"tensor_parallel.autotp_size={tp_size} does not divide the world size {world_size}. Fix: "
                          f"use one of {ok}, or launch a multiple of {tp_size} processes", key=_KEY)
    return ParallelDims.from_world(world_size, tp=tp_size, tp_source=f"{_KEY}={tp_size}").build_mesh(device_type)


# ----------------------------------------------------------------------------------------- ZeRO 0-1

def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


class TensorParallelDP(ShardedOptimizerDP):
    """ZeRO stages 0-1 over the dp group of a TP'd model (DDP does not take DTensor parameters).

    Gradients accumulate locally and are averaged over dp on each accumulation boundary, one flat
    buffer per dtype (``communication_data_type`` on the wire); a parameter no rank produced a
    gradient for keeps ``grad=None`` (as DDP with ``find_unused_parameters``). Stage 1 partitions
    the optimizer state over dp exactly as :class:`ShardedOptimizerDP`.
    """

    def __init__(self, module: nn.Module, *, stage: int, group: dist.ProcessGroup, settings: ZeroSettings,
                 notes: list[str] | None = None) -> None:
        ZeroStrategy.__init__(self, stage=stage, module=module, model=module, group=group, notes=list(notes or []),
                              grad_accum_dtype=settings.grad_accum_dtype)
        self._layout, self._foreign, self._local_steps = [], [], False
        self._sync = True
        self._comm_dtype = settings.comm_dtype
        self._predivide = settings.predivide
        from flexspeed.runtime.zero import sync_initial_state

        sync_initial_state(module, group)

    def set_requires_gradient_sync(self, enabled: bool) -> None:
        self._sync = enabled

    def after_backward(self) -> None:
        if self._sync and dist.get_world_size(self.group) > 1:
            self._average_grads()
        ZeroStrategy.after_backward(self)

    def build_optimizer(self, client: torch.optim.Optimizer | None, factory: Any,
                        allow_untested: bool = False) -> torch.optim.Optimizer | None:
        from flexspeed.runtime.fsdp import no_foreach_across_kinds

        if self.stage == 1:
            optimizer = ShardedOptimizerDP.build_optimizer(self, client, factory, allow_untested)
        else:
            optimizer = ZeroStrategy.build_optimizer(self, client, factory, allow_untested)
        if optimizer is not None:
            no_foreach_across_kinds(optimizer)
        return optimizer

    def grad_group(self) -> dist.ProcessGroup | None:
        return None  # tp shards differ: an overflow anywhere must skip the step everywhere

    @torch.no_grad()
    def _average_grads(self) -> None:
        params = [p for p in self.module.parameters() if p.requires_grad]
        if not params:
            return
        world = dist.get_world_size(self.group)
        grads = [_local(p.grad) if p.grad is not None else torch.zeros_like(_local(p)) for p in params]
        present = torch.tensor([float(p.grad is not None) for p in params], dtype=grads[0].dtype,
                               device=grads[0].device)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for i, g in enumerate(grads):
            by_dtype.setdefault(g.dtype, []).append(i)
        used = torch.zeros_like(present)
        for k, (dtype, idx) in enumerate(by_dtype.items()):
            chunk = [grads[i] for i in idx] + ([present] if k == 0 else [])
            flat = _flatten_dense_tensors([c.to(dtype) for c in chunk])
            wire = flat.to(self._comm_dtype) if self._comm_dtype not in (None, flat.dtype) else flat
            wire.div_(self._predivide)
            dist.all_reduce(wire, group=self.group)
            wire.mul_(self._predivide / world)
            out = _unflatten_dense_tensors(wire.to(dtype), chunk)
            if k == 0:
                used = out[-1] * world
            for i, new in zip(idx, out):
                grads[i].copy_(new)
        for p, g, u in zip(params, grads, used.tolist()):
            if p.grad is None and u > 0:
                p.grad = DTensor.from_local(g, p.device_mesh, p.placements) if isinstance(p, DTensor) else g


# ----------------------------------------------------------------------------------------- initialize

_RECORDED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class _TPRequest:
    tp_size: int
    dtype: str
    plan: Mapping[str, Any] | None


def tp_model_init(model: nn.Module, tp_size: int, dtype: Any, config: str | dict | None = None,
                  **kwargs: Any) -> nn.Module:
    """DeepSpeed's ``tp_model_init``: record tensor-parallel arguments for ``initialize()``; shard nothing yet.

    As in DeepSpeed 0.19, sharding happens in ``flexspeed.initialize(model=...)``, where the config's
    ``tensor_parallel`` section is the canonical source: missing fields are filled from here and a
    different ``autotp_size`` or ``dtype`` is a ConfigError. Unlike DeepSpeed, no ``tp_group``/``mpu``
    is needed: flexspeed builds the ``("dp", "tp")`` mesh itself.

    Args:
        model: the model ``initialize()`` will receive.
        tp_size: the tensor-parallel degree.
        dtype: the compute dtype (``torch.bfloat16``, ``torch.float16``, ``torch.float32``); it must
            agree with the config's ``bf16``/``fp16`` sections.
        config: optional DeepSpeed config (path or dict) to check ``tensor_parallel.autotp_size`` against now.
        **kwargs: ``plan={module name: "colwise" | "rowwise" | ParallelStyle}`` (a flexspeed extension)
            replaces the automatic plan; DeepSpeed's ``tp_group`` is refused.
    Returns:
        ``model`` itself.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"tp_model_init(model=...) takes an nn.Module, got {type(model).__name__}")
    if isinstance(tp_size, bool) or not isinstance(tp_size, int) or tp_size < 1:
        raise ConfigError(f"tp_model_init(tp_size={tp_size!r}): give a positive integer", key="tp_size")
    from flexspeed.config.tensor_parallel import normalize_tp_dtype

    plan = kwargs.pop("plan", None)
    if kwargs.pop("tp_group", None) is not None:
        raise ConfigError("tp_model_init(tp_group=...) is not supported: flexspeed builds the tensor-parallel group "
                          "on a DeviceMesh from the world size and autotp_size. Fix: drop tp_group", key="tp_group")
    if kwargs:
        raise TypeError(f"tp_model_init() got unexpected keyword arguments {sorted(kwargs)}")
    request = _TPRequest(tp_size=tp_size, dtype=normalize_tp_dtype(dtype), plan=plan)
    if config is not None:
        from flexspeed.config import load_config

        _merge(load_config(config=config).get("tensor_parallel"), request)
    _RECORDED[model] = request
    return model


def _merge(section: Any, request: _TPRequest | None) -> tuple[int, Mapping[str, Any] | None, str | None]:
    """(tp size, plan, dtype) from the raw ``tensor_parallel`` section and a ``tp_model_init`` record."""
    from flexspeed.config.tensor_parallel import TensorParallelConfig, normalize_tp_dtype

    section = section if isinstance(section, Mapping) else {}
    size = section.get("autotp_size")
    if request is None:
        return (int(size) if isinstance(size, int) and not isinstance(size, bool) and size > 1 else 1), None, None
    cfg = TensorParallelConfig.model_validate(section) if section else None
    if size is not None and cfg is not None and cfg.size != request.tp_size:
        raise ConfigError(f"tensor_parallel.autotp_size={size} in the config differs from tp_model_init(tp_size="
                          f"{request.tp_size}). Fix: make them equal, or drop one", key=_KEY)
    if "dtype" in section and normalize_tp_dtype(section["dtype"]) != request.dtype:
        raise ConfigError(f"tensor_parallel.dtype={section['dtype']!r} differs from tp_model_init(dtype="
                          f"{request.dtype}). Fix: make them equal, or drop one", key="tensor_parallel.dtype")
    return request.tp_size, request.plan, request.dtype


def resolve_tp(raw: Mapping[str, Any], model: nn.Module | None,
               world_size: int) -> tuple[int, Mapping[str, Any] | None, str | None]:
    """The tp degree (1 = off), user plan and ``tp_model_init`` dtype for ``initialize()``, from the raw config.

    Raises:
        ConfigError: the degree does not divide ``world_size``, or config and ``tp_model_init`` disagree.
    """
    tp, plan, dtype = _merge(raw.get("tensor_parallel"), _RECORDED.get(model) if model is not None else None)
    if world_size % tp:
        ok = [t for t in range(1, world_size + 1) if world_size % t == 0]
        raise ConfigError(f"tensor_parallel.autotp_size={tp} does not divide the world size {world_size}. Fix: use "
                          f"one of {ok}, or launch a multiple of {tp} processes", key=_KEY)
    return tp, plan, dtype


def check_tp_dtype(dtype: str | None, precision: str) -> None:
    """Raise a ConfigError when ``tp_model_init``'s ``dtype`` is not the config's ``precision`` (None: nothing to check)."""
    if dtype is not None and dtype != precision:
        raise ConfigError(f"tp_model_init(dtype={dtype}) but the config trains in {precision}. Fix: enable "
                          f'"{dtype}" in the config ({{"{dtype}": {{"enabled": true}}}}, none for fp32) or pass '
                          f"dtype=torch.{ {'fp32': 'float32', 'bf16': 'bfloat16', 'fp16': 'float16'}[precision]}",
                          key="tensor_parallel.dtype")


def setup_tensor_parallel(model: nn.Module, *, config: Any, device: torch.device, tp_size: int,
                          plan: Mapping[str, Any] | None = None, dtype: str | None = None,
                          optimizer: Any = None, model_parameters: Any = None) -> tuple[ZeroStrategy, Any, Any]:
    """``initialize()``'s tensor-parallel path: 2-D mesh, TP over ``tp``, then ZeRO over ``dp``.

    Args:
        model: the model (on ``device``).
        config: the resolved ``FlexConfig`` (batch triad over the dp size).
        device: this rank's device.
        tp_size: the tp degree (> 1).
        plan: optional user plan (see :func:`apply_tensor_parallel`).
        dtype: ``tp_model_init``'s dtype, checked against the config's precision.
        optimizer: a client optimizer built on the model's parameters (re-pointed at the TP ones, in place).
        model_parameters: parameters or param groups (re-pointed likewise).
    Returns:
        ``(strategy, optimizer, model_parameters)``.
    """
    check_tp_dtype(dtype, config.precision)
    # validate everything a user can get wrong before a collective runs or a weight moves
    probe = derive_tp_plan(model, tp_size) if plan is None else validate_tp_plan(model, plan, tp_size)
    settings = ZeroSettings.from_config(config)
    notes: list[str] = []
    check_offload(settings, device, notes)
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer) and not callable(optimizer):
        optimizer = None
    if isinstance(optimizer, torch.optim.Optimizer) and optimizer.state:
        raise ConfigError("the optimizer passed to initialize() already has state, and tensor parallelism replaces "
                          "the parameters it refers to. Fix: pass a fresh optimizer (or a callable params -> "
                          "optimizer)", key=_KEY)
    mesh = build_dp_tp_mesh(dist.get_world_size(), tp_size, device.type)
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    applied = apply_tensor_parallel(model, mesh["tp"], plan)
    assert applied.styles.keys() == probe.styles.keys()
    after = dict(model.named_parameters(remove_duplicate=False))
    remap = {i: after[n] for i, n in names.items()}
    if isinstance(optimizer, torch.optim.Optimizer):
        for group in optimizer.param_groups:
            group["params"] = [remap.get(id(p), p) for p in group["params"]]
    if model_parameters is not None:
        model_parameters = remap_params(model_parameters, remap)
    dp_mesh = mesh["dp"]
    if settings.stage >= 2:
        from flexspeed.runtime.zero import apply_zero

        strategy = apply_zero(model, config=config, device=device, group=dp_mesh.get_group(), mesh=dp_mesh)
    else:
        strategy = TensorParallelDP(model, stage=settings.stage, group=dp_mesh.get_group(), settings=settings,
                                    notes=notes)
    strategy.notes.append(f"tensor parallelism {applied.describe()} over a (dp={dp_mesh.size()}, tp={tp_size}) mesh")
    return strategy, optimizer, model_parameters


def remap_params(params: Any, remap: dict[int, torch.Tensor]) -> list:
    """``params`` (tensors or param-group dicts) with each tensor replaced by ``remap[id(tensor)]`` where present."""
    out = []
    for item in params:
        if isinstance(item, dict):
            ps = [item["params"]] if torch.is_tensor(item["params"]) else list(item["params"])
            out.append({**item, "params": [remap.get(id(p), p) for p in ps]})
        else:
            out.append(remap.get(id(item), item))
    return out
