"""Write a Hugging Face model folder: ``config.json``, sharded safetensors and their index.

The layout ``from_pretrained`` reads: one ``model.safetensors``, or ``model-0000k-of-0000N.safetensors``
shards plus ``model.safetensors.index.json`` (``{"metadata": {"total_size": ...}, "weight_map":
{name: file}}``). Shards are filled greedily in the given order up to ``max_shard_size`` (a tensor
larger than that gets a shard of its own), as ``huggingface_hub``'s splitting does. Tied parameters
(one tensor under several names) are written once, under the first name, as ``save_pretrained``
does; the config's ``tie_word_embeddings`` tells ``from_pretrained`` to re-tie them.

Each shard streams: its header is built from the shapes and dtypes alone, then every tensor is
fetched, written and dropped, so peak memory is one tensor (plus the reader's buffers), not the
model. Every file goes through the checkpoint code's atomic writer.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO, Any

import torch

from flexspeed.inference.offload.heap import release_free_heap
from flexspeed.runtime.checkpoint_io import write_atomic

__all__ = ["TensorEntry", "write_hf_folder", "parse_size", "model_config_dict", "tied_groups", "plan_shards",
           "DEFAULT_SHARD_SIZE"]

DEFAULT_SHARD_SIZE = "5GB"
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor to write: its name, dtype and shape as it will be stored."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def parse_size(size: int | str) -> int:
    """``5GB``/``500MB``/``2GiB``/an int of bytes -> bytes (decimal units, as ``huggingface_hub``)."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)\s*", str(size).upper())
    if not m:
        raise ValueError(f"max_shard_size={size!r} is not a size. Fix: pass bytes or a string like '5GB' or '500MB'")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def model_config_dict(module: torch.nn.Module) -> dict[str, Any] | None:
    """The model's config as ``config.json`` content: HF ``PretrainedConfig`` or flexspeed's ``GPTConfig``."""
    cfg = getattr(module, "config", None)
    if cfg is None:
        return None
    if hasattr(cfg, "to_json_string"):  # a transformers PretrainedConfig
        return json.loads(cfg.to_json_string(use_diff=False))
    from flexspeed.models.gpt import GPTConfig

    if isinstance(cfg, GPTConfig):
        return {**cfg.to_dict(), "model_type": "flexspeed_gpt", "architectures": ["GPT"]}
    return None


def tied_groups(module: torch.nn.Module) -> list[list[str]]:
    """Names that share one parameter (each group in registration order, first name kept on export)."""
    by_param: dict[int, list[str]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(p), []).append(name)
    return [names for names in by_param.values() if len(names) > 1]


def plan_shards(entries: list[TensorEntry], max_bytes: int) -> list[list[TensorEntry]]:
    """Greedy shards in order: a new shard when the next tensor would pass ``max_bytes``."""
    shards: list[list[TensorEntry]] = [[]]
    size = 0
    for e in entries:
        if shards[-1] and size + e.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(e)
        size += e.nbytes
    return [s for s in shards if s]


def _header(shard: list[TensorEntry], metadata: dict[str, str]) -> bytes:
    offset, head = 0, {"__metadata__": metadata}
    for e in shard:
        if e.dtype not in _ST_DTYPES:
            raise ValueError(f"tensor {e.name!r} has dtype {e.dtype}, which safetensors cannot store")
        head[e.name] = {"dtype": _ST_DTYPES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
        offset += e.nbytes
    raw = json.dumps(head, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


def _write_shard(path: str, shard: list[TensorEntry], fetch: Callable[[TensorEntry], torch.Tensor]) -> None:
    def body(f: IO[bytes]) -> None:
        f.write(_header(shard, {"format": "pt", "writer": "flexspeed"}))
        for e in shard:
            t = fetch(e).detach().to("cpu", e.dtype).contiguous()
            if tuple(t.shape) != e.shape:
                raise ValueError(f"tensor {e.name!r} has shape {tuple(t.shape)}, expected {e.shape}")
            f.write(memoryview(t.view(torch.uint8).reshape(-1).numpy()))
            del t
            release_free_heap()  # the reader's per-tensor buffers go back to the OS, not into a growing heap

    write_atomic(path, body)


def write_hf_folder(out_dir: str | os.PathLike, entries: Iterable[TensorEntry],
                    fetch: Callable[[TensorEntry], torch.Tensor], *, config: dict[str, Any] | None = None,
                    tied: Iterable[Iterable[str]] = (), max_shard_size: int | str = DEFAULT_SHARD_SIZE,
                    dtype: torch.dtype | None = None, file_name: str | None = None) -> dict[str, Any]:
    """Write ``config.json`` (if given) and the weights of ``entries`` into ``out_dir``.

    Args:
        out_dir: created if needed; files already there with the same names are replaced atomically.
        entries: the tensors, in the order they are written.
        fetch: returns a tensor's data (called once per tensor, in order; may read from disk).
        config: ``config.json`` content; its ``torch_dtype``/``dtype`` is set to ``dtype`` when given.
        tied: groups of names of one tensor; only the first of each group is written.
        max_shard_size: largest shard (``"5GB"``, ``"500MB"`` or bytes).
        dtype: the dtype floating-point tensors are stored in (the caller sets it in ``entries``).
        file_name: one file of this name holding every tensor (no index, no sharding).
    Returns:
        ``{"files": [...], "total_size": bytes, "skipped_tied": [...]}``.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"export folder {out_dir!r} exists and is a file. Fix: pass a new or existing directory")
    os.makedirs(out_dir, exist_ok=True)
    skip = {name for group in tied for name in list(group)[1:]}
    kept = [e for e in entries if e.name not in skip]
    shards = plan_shards(kept, parse_size(max_shard_size))
    if file_name is not None:
        shards = [kept]
    names = ([file_name or "model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for name, shard in zip(names, shards):
        _write_shard(os.path.join(out_dir, name), shard, fetch)
    total = sum(e.nbytes for e in kept)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {e.name: name for name, shard in zip(names, shards) for e in shard}}
        write_atomic(os.path.join(out_dir, "model.safetensors.index.json"), json.dumps(index, indent=2).encode())
    if config is not None:
        config = dict(config)
        if dtype is not None:
            text = str(dtype).replace("torch.", "")
            config["torch_dtype" if "torch_dtype" in config or "dtype" not in config else "dtype"] = text
        write_atomic(os.path.join(out_dir, "config.json"), json.dumps(config, indent=2, sort_keys=True).encode())
    return {"files": names, "total_size": total, "skipped_tied": sorted(skip)}
