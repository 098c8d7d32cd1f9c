"""``PipelineModule``: a model written as a flat list of layers, cut into pipeline stages.

Layers are given as ``LayerSpec`` (class + constructor arguments, built only on the rank that
owns the layer, so a model too large for one rank never exists whole), ``TiedLayerSpec`` (a
layer that shares weights with other positions, e.g. the input embedding and the LM head; its
copies on different stages receive the sum of their gradients), already built ``nn.Module``
objects, or plain callables (``lambda x: x.flatten(1)``).

Each owned layer is registered under its *global layer index*, so this rank's
``state_dict()`` keys are ``"<index>.<param>"`` - exactly the keys of
``nn.Sequential(*layers)`` for the same layers. That makes checkpoints independent of the
partition and lets ``to_sequential_state_dict()`` produce a plain state dict.

Building is lazy: it happens when the parameters are first needed (``parameters()``,
``state_dict()``, ``to()``, the engine), once the process group and the number of virtual
stages are known. ``partition_report()`` needs no process group.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from flexspeed.config.errors import ConfigError
from flexspeed.pipe.partition import partition_layers
from flexspeed.pipe.topology import PipeTopology, resolve_topology

__all__ = ["LayerSpec", "TiedLayerSpec", "PipelineModule", "StageModule", "export_sequential_state_dict"]

log = logging.getLogger("flexspeed")


class LayerSpec:
    """A layer to build later: ``typename(*module_args, **module_kwargs)``, only on its owner."""

    def __init__(self, typename: type, *module_args: Any, **module_kwargs: Any) -> None:
        if not isinstance(typename, type) or not issubclass(typename, nn.Module):
            raise TypeError(f"LayerSpec(typename={typename!r}): typename must be an nn.Module subclass, e.g. "
                            "LayerSpec(nn.Linear, 16, 16)")
        self.typename = typename
        self.module_args = module_args
        self.module_kwargs = module_kwargs

    def build(self) -> nn.Module:
        """Construct the layer."""
        return self.typename(*self.module_args, **self.module_kwargs)

    def __repr__(self) -> str:
        args = [repr(a) for a in self.module_args] + [f"{k}={v!r}" for k, v in self.module_kwargs.items()]
        return f"{type(self).__name__}({self.typename.__name__}{''.join(', ' + a for a in args)})"


class TiedLayerSpec(LayerSpec):
    """A layer whose ``tied_weight_attr`` parameter(s) are shared by every spec with the same ``key``.

    Positions with the same ``key`` on one rank share one module. Across stages, the tied
    parameters start equal (broadcast from the lowest stage) and their gradients are summed
    over the stages that hold them, so they stay equal. ``forward_fn(module, x)``, when given,
    replaces ``module(x)`` at this position (e.g. ``lambda emb, h: h @ emb.weight.t()`` for an
    LM head tied to the embedding).
    """

    def __init__(self, key: str, typename: type, *module_args: Any, forward_fn: Callable | None = None,
                 tied_weight_attr: str | Sequence[str] = "weight", **module_kwargs: Any) -> None:
        super().__init__(typename, *module_args, **module_kwargs)
        if not isinstance(key, str) or not key:
            raise ValueError(f"TiedLayerSpec(key={key!r}): key must be a non-empty string naming the tie group")
        self.key = key
        self.forward_fn = forward_fn
        attrs = [tied_weight_attr] if isinstance(tied_weight_attr, str) else list(tied_weight_attr)
        if not attrs:
            raise ValueError(f"TiedLayerSpec(key={key!r}): tied_weight_attr is empty; name the tied parameter(s)")
        self.tied_weight_attr = attrs


def _get_param(module: nn.Module, dotted: str, key: str) -> nn.Parameter:
    obj: Any = module
    for part in dotted.split("."):
        obj = getattr(obj, part, None)
    if not isinstance(obj, nn.Parameter):
        names = [n for n, _ in module.named_parameters()]
        raise ValueError(f"TiedLayerSpec(key={key!r}, tied_weight_attr={dotted!r}): {type(module).__name__} has "
                         f"no parameter {dotted!r}; its parameters are {names}")
    return obj


@dataclass
class _Entry:
    """One position of the layer list: what it is, its display name, its parameter count."""

    index: int
    layer: Any  # LayerSpec | TiedLayerSpec | nn.Module | Callable
    name: str
    num_params: int


class StageModule(nn.Module):
    """The layers of one pipeline stage as one module (what ``PipelineStage`` runs).

    ``forward(*inputs)`` feeds the inputs (a single tensor, or the tuple when there are several)
    through the layers in order; with ``checkpoint_interval > 0`` every run of that many layers
    is recomputed in backward (``torch.utils.checkpoint``, non-reentrant) instead of keeping
    its activations. ``autocast`` is the precision context the engine installs.
    """

    def __init__(self, stage_id: int, funcs: list[tuple[int, Callable]], modules: dict[str, nn.Module],
                 checkpoint_interval: int = 0, checkpoint_func: Callable | None = None) -> None:
        super().__init__()
        self.stage_id = stage_id
        self.layer_indices = [i for i, _ in funcs]
        self.layers = nn.ModuleDict(modules)
        self._funcs = funcs
        self.checkpoint_interval = checkpoint_interval
        self.checkpoint_func = checkpoint_func
        self.autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext

    @staticmethod
    def _run(funcs: list[tuple[int, Callable]], x: Any) -> Any:
        for _, fn in funcs:
            x = fn(x)
        return x

    @staticmethod
    def _run_on_copy(funcs: list[tuple[int, Callable]], x: Any) -> Any:
        """A checkpointed segment runs on a copy of its input: the checkpoint keeps that input to recompute
        from, so a first layer working in place (``ReLU(inplace=True)``) must not change it."""
        if isinstance(x, tuple):
            x = tuple(t.clone() if torch.is_tensor(t) else t for t in x)
        elif torch.is_tensor(x):
            x = x.clone()
        return StageModule._run(funcs, x)

    def forward(self, *inputs: Any) -> Any:
        # As DeepSpeed's pipeline engine does, run on a copy of what the previous stage sent: the
        # received buffer is a leaf autograd must keep intact for its gradient, so a first layer
        # working in place (AlexNet's ReLU(inplace=True)) would otherwise fail
        inputs = tuple(t.clone() if torch.is_tensor(t) and t.requires_grad else t for t in inputs)
        x = inputs[0] if len(inputs) == 1 else inputs
        with self.autocast():
            interval = self.checkpoint_interval
            if interval <= 0 or not (self.training and torch.is_grad_enabled()):
                return self._run(self._funcs, x)
            for start in range(0, len(self._funcs), interval):
                chunk = self._funcs[start:start + interval]
                if self.checkpoint_func is not None:
                    x = self.checkpoint_func(lambda y, c=chunk: self._run(c, y), x)
                else:
                    x = checkpoint(self._run_on_copy, chunk, x, use_reentrant=False)
            return x


class PipelineModule(nn.Module):
    """A sequential model partitioned over pipeline stages (DeepSpeed's ``PipelineModule``).

    Args:
        layers: the model as a list (or tuple) of ``LayerSpec``, ``TiedLayerSpec``, modules or callables,
            or an ``nn.Sequential``/``nn.ModuleList`` (its children in order; state-dict keys stay
            ``"<index>.<param>"``, the ``nn.Sequential``'s own).
        num_stages: pipeline-parallel degree; the data-parallel degree is world size / num_stages.
        topology: a ``PipeTopology`` instead of ``num_stages``.
        loss_fn: ``loss_fn(outputs, labels) -> scalar`` applied after the last stage.
        seed_layers: seed the RNG with ``base_seed + layer_index`` before building each layer,
            so a layer's initial weights do not depend on which stage builds it.
        base_seed: see ``seed_layers``.
        partition_method: "parameters" (default), "uniform" or "type:<regex>".
        activation_checkpoint_interval: recompute activations every N layers (0 = off).
        activation_checkpoint_func: ``func(fn, x)`` replacing torch's non-reentrant checkpoint.
        virtual_stages: model chunks per rank for the interleaved schedule; ``None`` takes
            ``pipeline.virtual_stages`` from the config when the engine is built.
    """

    def __init__(self, layers: Sequence[Any], num_stages: int | None = None, topology: PipeTopology | None = None,
                 loss_fn: Callable | None = None, seed_layers: bool = False, base_seed: int = 1234,
                 partition_method: str = "parameters", activation_checkpoint_interval: int = 0,
                 activation_checkpoint_func: Callable | None = None, virtual_stages: int | None = None) -> None:
        super().__init__()
        if isinstance(layers, (nn.Sequential, nn.ModuleList)):  # DeepSpeed takes them: their children, in order
            layers = list(layers)
        if not isinstance(layers, (list, tuple)) or not layers:
            raise ValueError("PipelineModule(layers=...) needs a non-empty list, tuple, nn.Sequential or "
                             f"nn.ModuleList of layers, got {'an empty ' if isinstance(layers, (list, tuple)) else ''}"
                             f"{type(layers).__name__}. Fix: pass e.g. "
                             "[LayerSpec(nn.Linear, 8, 8), nn.ReLU()] or nn.Sequential(...)")
        if activation_checkpoint_interval < 0:
            raise ValueError(f"activation_checkpoint_interval={activation_checkpoint_interval} must be >= 0 (0 = off)")
        if virtual_stages is not None and virtual_stages < 1:
            raise ValueError(f"virtual_stages={virtual_stages} must be >= 1")
        self.loss_fn = loss_fn
        self.seed_layers = seed_layers
        self.base_seed = base_seed
        self.partition_method = partition_method
        self.activation_checkpoint_interval = activation_checkpoint_interval
        self.activation_checkpoint_func = activation_checkpoint_func
        self._num_stages_arg = num_stages
        self._topology_arg = topology
        self._virtual_stages = virtual_stages
        self._tp = 1  # tensor-parallel ranks per stage (configure(tp=...) from tensor_parallel.autotp_size)
        self._entries = [self._describe(i, layer) for i, layer in enumerate(layers)]
        self._built = False
        self._building = False
        self.topology: PipeTopology | None = None
        self.stage_id = 0
        self.dp_index = 0
        self.__dict__["_stage_modules"] = []  # not registered: the layers are registered on self

    # ---- description (no process group needed) ------------------------------------------------------
    def _describe(self, index: int, layer: Any) -> _Entry:
        if isinstance(layer, LayerSpec):
            with torch.random.fork_rng(devices=[]):  # counting must not consume the RNG
                try:
                    with torch.device("meta"):
                        probe = layer.build()
                except Exception:  # a constructor that cannot run on meta (e.g. reads tensor data)
                    probe = layer.build()
            count = sum(p.numel() for p in probe.parameters() if p.requires_grad)
            name = layer.typename.__name__ + (f"[tied:{layer.key}]" if isinstance(layer, TiedLayerSpec) else "")
            return _Entry(index, layer, name, count)
        if isinstance(layer, nn.Module):
            count = sum(p.numel() for p in layer.parameters() if p.requires_grad)
            return _Entry(index, layer, type(layer).__name__, count)
        if callable(layer):
            return _Entry(index, layer, getattr(layer, "__name__", type(layer).__name__), 0)
        raise TypeError(f"layers[{index}] = {layer!r} is not a LayerSpec, nn.Module or callable")

    @property
    def num_layers(self) -> int:
        """The number of layers; a subclass may set its own ``self.num_layers`` (DeepSpeed's class has no
        such attribute, so its users' subclasses do), which flexspeed then leaves alone."""
        return self.__dict__.get("_user_num_layers", len(self._entries))

    @num_layers.setter
    def num_layers(self, value: Any) -> None:
        self.__dict__["_user_num_layers"] = value

    @property
    def num_stages(self) -> int:
        """Pipeline-parallel degree (ranks per pipeline)."""
        if self.topology is not None:
            return self.topology.num_stages
        if self._topology_arg is not None:
            return self._topology_arg.num_stages
        if self._num_stages_arg is None:
            raise ValueError("PipelineModule needs num_stages=... (pipeline-parallel degree) or topology=...")
        return self._num_stages_arg

    def set_checkpoint_interval(self, interval: int) -> None:
        """Recompute activations every ``interval`` layers from now on (0 = off), as DeepSpeed's setter does.

        Takes effect at the next forward, also on a module already partitioned into stages.
        """
        if isinstance(interval, bool) or not isinstance(interval, int) or interval < 0:
            raise ValueError(f"set_checkpoint_interval({interval!r}): the interval must be an int >= 0 (0 = off)")
        self.activation_checkpoint_interval = interval
        for sm in self.__dict__["_stage_modules"]:
            sm.checkpoint_interval = interval

    @property
    def virtual_stages(self) -> int:
        """Model chunks per rank (1 unless the interleaved schedule is used)."""
        return self._virtual_stages or 1

    def partition_bounds(self) -> list[int]:
        """``num_stages * virtual_stages + 1`` layer bounds; global stage ``s`` owns ``bounds[s]:bounds[s+1]``."""
        parts = self.num_stages * self.virtual_stages
        try:
            return partition_layers(self.partition_method, parts, param_counts=[e.num_params for e in self._entries],
                                    type_names=[type(e.layer).__name__ if not isinstance(e.layer, LayerSpec)
                                                else e.layer.typename.__name__ for e in self._entries])
        except ValueError as err:
            raise ValueError(f"PipelineModule: {err}") from None

    def stage_of_layer(self, index: int) -> int:
        """Global stage (0 .. num_stages * virtual_stages - 1) that owns layer ``index``."""
        bounds = self.partition_bounds()
        for s in range(len(bounds) - 1):
            if bounds[s] <= index < bounds[s + 1]:
                return s
        raise IndexError(f"layer index {index} out of range 0..{len(self._entries) - 1}")

    def tie_keys(self) -> dict[str, list[int]]:
        """Each tie key -> the layer indices of its positions."""
        ties: dict[str, list[int]] = {}
        for e in self._entries:
            if isinstance(e.layer, TiedLayerSpec):
                ties.setdefault(e.layer.key, []).append(e.index)
        return ties

    def partition_report(self) -> str:
        """A table of which layers each stage holds, with parameter counts and balance."""
        bounds = self.partition_bounds()
        pp, v = self.num_stages, self.virtual_stages
        lines = [f"PipelineModule: {len(self._entries)} layers over {pp} stage(s)"
                 + (f" x {v} virtual" if v > 1 else "") + f", partition_method={self.partition_method!r}"]
        totals = []
        for s in range(len(bounds) - 1):
            entries = self._entries[bounds[s]:bounds[s + 1]]
            total = sum(e.num_params for e in entries)
            totals.append(total)
            where = f"stage {s}" + (f" (rank-in-pipeline {s % pp}, chunk {s // pp})" if v > 1 else "")
            lines.append(f"  {where}: layers {bounds[s]}-{bounds[s + 1] - 1}, {total:,} params")
            for e in entries:
                lines.append(f"    {e.index:>4}  {e.name:<32} {e.num_params:>12,}")
        mean = sum(totals) / len(totals)
        if mean > 0:
            lines.append(f"  heaviest stage / mean = {max(totals) / mean:.3f}")
        return "\n".join(lines)

    # ---- building ---------------------------------------------------------------------------------
    def configure(self, *, virtual_stages: int, tp: int = 1) -> None:
        """Fix the number of model chunks per rank and the tensor-parallel degree inside each stage
        (the engine calls this from the config)."""
        if self._built and tp != self.topology.num_tp:
            raise ConfigError(
                f"tensor_parallel.autotp_size={tp}, but this PipelineModule was already partitioned over "
                f"{self.topology.num_tp} tensor-parallel rank(s) (its parameters were used before "
                "flexspeed.initialize). Fix: do not touch its parameters before initialize",
                key="tensor_parallel.autotp_size")
        self._tp = tp
        if self._built and virtual_stages != self.virtual_stages:
            raise ConfigError(
                f"pipeline.virtual_stages={virtual_stages}, but this PipelineModule was already partitioned with "
                f"{self.virtual_stages} chunk(s) per rank (its parameters were used before flexspeed.initialize). "
                f"Fix: pass virtual_stages={virtual_stages} to PipelineModule(...), or do not touch its "
                "parameters before initialize", key="pipeline.virtual_stages")
        if self._virtual_stages is not None and self._virtual_stages != virtual_stages:
            raise ConfigError(
                f"pipeline.virtual_stages={virtual_stages} disagrees with PipelineModule(virtual_stages="
                f"{self._virtual_stages}). Fix: make them equal or drop one", key="pipeline.virtual_stages")
        self._virtual_stages = virtual_stages

    def _ensure_built(self) -> None:
        if self._built or self._building:
            return
        self._building = True
        try:
            self._build()
        finally:
            self._building = False

    def _build(self) -> None:
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        num_stages = self._topology_arg.num_stages if self._topology_arg is not None else self._num_stages_arg
        if num_stages is None and world == 1:
            num_stages = 1
        topo = resolve_topology(num_stages if self._topology_arg is None else None, self._topology_arg, world,
                                tp=self._tp)
        self.topology = topo
        self.stage_id, self.dp_index = topo.coords(rank)
        bounds = self.partition_bounds()
        shared: dict[str, nn.Module] = {}
        stage_modules = []
        for s in self.local_stage_ids():
            funcs: list[tuple[int, Callable]] = []
            modules: dict[str, nn.Module] = {}
            for e in self._entries[bounds[s]:bounds[s + 1]]:
                fn, module = self._build_entry(e, shared)
                funcs.append((e.index, fn))
                if module is not None:
                    modules[str(e.index)] = module
                    self.add_module(str(e.index), module)
            stage_modules.append(StageModule(s, funcs, modules, self.activation_checkpoint_interval,
                                             self.activation_checkpoint_func))
        self.__dict__["_stage_modules"] = stage_modules
        # drop references to built layers this rank does not own, so their memory can go
        self._entries = [e if not isinstance(e.layer, nn.Module) or str(e.index) in self._modules
                         else _Entry(e.index, None, e.name, e.num_params) for e in self._entries]
        self._built = True
        if rank == 0:
            log.info("%s", self.partition_report())

    def _build_entry(self, e: _Entry, shared: dict[str, nn.Module]) -> tuple[Callable, nn.Module | None]:
        layer = e.layer
        if isinstance(layer, LayerSpec):
            if isinstance(layer, TiedLayerSpec) and layer.key in shared:
                module = shared[layer.key]
            else:
                module = self._seeded_build(layer, e.index)
                if isinstance(layer, TiedLayerSpec):
                    for attr in layer.tied_weight_attr:
                        _get_param(module, attr, layer.key)
                    shared[layer.key] = module
            if isinstance(layer, TiedLayerSpec) and layer.forward_fn is not None:
                fwd = layer.forward_fn
                return (lambda x, m=module, f=fwd: f(m, x)), module
            return module, module
        if isinstance(layer, nn.Module):
            return layer, layer
        return layer, None

    def _seeded_build(self, spec: LayerSpec, index: int) -> nn.Module:
        if not self.seed_layers:
            return spec.build()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.base_seed + index)
            return spec.build()

    def local_stage_ids(self) -> list[int]:
        """Global stage ids this rank runs: ``stage_id + k * num_stages`` for each virtual chunk."""
        return [self.stage_id + k * self.num_stages for k in range(self.virtual_stages)]

    @property
    def stage_modules(self) -> list[StageModule]:
        """One ``StageModule`` per local stage (builds the module if needed)."""
        self._ensure_built()
        return self.__dict__["_stage_modules"]

    def tied_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Each tie key held on this rank -> its tied parameters (one object per rank and attribute)."""
        self._ensure_built()
        out: dict[str, list[nn.Parameter]] = {}
        for e in self._entries:
            if isinstance(e.layer, TiedLayerSpec) and str(e.index) in self._modules and e.layer.key not in out:
                module = self._modules[str(e.index)]
                out[e.layer.key] = [_get_param(module, a, e.layer.key) for a in e.layer.tied_weight_attr]
        return out

    def tied_stage_owners(self) -> dict[str, list[int]]:
        """Each tie key -> the pipeline ranks (stage ids) holding it, ascending."""
        pp = self.num_stages
        return {key: sorted({self.stage_of_layer(i) % pp for i in idx}) for key, idx in self.tie_keys().items()}

    def canonical_name(self, fqn: str) -> str:
        """The partition-independent name of a parameter: tied copies map to the key's first position."""
        head, _, rest = fqn.partition(".")
        if head.isdigit():
            e = self._entries[int(head)]
            if isinstance(e.layer, TiedLayerSpec) and rest in e.layer.tied_weight_attr:
                return f"{self.tie_keys()[e.layer.key][0]}.{rest}"
        return fqn

    # ---- nn.Module hooks that need the layers --------------------------------------------------------
    def named_modules(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Module]]:
        self._ensure_built()
        return super().named_modules(*args, **kwargs)

    def named_children(self) -> Iterator[tuple[str, nn.Module]]:
        self._ensure_built()
        return super().named_children()

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        self._ensure_built()
        return super().state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        self._ensure_built()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def __getattr__(self, name: str) -> Any:
        # layers are attributes named by their index ("0", "5"): build on first such access
        if name.isdigit() and self.__dict__.get("_built") is False and not self.__dict__.get("_building"):
            self._ensure_built()
        return super().__getattr__(name)

    def train(self, mode: bool = True) -> PipelineModule:
        super().train(mode)
        for sm in self.__dict__["_stage_modules"]:  # not children: set their own flag too
            sm.train(mode)
        return self

    def _apply(self, fn: Callable, recurse: bool = True) -> PipelineModule:
        self._ensure_built()
        return super()._apply(fn, recurse)

    def forward(self, *inputs: Any) -> Any:
        """Run this rank's layers (only meaningful with one stage per rank; training uses the engine)."""
        stages = self.stage_modules
        if len(stages) != 1:
            raise RuntimeError(f"this rank holds {len(stages)} pipeline chunks; call engine.train_batch() / "
                               "engine.eval_batch() instead of the module")
        return stages[0](*inputs)

    # ---- plain state dicts ------------------------------------------------------------------------
    def load_sequential_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load this rank's layers from a state dict of the whole (non-pipelined) model.

        Keys are ``"<layer index>.<param>"`` (what ``nn.Sequential(*layers).state_dict()`` has);
        keys of layers on other stages are skipped.
        """
        self._ensure_built()
        own = {k: v for k, v in state_dict.items() if k.partition(".")[0] in self._modules}
        if strict:
            bad = [k for k in state_dict if not k.partition(".")[0].isdigit()
                   or int(k.partition(".")[0]) >= len(self._entries)]
            if bad:
                raise KeyError(f"keys {bad[:5]} do not name a layer index 0..{len(self._entries) - 1}; "
                               "pass strict=False to ignore them")
        self.load_state_dict(own, strict=strict)

    def to_sequential_state_dict(self, group: dist.ProcessGroup | None = None) -> dict[str, torch.Tensor]:
        """The whole model's state dict (keys ``"<layer index>.<param>"``), on every rank.

        Collective over ``group`` (default: the world): every rank must call it. It gathers
        all stages through CPU, so it suits models that fit one host's memory; for larger ones
        save a checkpoint and use ``flexspeed.pipe.export_sequential_state_dict``.
        """
        # ZeRO-3 shards (DTensor) are gathered over their data-parallel group first (collective there too)
        local = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu()
                 for k, v in self.state_dict().items()}
        if not dist.is_initialized() or dist.get_world_size(group) == 1:
            return dict(sorted(local.items(), key=lambda kv: _sort_key(kv[0])))
        gathered: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, local, group=group)
        merged: dict[str, torch.Tensor] = {}
        for part in gathered:
            merged.update(part)
        return dict(sorted(merged.items(), key=lambda kv: _sort_key(kv[0])))


def _sort_key(fqn: str) -> int:
    """Layer index of a key; sorting by it is stable, so each layer keeps its parameter order."""
    head = fqn.partition(".")[0]
    return int(head) if head.isdigit() else 1 << 30


def export_sequential_state_dict(checkpoint_dir: str, tag: str | None = None,
                                 output_file: str | None = None) -> dict[str, torch.Tensor]:
    """The model weights of a pipeline checkpoint as a plain ``nn.Sequential`` state dict, in one process.

    The checkpoint is read, verified, by :func:`flexspeed.runtime.export.consolidate` (any pipeline
    layout, data-parallel size or ZeRO stage); keys are ``"<layer index>.<param>"``, in layer order.

    Args:
        checkpoint_dir: a ``save_checkpoint`` root (with ``latest``) or a tag directory.
        tag: the tag to read; default ``latest`` (or ``checkpoint_dir`` itself when it is one).
        output_file: also write the result there (``.safetensors`` or a ``torch.save`` file, atomically).
    Returns:
        ``{"<layer index>.<param>": tensor}`` on CPU.
    """
    from flexspeed.runtime.export import consolidate, write_state_dict

    out = dict(sorted(consolidate(checkpoint_dir, tag=tag).items(), key=lambda kv: _sort_key(kv[0])))
    if output_file is not None:
        write_state_dict(out, output_file)
    return out
