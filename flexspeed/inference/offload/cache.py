"""The tiered KV cache and activation store of the offload runner.

The cache of layer ``j`` and micro-batch ``k`` is a *slot*. In memory a slot is head-major,
``(mb, H_kv, T_max, head_dim)``, written in place at the step's positions (never concatenated)
and read as a view ``[:, :, :end]``, the layout the CPU attention kernels are fastest on. On disk
a slot is time-major: the file holds one row per position, ``(mb, H_kv, head_dim)``, so a step
reads the prefix ``[0:start]`` in one request (into a head-major buffer) and appends its new rows
in one write. Layers are placed on tiers by the policy's cache percentages (each layer's cache is
one equal-sized item).

With ``compress_cache`` a slot stores int4 values (quant.py's nibble packing, two per byte) and,
per group of 64 along the head dimension (the whole head when it is smaller), a float16
``(scale, min)`` pair: ``x ~= q * scale + min``. The tokens of the current step attend to the
exact new keys/values and to the dequantized older ones; only stored entries are compressed.
"""

from __future__ import annotations

import os
import shutil
import threading
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flexspeed.inference import native
from flexspeed.inference.attention import decode_attention, decode_valid
from flexspeed.inference.offload.files import ALIGN, private_dir, tensor_bytes
from flexspeed.inference.offload.policy import OffloadPolicy, place_by_size

__all__ = ["OffloadKVCache", "ActivationStore", "quantize_kv", "dequantize_kv", "kv_group"]


