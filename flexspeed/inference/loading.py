"""Checkpoint loading for inference, sliced per tensor-parallel rank at read time.

Sources, found from what ``checkpoint`` names:

- a Hugging Face ``model.safetensors``, a sharded ``model.safetensors.index.json``, or a
  directory holding either (``pytorch_model.bin[.index.json]`` too);
- a ``.safetensors``, ``.pt``, ``.bin`` or ``.pth`` file;
- a DeepSpeed inference checkpoint description, as a JSON path or a dict:
  ``{"type": "ds_model", "checkpoints": ["part-0.pt", ...], "version": 1.0}``, whose files are
  relative to ``base_dir`` (default: the JSON file's directory).

With a :class:`~flexspeed.inference.tp.TensorParallelPlan`, each rank reads only its rows or
columns: safetensors through ``safe_open(...).get_slice(name)[rows]`` (only those bytes are
read from the file), torch files through a memory map (only the touched pages are read).
Torch files are opened with ``weights_only=True``. A model built on the meta device is
materialised directly from the file, so no rank ever holds the full weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from flexspeed.config.errors import ConfigError
from flexspeed.inference.tp import Placement, TensorParallelPlan, take
from flexspeed.utils.logging import human_bytes
from flexspeed.utils.progress import Progress

__all__ = ["LoadReport", "load_checkpoint", "checkpoint_files", "materialize_meta_buffers"]

_TORCH_EXT = (".pt", ".bin", ".pth")
_DS_TYPES = ("ds_model", "bloom", "hf", "huggingface", "safetensors")
_DIR_CANDIDATES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                   "pytorch_model.bin")
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` did."""

    files: list[str] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)
    bytes_read: int = 0
    """Bytes of tensor data this rank read (its slices, plus the replicated tensors)."""
    unexpected: list[str] = field(default_factory=list)
    """Checkpoint keys that matched nothing in the model."""


# ------------------------------------------------------------------------------------ file listing

def checkpoint_files(checkpoint: str | os.PathLike | Mapping[str, Any], base_dir: str = "") -> list[str]:
    """The weight files a ``checkpoint`` value names (see the module docstring).

    Raises:
        ConfigError: the path does not exist, or the description is malformed.
    """
    if isinstance(checkpoint, Mapping):
        return _ds_files(checkpoint, base_dir or os.getcwd(), "<dict>")
    path = os.fspath(checkpoint)
    if os.path.isdir(path):
        for cand in _DIR_CANDIDATES:
            if os.path.isfile(os.path.join(path, cand)):
                return checkpoint_files(os.path.join(path, cand), base_dir)
        raise ConfigError(f"directory {path!r} holds none of {list(_DIR_CANDIDATES)}; point checkpoint at a "
                          "weight file or a checkpoint json", key="checkpoint")
    if not os.path.isfile(path):
        alt = os.path.join(base_dir, path) if base_dir else None
        if alt and os.path.exists(alt):
            return checkpoint_files(alt, "")
        raise ConfigError(f"{path!r} does not exist" + (f" (nor under base_dir={base_dir!r})" if base_dir else ""),
                          key="checkpoint")
    if path.endswith(".index.json"):
        with open(path) as f:
            index = json.load(f)
        weight_map = index.get("weight_map")
        if not isinstance(weight_map, dict):
            raise ConfigError(f"{path!r} has no 'weight_map' object; is it a Hugging Face index file?",
                              key="checkpoint")
        root = os.path.dirname(path)
        return [os.path.join(root, f) for f in dict.fromkeys(weight_map.values())]
    if path.endswith(".json"):
        with open(path) as f:
            desc = json.load(f)
        return _ds_files(desc, base_dir or os.path.dirname(path), path)
    if path.endswith(".safetensors") or path.endswith(_TORCH_EXT):
        return [path]
    raise ConfigError(f"cannot tell the format of {path!r}; use .safetensors, .pt/.bin/.pth, a "
                      "*.index.json or a DeepSpeed checkpoint .json", key="checkpoint")


def _ds_files(desc: Mapping[str, Any], base_dir: str, where: str) -> list[str]:
    kind = desc.get("type")
    if kind is not None and str(kind).lower() not in _DS_TYPES:
        raise ConfigError(f"checkpoint type {kind!r} in {where} is not supported; supported: {list(_DS_TYPES)} "
                          "(state-dict files whose keys match the model)", key="checkpoint.type")
    files = desc.get("checkpoints")
    if isinstance(files, Mapping):
        raise ConfigError(f"{where} describes a checkpoint already split for tensor parallelism ('tp'/'non_tp' "
                          "lists); flexspeed slices at load time: pass the unsharded checkpoint",
                          key="checkpoint.checkpoints")
    if isinstance(files, str):
        files = [files]
    if not files or not all(isinstance(f, str) for f in files):
        raise ConfigError(f"{where} needs 'checkpoints': a list of file names, got {files!r}",
                          key="checkpoint.checkpoints")
    out = [f if os.path.isabs(f) else os.path.join(base_dir, f) for f in files]
    absent = [f for f in out if not os.path.isfile(f)]
    if absent:
        raise ConfigError(f"checkpoint files {absent[:3]} listed in {where} do not exist; set base_dir to "
                          "their directory", key="base_dir")
    return out


