"""Which layers of a model tensor parallelism splits, and how: the discovery shared by inference and training TP.

:func:`plan_tensor_parallel` reads the module tree (works on meta) and returns a rank-independent
:class:`TensorParallelPlan`: the column- and row-parallel layers, each parameter's
:class:`Placement` (fused ``[q | k | v]`` / ``[gate | up]`` widths cut piece by piece) and each
attention module's :class:`AttentionShard` (head counts, per-rank attribute values), all validated
against the tp degree before anything moves (ConfigError naming the module, the numbers and the
fix). Inference TP (:mod:`flexspeed.inference.tp`) shards local tensors from it; training TP
(:mod:`flexspeed.distributed.tensor_parallel`) maps it to DTensor parallel styles.

Detection rules (auto mode): for every module, its Linear children named like
``q_proj k_proj v_proj c_attn query_key_value qkv_proj Wqkv qkv gate_proj up_proj gate_up_proj
fc1 c_fc dense_h_to_4h w1 w3 fc_in`` are column-parallel and those named like ``o_proj out_proj
c_proj dense fc2 down_proj dense_4h_to_h w2 fc_out`` are row-parallel, but only when the module
has both kinds and a row layer's input width matches a column output. With an
``injection_policy`` only the named block classes are split: the listed children are
row-parallel and every other Linear inside the block is column-parallel.

Full-width shapes: after sharding, an attention module must compute with its local heads.
Attributes that hold the head count or the attention width (``n_head``, ``num_heads``,
``num_attention_heads``, ``num_key_value_heads``, ``embed_dim``, ``n_embd``, ``hidden_size``,
``split_size``, ``all_head_size``) are divided by ``tp_size``; ``head_dim`` stays. Modules
that record their head size (``head_dim``/``head_size``/``attention_head_size``, as HF models
do) derive every shape from it and need nothing more. A nanoGPT-style module derives the head
size from its *input* width (``B, T, C = x.shape; hs = C // n_head``) and reshapes its output to
``(B, T, C)``; for those a forward pre-hook hands the module a narrowed view ``x[..., :C/tp]``
(so ``C``, ``hs`` and the final ``view`` are the per-rank values) while a pre-hook on each of its
column-parallel children swaps the full input back in, so the projections still read all of
``x``. The hooks live in :mod:`flexspeed.distributed.tp_hooks`. See docs/inference.md.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn as nn

from flexspeed.config.errors import ConfigError
from flexspeed.distributed.tp_hooks import AlibiSlice, NarrowState, all_reduce_hook, planned_module

__all__ = [
    "COLUMN_NAMES", "ROW_NAMES", "QKV_NAMES", "BLOCK_QKV_NAMES", "FUSED_GATE_UP_NAMES",
    "is_linear", "is_conv1d", "linear_features", "Placement", "AttentionShard", "TensorParallelPlan",
    "find_layers", "attention_shard", "fused_pieces", "plan_tensor_parallel", "localize_attention",
]

COLUMN_NAMES = frozenset({
    "q_proj", "k_proj", "v_proj", "c_attn", "query_key_value", "qkv_proj", "Wqkv", "qkv",
    "gate_proj", "up_proj", "gate_up_proj", "fc1", "c_fc", "dense_h_to_4h", "w1", "w3", "fc_in",
})
ROW_NAMES = frozenset({"o_proj", "out_proj", "c_proj", "dense", "fc2", "down_proj", "dense_4h_to_h", "w2", "fc_out"})
QKV_NAMES = frozenset({"q_proj", "k_proj", "v_proj", "c_attn", "query_key_value", "qkv_proj", "Wqkv", "qkv",
                       "query", "key", "value", "q", "k", "v"})
BLOCK_QKV_NAMES = frozenset({"c_attn", "qkv_proj", "Wqkv", "qkv"})  # weight rows are [q | k | v]
FUSED_GATE_UP_NAMES = frozenset({"gate_up_proj"})  # weight rows are [gate | up]
_HEAD_ATTRS = ("num_heads", "n_head", "num_attention_heads", "n_heads")
_KV_HEAD_ATTRS = ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "n_kv_head")
_HEAD_SIZE_ATTRS = ("head_dim", "head_size", "attention_head_size")
_WIDTH_ATTRS = ("embed_dim", "n_embd", "hidden_size", "split_size", "all_head_size", "inner_dim")
_TP_KEY = "tensor_parallel.tp_size"


def is_linear(module: nn.Module) -> bool:
    """``nn.Linear`` or an HF ``Conv1D`` (a Linear with a transposed ``(in, out)`` weight)."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def is_conv1d(module: nn.Module) -> bool:
    """An HF ``Conv1D`` (a Linear whose weight is stored ``(in, out)``), recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear-like module."""
    w = module.weight
    return (w.shape[0], w.shape[1]) if is_conv1d(module) else (w.shape[1], w.shape[0])