def kv_group(head_dim: int) -> int:
    """int4 group along the head dimension: 64, or the whole head when 64 does not divide it."""
    return 64 if head_dim % 64 == 0 else head_dim


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., hd) -> packed (..., hd/2) uint8 and params (..., hd/g, 2) float16 ``[scale, min]``."""
    from flexspeed.inference.quant import pack_plain

    hd = x.shape[-1]
    g = kv_group(hd)
    xg = x.float().reshape(-1, hd // g, g)  # (N, hd/g, g)
    lo = xg.amin(-1).half().float()  # rounded first, so values are quantized against what is stored
    scale = ((xg.amax(-1) - lo) / 15).half().float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = ((xg - lo[..., None]) / scale[..., None]).round_().clamp_(0, 15)
    packed = pack_plain(q.reshape(-1, hd)).view(*x.shape[:-1], hd // 2)
    params = torch.stack([scale, lo], -1).half().view(*x.shape[:-1], hd // g, 2)
    return packed, params


def dequantize_kv(packed: torch.Tensor, params: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize_kv`: -> (..., hd) in ``dtype``."""
    from flexspeed.inference.quant import unpack_plain

    hd = packed.shape[-1] * 2
    ng = params.shape[-2]
    vals = unpack_plain(packed.reshape(-1, hd // 2)).view(-1, ng, hd // ng).float()
    p = params.reshape(-1, ng, 2).float()
    return (vals * p[..., :1] + p[..., 1:]).view(*packed.shape[:-1], hd).to(dtype)


@dataclass
class _Part:
    """One tensor of a slot: ``row_shape`` = (mb, H, *rest) per position; on disk, where its rows start."""

    name: str
    row_shape: tuple[int, ...]
    dtype: torch.dtype
    offset: int = 0

    @property
    def row_bytes(self) -> int:
        n = self.dtype.itemsize
        for s in self.row_shape:
            n *= s
        return n

    def shape(self, t_max: int) -> tuple[int, ...]:
        """The in-memory (head-major) shape: (mb, H, T_max, *rest)."""
        return (*self.row_shape[:2], t_max, *self.row_shape[2:])


class _Slot:
    """The cache of one (layer, micro-batch): in memory (``data``) or in a file (``fd`` + offsets)."""

    def __init__(self, parts: list[_Part], t_max: int, tier: str, device: torch.device, fd: int | None) -> None:
        self.parts, self.t_max, self.tier, self.fd = parts, t_max, tier, fd
        self.data: dict[str, torch.Tensor] | None = None
        if fd is None:
            self.data = {p.name: torch.zeros(p.shape(t_max), dtype=p.dtype, device=device) for p in parts}


class _Work:
    """A slot's tensors for one compute: its own memory, or host buffers holding the prefix read from disk."""

    def __init__(self, slot: _Slot, data: dict[str, torch.Tensor], pooled: bool) -> None:
        self.slot, self.data, self.pooled = slot, data, pooled

    @property
    def device(self) -> torch.device:
        return next(iter(self.data.values())).device

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys/values (mb, H, T, hd) at ``start``; return all keys/values (mb, H, end, hd)."""
        end = start + k.shape[2]
        d = self.data
        if "k" in d:
            d["k"][:, :, start:end] = k  # in place: the cache is never reallocated
            d["v"][:, :, start:end] = v
            return d["k"][:, :, :end], d["v"][:, :, :end]
        out = []
        for name, new in (("k", k), ("v", v)):
            d[name + "q"][:, :, start:end], d[name + "p"][:, :, start:end] = quantize_kv(new)
            if start:
                old = dequantize_kv(d[name + "q"][:, :, :start], d[name + "p"][:, :, :start], new.dtype)
                new = torch.cat([old, new], dim=2)  # (mb, H, end, hd)
            out.append(new)
        return out[0], out[1]


class OffloadKVCache:
    """KV cache slots for every (layer, micro-batch), placed on tiers by the policy."""

    def __init__(self, *, n_layers: int, rows: list[tuple[int, int]], max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, policy: OffloadPolicy) -> None:
        self.rows, self.t_max, self.dtype, self.device = rows, max_len, dtype, device
        self.direct = policy.direct_io
        self._parent = policy.resolved_offload_dir()
        self.tiers = place_by_size([1] * n_layers, policy.percents("cache"))
        self._dir: str | None = None
        self._pool: dict[tuple, list[dict[str, torch.Tensor]]] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0
        self.slots: list[list[_Slot]] = []
        for j in range(n_layers):
            fd = self._open(j) if self.tiers[j] == "disk" else None
            offset, layer = 0, []
            for r0, r1 in rows:
                parts = self._parts(r1 - r0, n_kv_heads, head_dim, policy.compress_cache, dtype)
                if fd is not None:
                    for p in parts:
                        p.offset = offset
                        offset += -(-p.row_bytes * max_len // ALIGN) * ALIGN
                home = device if self.tiers[j] == "gpu" else torch.device("cpu")
                layer.append(_Slot(parts, max_len, self.tiers[j], home, fd))
            if fd is not None:
                os.ftruncate(fd, offset)
            self.slots.append(layer)

    @staticmethod
    def _parts(mb: int, h: int, hd: int, compress: bool, dtype: torch.dtype) -> list[_Part]:
        if not compress:
            return [_Part("k", (mb, h, hd), dtype), _Part("v", (mb, h, hd), dtype)]
        g = kv_group(hd)
        return [_Part(n + s, (mb, h, hd // 2) if s == "q" else (mb, h, hd // g, 2),
                      torch.uint8 if s == "q" else torch.float16) for n in ("k", "v") for s in ("q", "p")]

    def _open(self, j: int) -> int:
        if self._dir is None:
            self._dir = private_dir(self, self._parent, "flexspeed-kv-")
        fd = os.open(os.path.join(self._dir, f"kv-{j:03d}.bin"), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        weakref.finalize(self, os.close, fd)
        return fd

    @property
    def max_len(self) -> int:
        return self.t_max

    def nbytes(self) -> dict[str, int]:
        """Cache bytes per tier."""
        out = {"gpu": 0, "cpu": 0, "disk": 0}
        for layer in self.slots:
            for s in layer:
                out[s.tier] += sum(p.row_bytes for p in s.parts) * self.t_max
        return out

    # ------------------------------------------------------------------ per-step access

    def load(self, j: int, k: int, start: int) -> _Work:
        """Slot (j, k) ready for a step at ``start``: the prefix ``[0:start]`` read if it is on disk."""
        slot = self.slots[j][k]
        if slot.data is not None:
            return _Work(slot, slot.data, pooled=False)
        key = tuple((p.name, p.row_shape, p.dtype) for p in slot.parts)
        with self._lock:
            free = self._pool.get(key)
            data = free.pop() if free else None
        if data is None:
            data = {p.name: torch.zeros(p.shape(self.t_max), dtype=p.dtype) for p in slot.parts}
        for p in slot.parts:
            n = p.row_bytes * start
            if n:
                rows = torch.empty((start, *p.row_shape), dtype=p.dtype)  # time-major, as in the file
                mv, done = tensor_bytes(rows), 0
                while done < n:
                    done += os.preadv(slot.fd, [mv[done:]], p.offset + done)
                if self.direct:
                    os.posix_fadvise(slot.fd, p.offset, n, os.POSIX_FADV_DONTNEED)
                data[p.name][:, :, :start] = rows.movedim(0, 2)
                self.bytes_read += n
        return _Work(slot, data, pooled=True)

    def commit(self, work: _Work, start: int, end: int) -> None:
        """Write a disk slot's new rows ``[start:end]`` back and recycle its buffers."""
        slot = work.slot
        if not work.pooled:
            return
        for p in slot.parts:
            rows = work.data[p.name][:, :, start:end].movedim(2, 0).contiguous()  # (T, mb, H, ...) as in the file
            mv = tensor_bytes(rows)
            done = 0
            while done < len(mv):
                done += os.pwrite(slot.fd, mv[done:], p.offset + start * p.row_bytes + done)
        key = tuple((p.name, p.row_shape, p.dtype) for p in slot.parts)
        with self._lock:
            self._pool.setdefault(key, []).append(work.data)

    def close(self) -> None:
        """Remove the cache files (memory slots go with the object)."""
        self.slots = []
        self._pool.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)


def attend(work: _Work, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, mask: torch.Tensor | None,
           is_causal: bool, scale: float, cpu_compute: bool) -> torch.Tensor:
    """Attention of new queries q (mb, Hq, T, hd) over the slot's cache plus the new k, v (mb, Hkv, T, hd).

    With an accelerator and a host-side slot, the keys/values move to the device, or, with
    ``cpu_compute`` (``cpu_cache_compute``), the attention runs on the host.
    """
    home = work.device
    if home != k.device:
        k, v = k.to(home), v.to(home)
    keys, values = work.update(start, k, v)  # (mb, Hkv, end, hd)
    if NATIVE_ATTENTION and home == q.device and q.device.type == "cpu":
        out = native.attention(q, keys, values, start, mask, is_causal, scale)  # None where the kernel does not apply
        if out is not None:
            return out
    if q.shape[2] == 1 and home == q.device and "k" in work.data and _decodes_by_matmul(q):
        # the whole contiguous buffers, read in place: a 16-bit CPU matmul copies a [:end] slice first
        keys_all = work.data["k"]
        return decode_attention(q, keys_all, work.data["v"], decode_valid(keys_all.shape[2], start + 1, mask, q.device),
                                scale)
    if home != q.device and cpu_compute:
        return _attention(q.to(home), keys, values, None if mask is None else mask.to(home), is_causal,
                          scale).to(q.device)
    if home != q.device:
        keys, values = keys.to(q.device), values.to(q.device)
    return _attention(q, keys, values, mask, is_causal, scale)


NATIVE_ATTENTION = True
"""On the CPU, attention runs in the native kernel (``native.attention``: the cache read in place, fp32
softmax, the prompt's keys converted once per (row, head)); off, or without a compiler, torch's."""

DECODE_MATMUL = True
"""Decode steps (one query per row) in 16-bit dtypes use two batched matmuls instead of SDPA."""


def _decodes_by_matmul(q: torch.Tensor) -> bool:
    return DECODE_MATMUL and q.dtype in (torch.bfloat16, torch.float16)


def _attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, is_causal: bool,
               scale: float) -> torch.Tensor:
    """q (B, Hq, T, hd) over keys/values (B, Hkv, S, hd) -> (B, Hq, T, hd).

    One new token per row in bf16/fp16: :func:`~flexspeed.inference.attention.decode_attention`
    (two batched matmuls); on CPU 2-3x faster than SDPA's flash kernel, whose per-(row, head)
    blocks are too small to pay off at one query.
    """
    if q.shape[2] == 1 and _decodes_by_matmul(q):
        return decode_attention(q, keys, values, decode_valid(keys.shape[2], keys.shape[2], mask, q.device), scale)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=is_causal, scale=scale,
                                          enable_gqa=q.shape[1] != keys.shape[1])