# ------------------------------------------------------------------------------------ tensor sources

class _Sources:
    """Every tensor in a list of files, readable whole or as one rank's slice."""

    def __init__(self, files: list[str]) -> None:
        self.where: dict[str, tuple[str, Any]] = {}
        self._handles: list[Any] = []
        for path in files:
            if path.endswith(".safetensors"):
                from safetensors import safe_open

                handle = safe_open(path, framework="pt", device="cpu")
                self._handles.append(handle)
                for key in handle.keys():
                    self.where[key] = ("st", handle)
            else:
                try:  # memory-mapped: a rank's slice touches only its pages
                    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as e:
                    if "mmap" not in str(e):  # legacy (non-zip) files cannot be mapped
                        raise
                    sd = torch.load(path, map_location="cpu", weights_only=True)
                sd = _unwrap(sd, path)
                for key, value in sd.items():
                    if isinstance(value, torch.Tensor):
                        self.where[key] = ("pt", value)

    def read(self, key: str, placement: Placement | None, rank: int, tp: int) -> tuple[torch.Tensor, int]:
        """(tensor, bytes read) for ``key``: whole, or this rank's part under ``placement``."""
        kind, src = self.where[key]
        if kind == "pt":
            t = src if placement is None else take(src, placement, rank, tp)
            return t, (0 if placement is not None and placement.kind == "rank0" and rank else t.nbytes)
        if placement is None or (placement.kind == "rank0" and rank == 0):
            t = src.get_tensor(key)
            return t, t.nbytes
        sl = src.get_slice(key)
        if placement.kind == "rank0":
            return torch.zeros(sl.get_shape(), dtype=_ST_DTYPES[sl.get_dtype()]), 0
        lead = (slice(None),) * placement.dim
        parts = [sl[lead + (slice(a, b),)] for a, b in placement.ranges(rank, tp)]
        t = parts[0] if len(parts) == 1 else torch.cat(parts, dim=placement.dim)
        return t, t.nbytes

    def shape(self, key: str) -> tuple[int, ...]:
        kind, src = self.where[key]
        return tuple(src.shape) if kind == "pt" else tuple(src.get_slice(key).get_shape())


def _unwrap(sd: Any, path: str) -> Mapping[str, Any]:
    if isinstance(sd, Mapping) and len(sd) <= 3:
        for key in ("module", "state_dict", "model"):
            if isinstance(sd.get(key), Mapping):
                return sd[key]
    if not isinstance(sd, Mapping):
        raise ConfigError(f"{path!r} holds a {type(sd).__name__}, not a state dict", key="checkpoint")
    return sd


# ------------------------------------------------------------------------------------ loading

def _targets(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str, bool]]]:
    """id(tensor) -> [(fqn, owner, attr, is_param)], tied tensors grouped."""
    groups: dict[int, list[tuple[str, nn.Module, str, bool]]] = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        prefix = f"{mname}." if mname else ""
        for pname, p in mod._parameters.items():
            if p is not None:
                groups.setdefault(id(p), []).append((prefix + pname, mod, pname, True))
        for bname, b in mod._buffers.items():
            if b is not None and bname not in mod._non_persistent_buffers_set:
                groups.setdefault(id(b), []).append((prefix + bname, mod, bname, False))
    return groups


def _stored_names(model: nn.Module) -> Mapping[str, str]:
    """Module path -> the name checkpoint files give it, where the model's family says they differ."""
    from flexspeed.inference.families import family_for_model

    try:
        found = family_for_model(model)
    except ConfigError:
        return {}
    return found[0].stored_names if found is not None else {}


def _lookup(fqn: str, keys: Mapping[str, Any], prefix: str) -> str | None:
    if fqn in keys:
        return fqn
    if prefix and fqn.startswith(prefix + ".") and fqn[len(prefix) + 1:] in keys:
        return fqn[len(prefix) + 1:]
    if prefix and f"{prefix}.{fqn}" in keys:
        return f"{prefix}.{fqn}"
    return None


