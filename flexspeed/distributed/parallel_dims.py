"""``ParallelDims``: the data x pipeline x tensor-parallel degrees of a job, and its device meshes.

The world of ``dp * pp * tp`` ranks is laid out as one ``DeviceMesh`` with dimensions
``("dp", "pp", "tp")``, tensor parallelism innermost::

    rank = (dp_index * pp + stage) * tp + tp_index

so the ranks of one tensor-parallel group are neighbours (their all-reduces run inside every
layer, the highest-volume traffic), the stages of one pipeline come next (activations once per
micro-batch), and a data-parallel group strides across pipelines (gradients once per step).
With ``tp == 1`` this is the pipeline's historical ``rank = dp_index * num_stages + stage_id``.

Where each degree comes from is recorded (``sources``) so every error names the config key or
argument to change:

- ``pp``: the ``PipelineModule``'s ``num_stages`` (or ``topology``), agreeing with the config's
  ``pipeline.stages`` when that is not ``"auto"``;
- ``tp``: ``tensor_parallel.autotp_size`` (training) or ``tensor_parallel.tp_size`` (inference);
- ``dp``: what remains, ``world_size / (pp * tp)``.

This module is the only place in flexspeed that constructs a ``DeviceMesh``: the engines take
their sub-meshes (``mesh("dp")``, ``mesh("pp")``, ``mesh("tp")``, flattened ``"dp_tp"`` ...) from a
``ParallelDims``, and :func:`mesh_from_group` wraps a caller's own process group.
Validation happens in the constructor, before any collective runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist

from flexspeed.config.errors import ConfigError

__all__ = ["ParallelDims", "mesh_from_group", "DIM_NAMES"]

DIM_NAMES = ("dp", "pp", "tp")
_DEFAULT_SOURCES = {"dp": "the world size / (pp * tp)", "pp": "no pipeline (1)", "tp": "no tensor parallelism (1)"}


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


@dataclass(frozen=True)
class ParallelDims:
    """Validated degrees of data (``dp``), pipeline (``pp``) and tensor (``tp``) parallelism.

    Build it with :meth:`from_world` (``dp`` = what remains) or directly with all three.

    Args:
        dp: data-parallel replicas (ZeRO shards over these ranks).
        pp: pipeline stages.
        tp: tensor-parallel ranks per layer.
        world_size: the number of processes; must equal ``dp * pp * tp``.
        sources: where each degree came from (config key, argument or environment), for messages.
    Raises:
        ConfigError: a degree below 1, or a product that is not the world size (naming the
            numbers, their sources and the degrees that would fit).
    """

    dp: int
    pp: int = 1
    tp: int = 1
    world_size: int | None = None
    sources: dict[str, str] = field(default_factory=dict, compare=False)
    _meshes: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in DIM_NAMES:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}={value!r} (from {self.source(name)}) must be a positive integer. Fix: "
                                  f"set it to 1 or more", key=self._key(name))
        world = self.dp * self.pp * self.tp if self.world_size is None else self.world_size
        object.__setattr__(self, "world_size", world)
        if self.dp * self.pp * self.tp != world:
            raise ConfigError(
                f"dp {self.dp} x pp {self.pp} x tp {self.tp} = {self.dp * self.pp * self.tp} ranks, but the world "
                f"size is {world} ({self.source('world')}). Fix: launch {self.dp * self.pp * self.tp} processes, or "
                f"change the degrees so their product is {world}", key=self._key("dp"))

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_world(cls, world_size: int, *, pp: int = 1, tp: int = 1, world_source: str = "the process group",
                   pp_source: str | None = None, tp_source: str | None = None) -> ParallelDims:
        """The degrees for ``world_size`` ranks: ``pp`` and ``tp`` as given, ``dp`` the rest.

        Args:
            world_size: the number of processes.
            pp: pipeline stages (``PipelineModule(num_stages=...)``).
            tp: tensor-parallel degree (``tensor_parallel.autotp_size``).
            world_source, pp_source, tp_source: where the numbers came from, for error messages.
        Raises:
            ConfigError: ``pp * tp`` does not divide ``world_size`` (naming the numbers and the fix).
        """
        sources = {"world": world_source, "dp": _DEFAULT_SOURCES["dp"],
                   "pp": pp_source or _DEFAULT_SOURCES["pp"], "tp": tp_source or _DEFAULT_SOURCES["tp"]}
        for name, value in (("world size", world_size), ("pp", pp), ("tp", tp)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                what = sources["world" if name == "world size" else name]
                raise ConfigError(f"{name}={value!r} (from {what}) must be a positive integer. Fix: set it to 1 "
                                  "or more", key=cls._key_of(name, sources))
        model = pp * tp
        if world_size % model:
            fits_pp = [d for d in _divisors(world_size) if (world_size // d) % tp == 0]
            fits_tp = [d for d in _divisors(world_size) if (world_size // d) % pp == 0]
            fixes = [f"launch a multiple of {model} processes"]
            if fits_pp and pp > 1:
                fixes.append(f"use a pipeline degree in {fits_pp} (with tp {tp})")
            if fits_tp and tp > 1:
                fixes.append(f"use a tensor-parallel degree in {fits_tp} (with pp {pp})")
            raise ConfigError(
                f"pp {pp} (from {sources['pp']}) x tp {tp} (from {sources['tp']}) = {model} ranks per model replica "
                f"does not divide the world size {world_size} (from {world_source}), so the data-parallel degree "
                f"world / (pp x tp) is not an integer. Fix: {', or '.join(fixes)}",
                key=cls._key_of("pp" if world_size % pp or tp == 1 else "tp", sources))
        return cls(dp=world_size // model, pp=pp, tp=tp, world_size=world_size, sources=sources)

    @classmethod
    def from_process_group(cls, *, pp: int = 1, tp: int = 1, pp_source: str | None = None,
                           tp_source: str | None = None) -> ParallelDims:
        """:meth:`from_world` with the current process group's size (1 without one)."""
        world = dist.get_world_size() if dist.is_initialized() else 1
        return cls.from_world(world, pp=pp, tp=tp, world_source="the process group" if dist.is_initialized()
                              else "one process (no process group)", pp_source=pp_source, tp_source=tp_source)

    # ---- descriptions ----------------------------------------------------------------------------
    def source(self, name: str) -> str:
        """Where degree ``name`` ("dp", "pp", "tp" or "world") came from."""
        return self.sources.get(name) or _DEFAULT_SOURCES.get(name, "the process group")

    @staticmethod
    def _key_of(name: str, sources: dict[str, str]) -> str:
        text = sources.get(name, "")
        for key in ("tensor_parallel.autotp_size", "tensor_parallel.tp_size", "pipeline.stages"):
            if key in text:
                return key
        return {"pp": "pipeline", "tp": "tensor_parallel.autotp_size"}.get(name, "world_size")

    def _key(self, name: str) -> str:
        return self._key_of(name, self.sources)

    @property
    def enabled(self) -> dict[str, bool]:
        """Which dimensions have more than one rank."""
        return {name: getattr(self, name) > 1 for name in DIM_NAMES}

    def coords(self, rank: int) -> dict[str, int]:
        """The ``dp``/``pp``/``tp`` index of a global rank (no process group needed)."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside 0..{self.world_size - 1}")
        return {"dp": rank // (self.pp * self.tp), "pp": rank // self.tp % self.pp, "tp": rank % self.tp}

    def rank_of(self, *, dp: int = 0, pp: int = 0, tp: int = 0) -> int:
        """The global rank at the given coordinates."""
        return (dp * self.pp + pp) * self.tp + tp

    def ranks_along(self, name: str, rank: int) -> list[int]:
        """The global ranks of ``rank``'s group along dimension ``name`` (its ``dp``, ``pp`` or ``tp`` group)."""
        here = self.coords(rank)
        return [self.rank_of(**{**here, name: i}) for i in range(getattr(self, name))]

    def describe(self) -> str:
        """One line: the degrees and where each came from."""
        return (f"world {self.world_size} = dp {self.dp} x pp {self.pp} x tp {self.tp} (pp from {self.source('pp')}; "
                f"tp from {self.source('tp')}; dp = world / (pp x tp))")

    # ---- meshes ---------------------------------------------------------------------------------
    def build_mesh(self, device_type: str) -> Any:
        """The world's ``("dp", "pp", "tp")`` ``DeviceMesh`` (built once per device type; collective).

        Raises:
            RuntimeError: no process group, or one whose size is not ``world_size``.
        """
        mesh = self._meshes.get(device_type)
        if mesh is not None:
            return mesh
        from torch.distributed.device_mesh import init_device_mesh

        if not dist.is_initialized():
            raise RuntimeError(f"{self.describe()} needs torch.distributed. Fix: call flexspeed.init_distributed() "
                               "first (a one-process group is fine)")
        if dist.get_world_size() != self.world_size:
            raise ConfigError(f"{self.describe()}, but the process group has {dist.get_world_size()} ranks. Fix: "
                              f"launch {self.world_size} processes", key=self._key("dp"))
        mesh = init_device_mesh(device_type, (self.dp, self.pp, self.tp), mesh_dim_names=DIM_NAMES)
        self._meshes[device_type] = mesh
        return mesh

    def mesh(self, name: str, device_type: str = "cpu") -> Any:
        """A named sub-mesh: ``"dp"``, ``"pp"``, ``"tp"`` or a flattened ``"dp_pp"``, ``"dp_tp"``, ``"pp_tp"``,
        ``"dp_pp_tp"`` (the dimensions in that order, joined by ``_``)."""
        parts = tuple(name.split("_"))
        if any(p not in DIM_NAMES for p in parts) or list(parts) != sorted(parts, key=DIM_NAMES.index) \
                or len(set(parts)) != len(parts):
            raise ValueError(f"mesh name {name!r} is not one of {list(DIM_NAMES)} or an ordered '_'-joined "
                             "combination of them (e.g. 'dp_tp')")
        root = self.build_mesh(device_type)
        if name in DIM_NAMES:
            return root[name]
        key = (device_type, name)
        if key not in self._meshes:
            self._meshes[key] = root[parts]._flatten(name)
        return self._meshes[key]

    def group(self, name: str, device_type: str = "cpu") -> dist.ProcessGroup:
        """The process group of this rank along ``name`` (see :meth:`mesh`)."""
        return self.mesh(name, device_type).get_group()


def mesh_from_group(group: dist.ProcessGroup, device_type: str, name: str = "dp") -> Any:
    """A 1-D ``DeviceMesh`` over a caller's own process group (e.g. ``apply_zero(..., group=...)``)."""
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh.from_group(group, device_type, mesh_dim_names=(name,))