class ActivationStore:
    """Hidden states of each micro-batch between layers: kept in memory, or on disk by the act percentages."""

    def __init__(self, n_micro: int, policy: OffloadPolicy, device: torch.device) -> None:
        self.tiers = place_by_size([1] * n_micro, policy.percents("act"))
        self.device = device
        self._mem: dict[int, torch.Tensor] = {}
        self._disk: dict[int, tuple[tuple[int, ...], torch.dtype]] = {}
        self._fds: dict[int, int] = {}
        self._dir: str | None = None
        self._parent = policy.resolved_offload_dir()

    def put(self, k: int, h: torch.Tensor) -> None:
        tier = self.tiers[k]
        if tier != "disk":
            self._mem[k] = h if tier == "gpu" else h.to("cpu")
            return
        if k not in self._fds:
            if self._dir is None:
                self._dir = private_dir(self, self._parent, "flexspeed-act-")
            fd = os.open(os.path.join(self._dir, f"act-{k:03d}.bin"), os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
            self._fds[k] = fd
            weakref.finalize(self, os.close, fd)
        t = h.detach().contiguous().cpu()
        mv, done = tensor_bytes(t), 0
        while done < len(mv):
            done += os.pwrite(self._fds[k], mv[done:], done)
        self._disk[k] = (tuple(t.shape), t.dtype)

    def get(self, k: int) -> torch.Tensor:
        if self.tiers[k] != "disk":
            return self._mem[k].to(self.device)
        shape, dtype = self._disk[k]
        t = torch.empty(shape, dtype=dtype)
        mv, done = tensor_bytes(t), 0
        while done < len(mv):
            done += os.preadv(self._fds[k], [mv[done:]], done)
        return t.to(self.device)