def load_checkpoint(model: nn.Module, checkpoint: str | os.PathLike | Mapping[str, Any], *, base_dir: str = "",
                    plan: TensorParallelPlan | None = None, rank: int = 0, dtype: torch.dtype | None = None,
                    strict: bool = True) -> LoadReport:
    """Fill ``model``'s parameters and persistent buffers from ``checkpoint``, in place.

    Args:
        model: the model; already sharded by :func:`~flexspeed.inference.tp.shard_module` when
            ``plan`` splits it; may live on the meta device.
        checkpoint: what to read (see the module docstring).
        base_dir: directory of the files a DeepSpeed checkpoint json lists.
        plan: the tensor-parallel plan (``None``: read everything whole).
        rank: this process's rank in the TP group.
        dtype: floating tensors are converted to it (``None``: keep the model's dtype).
        strict: a model parameter absent from the checkpoint is an error.
    Returns:
        a :class:`LoadReport`.
    Raises:
        ConfigError: files missing or malformed, a parameter missing or of the wrong shape.
    """
    files = checkpoint_files(checkpoint, base_dir)
    src = _Sources(files)
    tp = plan.tp_size if plan else 1
    placements = plan.params if plan else {}
    prefix = getattr(model, "base_model_prefix", "") or ""
    stored = _stored_names(model)
    report = LoadReport(files=files)
    used: set[str] = set()
    missing: list[str] = []
    groups = list(_targets(model).values())
    with Progress("init_inference: loading checkpoint", len(groups), "tensors") as progress:
        for group in groups:
            _load_group(group, src, prefix, placements, rank, tp, dtype, used, missing, report, stored)
            progress.update(1, note=human_bytes(report.bytes_read))
    if missing and strict:
        raise ConfigError(f"{len(missing)} model tensors are not in the checkpoint, e.g. {missing[:4]}; "
                          f"the checkpoint has e.g. {sorted(src.where)[:4]}", key="checkpoint")
    report.unexpected = sorted(set(src.where) - used)
    materialize_meta_buffers(model)
    return report


def _load_group(group: list[tuple[str, nn.Module, str, bool]], src: _Sources, prefix: str, placements: Mapping,
                rank: int, tp: int, dtype: torch.dtype | None, used: set[str], missing: list[str],
                report: LoadReport, stored: Mapping[str, str]) -> None:
    """Read one (tied) tensor group's checkpoint entry into the model (``stored``: see :func:`_stored_names`)."""
    names = [g[0] for g in group]
    names += [stored[n.rpartition(".")[0]] + "." + n.rpartition(".")[2] for n in names
              if n.rpartition(".")[0] in stored]  # the family's name for it in files (GPT-NeoX: embed_out)
    key = next((k for k in (_lookup(n, src.where, prefix) for n in names) if k is not None), None)
    current = getattr(group[0][1], group[0][2])
    if key is None:
        if group[0][3] or current.is_meta:
            missing.append(names[0])
        return
    placement = next((placements[n] for n in names if n in placements), None)
    tensor, nbytes = src.read(key, placement, rank, tp)
    if tuple(tensor.shape) != tuple(current.shape):
        raise ConfigError(f"checkpoint tensor {key!r} has shape {tuple(src.shape(key))} (this rank's part "
                          f"{tuple(tensor.shape)}) but the model expects {tuple(current.shape)}; the model "
                          "was built with a different config than the checkpoint", key="checkpoint")
    _assign(group, current, tensor, dtype)
    used.add(key)
    report.loaded.append(names[0])
    report.bytes_read += nbytes


def _assign(group: list[tuple[str, nn.Module, str, bool]], current: torch.Tensor, tensor: torch.Tensor,
            dtype: torch.dtype | None) -> None:
    target_dtype = (dtype or current.dtype) if tensor.is_floating_point() else tensor.dtype
    if not current.is_meta and current.dtype == target_dtype:
        with torch.no_grad():
            current.copy_(tensor)
        return
    tensor = tensor.to(target_dtype).contiguous()
    new: torch.Tensor = nn.Parameter(tensor, requires_grad=False) if group[0][3] else tensor
    for _, owner, attr, is_param in group:
        (owner._parameters if is_param else owner._buffers)[attr] = new


def materialize_meta_buffers(model: nn.Module) -> None:
    """Rebuild buffers still on the meta device (e.g. rotary ``inv_freq``, never in checkpoints).

    A module holding such buffers is rebuilt on the CPU from its ``config`` (the HF convention)
    and its buffers are taken from the copy.

    Raises:
        ConfigError: a meta buffer cannot be rebuilt this way.
    """
    for name, mod in model.named_modules():
        meta = [b for b, t in mod._buffers.items() if t is not None and t.is_meta]
        if not meta:
            continue
        fresh = None
        cfg = getattr(mod, "config", None)
        if cfg is not None:
            try:
                with torch.device("cpu"):
                    fresh = type(mod)(cfg)
            except Exception:
                fresh = None
        if fresh is None or any(getattr(fresh, b, None) is None for b in meta):
            raise ConfigError(f"buffers {meta} of {name or type(model).__name__} are on the meta device and not in "
                              "the checkpoint; build the model with only its parameters on meta "
                              "(e.g. accelerate.init_empty_weights(include_buffers=False))", key="checkpoint")
        for b in meta:
            mod._buffers[b] = getattr(fresh, b)