@dataclass(frozen=True)
class Placement:
    """How one parameter is split over the TP ranks.

    ``kind="shard"``: along ``dim`` the tensor is a concatenation of fused ``pieces`` (one piece
    for a plain layer; ``(q, k, v)`` widths for a fused qkv); every piece is cut into ``tp``
    equal parts and rank ``r`` keeps part ``r`` of each, concatenated. ``kind="rank0"``: the
    bias of a row-parallel layer; rank 0 keeps it, the others hold zeros, so the all-reduce
    adds it exactly once.
    """

    kind: Literal["shard", "rank0"]
    dim: int = 0
    pieces: tuple[int, ...] = ()

    def ranges(self, rank: int, tp: int) -> list[tuple[int, int]]:
        """``[(start, stop), ...]`` along ``dim`` that ``rank`` keeps."""
        out, offset = [], 0
        for size in self.pieces:
            step = size // tp
            out.append((offset + rank * step, offset + (rank + 1) * step))
            offset += size
        return out

    def local_shape(self, full: torch.Size | tuple[int, ...], tp: int) -> tuple[int, ...]:
        """Shape of one rank's part of a tensor of shape ``full``."""
        if self.kind == "rank0":
            return tuple(full)
        shape = list(full)
        shape[self.dim] = sum(p // tp for p in self.pieces)
        return tuple(shape)


@dataclass
class AttentionShard:
    """Head bookkeeping of one attention module."""

    heads: int
    kv_heads: int
    head_dim: int
    narrow_input: bool
    """True for modules that derive shapes from their input width (nanoGPT style)."""
    full_width: int
    """Width of the hidden state the module receives."""
    attrs: dict[str, int] = field(default_factory=dict)
    """Attribute -> per-rank value set by :func:`shard_module`."""
    config_attrs: dict[str, int] = field(default_factory=dict)
    """Head counts set on the module's own copy of an HF ``config`` (some forwards read them there)."""
    alibi_arg: int | None = None
    """Position of an ``alibi`` argument (BLOOM) whose per-head slices must follow the heads, else None."""
    module_type: str = ""
    """Class name of the module planned (hooks are attached only while it is still that module)."""


@dataclass
class TensorParallelPlan:
    """What to split and how; independent of the rank (see :meth:`Placement.ranges`)."""

    tp_size: int
    column: list[str] = field(default_factory=list)
    row: list[str] = field(default_factory=list)
    params: dict[str, Placement] = field(default_factory=dict)
    attention: dict[str, AttentionShard] = field(default_factory=dict)
    reduce: Callable[[torch.Tensor], None] | None = field(default=None, repr=False)
    """The row-parallel hooks' in-place sum for CPU outputs (see :func:`all_reduce_hook`); ``None``:
    ``torch.distributed.all_reduce``. Set before :meth:`attach` (inference sets its shared-memory one)."""
    _handles: list[Any] = field(default_factory=list, repr=False)

    def describe(self) -> str:
        """A short human-readable summary (for logs)."""
        heads = {n: f"{a.heads}/{a.kv_heads} heads" for n, a in list(self.attention.items())[:2]}
        return (f"tp_size={self.tp_size}: {len(self.column)} column-parallel, {len(self.row)} row-parallel "
                f"layers, {len(self.attention)} attention modules {heads}")

    def attach(self, model: nn.Module, group: dist.ProcessGroup | None = None, *,
               all_reduce_rows: bool = True) -> None:
        """(Re)register the forward hooks on whatever modules now live at the planned names.

        Idempotent: call again after a pass that replaced modules (e.g. quantization).
        ``all_reduce_rows=False`` registers only the attention shape hooks (training's DTensor
        row-parallel layers reduce their own outputs).
        """
        self.detach()
        for name in self.row if all_reduce_rows else ():
            mod = planned_module(model, name, "row-parallel layer")
            self._handles.append(mod.register_forward_hook(all_reduce_hook(group, self.reduce)))
        rank = dist.get_rank(group) if self.attention else 0
        modules = dict(model.named_modules())
        for name, att in self.attention.items():
            # Shape fixes only concern the original attention module; a fused replacement (kernel
            # injection) reads its heads from the sharded weights and needs none.
            module = modules.get(name)
            if module is None or type(module).__name__ != att.module_type:
                continue
            if att.alibi_arg is not None:
                hook = AlibiSlice(att.alibi_arg, att.heads, att.heads // self.tp_size, rank)
                self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
            if not att.narrow_input:
                continue
            state = NarrowState(full=att.full_width, local=att.full_width // self.tp_size)
            self._handles.append(module.register_forward_pre_hook(state.narrow, with_kwargs=True))
            self._handles.append(module.register_forward_hook(state.clear))
            for col in self.column:
                if col.rpartition(".")[0] == name and col in modules:
                    self._handles.append(modules[col].register_forward_pre_hook(state.widen))

    def detach(self) -> None:
        """Remove the hooks this plan registered."""
        for h in self._handles:
            h.remove()
        self._handles.clear()



# ----------------------------------------------------------------------------------------- planning

def _policy_matches(module: nn.Module, policy: Mapping[Any, tuple[str, ...]]) -> tuple[str, ...] | None:
    for block, rows in policy.items():
        if (isinstance(block, type) and type(module) is block) or (
                isinstance(block, str) and block in (type(module).__name__, type(module).__qualname__)):
            return rows
    return None


def find_layers(model: nn.Module, policy: Mapping[Any, tuple[str, ...]] | None) -> tuple[list[str], list[str]]:
    """(column fqns, row fqns) by name (auto) or by ``injection_policy``."""
    cols: list[str] = []
    rows: list[str] = []
    if policy:
        matched = set()
        for bname, block in model.named_modules():
            row_names = _policy_matches(block, policy)
            if row_names is None:
                continue
            matched.add(type(block).__name__)
            prefix = f"{bname}." if bname else ""
            linears = [n for n, m in block.named_modules() if n and is_linear(m)]
            for r in row_names:
                if r not in linears:
                    raise ConfigError(
                        f"{type(block).__name__} has no Linear child {r!r}; its Linear children are {linears}",
                        key="injection_policy")
            rows += [prefix + r for r in row_names]
            cols += [prefix + n for n in linears if n not in row_names]
        wanted = {b if isinstance(b, str) else b.__name__ for b in policy}
        if not matched:
            raise ConfigError(f"no module of the classes {sorted(wanted)} is in the model; check the class "
                              "names", key="injection_policy")
        return cols, rows
    for pname, parent in model.named_modules():
        prefix = f"{pname}." if pname else ""
        lin = {n: c for n, c in parent.named_children() if is_linear(c)}
        c = [n for n in lin if n in COLUMN_NAMES]
        r = [n for n in lin if n in ROW_NAMES]
        if not c or not r:
            continue
        widths = {linear_features(lin[n])[1] for n in c}
        widths |= {w // k for n in c for k in (2, 3) for w in [linear_features(lin[n])[1]] if w % k == 0}
        if not all(linear_features(lin[n])[0] in widths for n in r):
            warnings.warn(f"tensor parallelism: {pname or type(model).__name__} has column-like {c} and row-like "
                          f"{r} layers whose widths do not match; left replicated", stacklevel=3)
            continue
        cols += [prefix + n for n in c]
        rows += [prefix + n for n in r]
    return cols, rows


def _int_attr(module: nn.Module, names: Iterable[str]) -> tuple[str, int] | None:
    for n in names:
        v = getattr(module, n, None)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return n, v
    return None


def attention_shard(name: str, module: nn.Module, children: dict[str, nn.Module], tp: int,
                     dims: Any = None) -> AttentionShard:
    """Head counts of one attention module, validated against ``tp``.

    ``dims``: the model's :class:`~flexspeed.inference.families.Dims` when its family is in the
    registry (its head counts are then read from the config, not guessed from attributes).
    """
    hd_attr = _int_attr(module, _HEAD_SIZE_ATTRS)
    h_attr = _int_attr(module, _HEAD_ATTRS)
    kv_attr = _int_attr(module, _KV_HEAD_ATTRS)
    if dims is not None:
        h_attr, kv_attr = ("", dims.n_heads), ("", dims.n_kv_heads)
    cfg = getattr(module, "config", None)
    q = next((children[n] for n in ("q_proj", "query", "q") if n in children), None)
    k = next((children[n] for n in ("k_proj", "key", "k") if n in children), None)
    hd = hd_attr[1] if hd_attr else (dims.head_dim if dims is not None else None)
    heads = h_attr[1] if h_attr else (linear_features(q)[1] // hd if q is not None and hd else None)
    heads = heads or getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    if not heads:
        raise ConfigError(f"cannot tell how many heads {name} ({type(module).__name__}) has: it has none of the "
                          f"attributes {_HEAD_ATTRS} or {_HEAD_SIZE_ATTRS} and its model is not a family flexspeed "
                          "knows (flexspeed.inference.families); rename the attribute holding the head count to one "
                          "of those (flexspeed then checks on meta tensors that the module can be split), pass "
                          "injection_policy={BlockClass: (row-parallel child names)}, or set tp_size=1",
                          key=_TP_KEY)
    kv = kv_attr[1] if kv_attr else (linear_features(k)[1] // hd if k is not None and hd else None)
    kv = kv or getattr(cfg, "num_key_value_heads", None) or heads
    in_width = linear_features(next(iter(children.values())))[0]
    if hd is None:
        if q is not None:
            hd = linear_features(q)[1] // heads
        else:
            fused = next((c for n, c in children.items() if n in BLOCK_QKV_NAMES | {"query_key_value"}), None)
            if fused is None:
                raise ConfigError(f"cannot tell the head size of {name} ({type(module).__name__}); give it a "
                                  "head_dim attribute, or set tp_size=1", key=_TP_KEY)
            hd = linear_features(fused)[1] // (heads + 2 * kv)
    if heads % tp or kv % tp:
        what = f"{heads} attention heads" + (f" and {kv} key/value heads" if kv != heads else "")
        ok = [t for t in range(1, heads + 1) if heads % t == 0 and kv % t == 0]
        raise ConfigError(f"tp_size={tp} must divide the {what} of {name} ({type(module).__name__}); "
                          f"use one of {ok}", key=_TP_KEY)
    attrs: dict[str, int] = {}
    for a in _HEAD_ATTRS:
        if getattr(module, a, None) == heads and not isinstance(getattr(module, a), bool):
            attrs[a] = heads // tp
    for a in _KV_HEAD_ATTRS:
        if getattr(module, a, None) == kv and not isinstance(getattr(module, a), bool):
            attrs[a] = kv // tp
    for a in _WIDTH_ATTRS:
        if getattr(module, a, None) == heads * hd and not isinstance(getattr(module, a), bool):
            attrs[a] = heads * hd // tp
    cfg_attrs = {a: n // tp for a, n in (("num_attention_heads", heads), ("num_key_value_heads", kv))
                 if getattr(cfg, a, None) == n}
    return AttentionShard(heads=heads, kv_heads=kv, head_dim=hd, narrow_input=hd_attr is None,
                          full_width=in_width, attrs=attrs, config_attrs=cfg_attrs, alibi_arg=_alibi_arg(module),
                          module_type=type(module).__name__)


def _alibi_arg(module: nn.Module) -> int | None:
    try:
        params = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return None
    return params.index("alibi") if "alibi" in params else None


def fused_pieces(leaf: str, out: int, att: AttentionShard | None) -> tuple[int, ...]:
    """The widths a column layer's output rows concatenate: ``(q, k, v)`` for a fused qkv, ``(gate, up)``
    for ``gate_up_proj``, else the whole width; each piece is cut into tp parts separately."""
    if leaf in BLOCK_QKV_NAMES and att is not None:
        q, kv = att.heads * att.head_dim, att.kv_heads * att.head_dim
        if q + 2 * kv == out:
            return (q, kv, kv)
    if leaf in BLOCK_QKV_NAMES and out % 3 == 0:
        return (out // 3,) * 3
    if leaf in FUSED_GATE_UP_NAMES and out % 2 == 0:
        return (out // 2, out // 2)
    return (out,)  # plain, or query_key_value whose rows are already grouped per head


def plan_tensor_parallel(model: nn.Module, tp_size: int,
                         injection_policy: Mapping[Any, tuple[str, ...]] | None = None) -> TensorParallelPlan:
    """Decide which layers to split and how, from the module structure alone (works on meta).

    Args:
        model: the model (any device, including meta).
        tp_size: number of TP ranks.
        injection_policy: optional ``{block class or name: (row-parallel child names)}``.
    Returns:
        the plan (empty for ``tp_size == 1``).
    Raises:
        ConfigError: ``tp_size`` does not divide the heads or a split width, no layer can be
            split, or the policy names something absent.
    """
    plan = TensorParallelPlan(tp_size=tp_size)
    if tp_size == 1:
        return plan
    cols, rows = find_layers(model, injection_policy)
    if not rows:
        raise ConfigError(f"found no Linear layers to split for tp_size={tp_size} in {type(model).__name__}: "
                          "none is named like q_proj/c_attn/fc1 (column) with o_proj/c_proj/fc2 (row) in the "
                          "same module. Pass injection_policy={BlockClass: ('attn.out', 'mlp.fc_out')}",
                          key=_TP_KEY)
    modules = dict(model.named_modules())
    from flexspeed.inference.families import family_for_model

    try:
        found = family_for_model(model)
    except ConfigError:
        found = None
    dims = found[1] if found is not None else None
    by_parent: dict[str, dict[str, nn.Module]] = {}
    for c in cols:
        parent, _, leaf = c.rpartition(".")
        by_parent.setdefault(parent, {})[leaf] = modules[c]
    for parent, children in by_parent.items():
        if any(leaf in QKV_NAMES for leaf in children):
            plan.attention[parent] = attention_shard(parent or type(model).__name__, modules[parent],
                                                      children, tp_size, dims)
    for c in cols:
        parent, _, leaf = c.rpartition(".")
        mod = modules[c]
        pieces = fused_pieces(leaf, linear_features(mod)[1], plan.attention.get(parent))
        _check_divisible(c, pieces, tp_size)
        plan.params[f"{c}.weight"] = Placement("shard", 1 if is_conv1d(mod) else 0, pieces)
        if getattr(mod, "bias", None) is not None:
            plan.params[f"{c}.bias"] = Placement("shard", 0, pieces)
    for r in rows:
        mod = modules[r]
        width = linear_features(mod)[0]
        _check_divisible(r, (width,), tp_size)
        plan.params[f"{r}.weight"] = Placement("shard", 0 if is_conv1d(mod) else 1, (width,))
        if getattr(mod, "bias", None) is not None:
            plan.params[f"{r}.bias"] = Placement("rank0")
    plan.column, plan.row = cols, rows
    for name, att in plan.attention.items():
        if att.narrow_input:
            _probe_attention(model, name, att, plan)
    return plan


_FIX = ("derive every width from the per-rank weights instead of the input: `-1` in view/reshape "
        "(`y.view(B, T, -1)`), split the fused projection by its own width (`qkv.split(qkv.shape[-1] // 3, dim=-1)`), "
        "give the module a `head_dim` attribute and reshape with it; or pass injection_policy={BlockClass: "
        "(row-parallel child names)} to split only what you name; or set tp_size=1")


def _probe_attention(model: nn.Module, name: str, att: AttentionShard, plan: TensorParallelPlan) -> None:
    """Run one attention module once on meta tensors with this rank's weight shapes (nothing moves).

    A module that derives widths from its input (``C = x.shape[-1]``) gets a narrowed view of it
    after sharding; whatever else it sizes from ``C`` (a LayerNorm over the full width, a constant
    ``split``) then fails inside torch at the first forward. Found here instead, before any weight
    is split, with the fix. Skipped where the unsharded module does not run on meta alone (it
    needs more arguments than the hidden state, say): that says nothing about sharding.
    """
    from torch.func import functional_call

    module = model.get_submodule(name)
    label = f"{name or type(model).__name__} ({type(module).__name__})"
    prefix = f"{name}." if name else ""
    tensors = dict(module.named_parameters(remove_duplicate=False))
    dtype = next((t.dtype for t in tensors.values() if t.is_floating_point()), torch.float32)
    x = torch.empty(2, 3, att.full_width, dtype=dtype, device="meta")
    full = {n: torch.empty_like(t, device="meta") for n, t in tensors.items()}
    try:
        want = functional_call(module, full, (x,))
    except Exception:  # noqa: BLE001 - the probe is inconclusive, not the model wrong
        return
    local = {n: torch.empty(plan.params[prefix + n].local_shape(t.shape, plan.tp_size), dtype=t.dtype, device="meta")
             if prefix + n in plan.params else full[n] for n, t in tensors.items()}
    saved = {a: getattr(module, a) for a in att.attrs}
    state = NarrowState(full=att.full_width, local=att.full_width // plan.tp_size)
    handles = [module.register_forward_pre_hook(state.narrow, with_kwargs=True), module.register_forward_hook(state.clear)]
    modules = dict(model.named_modules())
    for col in plan.column:
        if col.rpartition(".")[0] == name and col in modules:
            handles.append(modules[col].register_forward_pre_hook(state.widen))
    try:
        for a, v in att.attrs.items():
            setattr(module, a, v)
        try:
            got = functional_call(module, local, (x,))
        except Exception as exc:  # noqa: BLE001 - reported with the fix
            raise ConfigError(f"tensor parallelism cannot split {label} by its weights alone: with tp_size="
                              f"{plan.tp_size} (heads {att.heads} -> {att.heads // plan.tp_size} per rank, width "
                              f"{att.full_width} -> {att.full_width // plan.tp_size}) its forward fails: "
                              f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. The module "
                              f"derives widths from its input (`C = x.shape[-1]`); {_FIX}", key=_TP_KEY) from None
        finally:
            state.clear(module, (), None)
        shape_of = (lambda o: tuple(o.shape) if isinstance(o, torch.Tensor) else
                    tuple(o[0].shape) if isinstance(o, (tuple, list)) and o and isinstance(o[0], torch.Tensor) else None)
        if shape_of(got) != shape_of(want):
            raise ConfigError(f"tensor parallelism cannot split {label} by its weights alone: with tp_size="
                              f"{plan.tp_size} its output would be {shape_of(got)} instead of {shape_of(want)}. "
                              f"The module derives widths from its input (`C = x.shape[-1]`); {_FIX}", key=_TP_KEY)
    finally:
        for a, v in saved.items():
            setattr(module, a, v)
        for h in handles:
            h.remove()


def _check_divisible(name: str, pieces: tuple[int, ...], tp: int) -> None:
    bad = [p for p in pieces if p % tp]
    if bad:
        ok = [t for t in range(1, tp + 1) if all(p % t == 0 for p in pieces)]
        raise ConfigError(f"tp_size={tp} does not divide the width {bad[0]} of {name}. Fix: set tp_size to one of "
                          f"{ok} (or a larger divisor of {bad[0]}), or leave the layer unsplit with injection_policy",
                          key=_TP_KEY)


def localize_attention(model: nn.Module, plan: TensorParallelPlan) -> None:
    """Set each planned attention module's head counts and widths to their per-rank values.

    Shared by inference (local shards) and training (DTensor plans, ``flexspeed.distributed.tensor_parallel``).
    """
    for name, att in plan.attention.items():
        mod = model.get_submodule(name)
        for attr, value in att.attrs.items():
            setattr(mod, attr, value)
        if att.config_attrs:  # a private copy: the shared config keeps describing the whole model
            mod.config = copy.copy(mod.config)
            for attr, value in att.config_attrs.items():
                setattr(mod.config, attr, value)
