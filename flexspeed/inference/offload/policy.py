"""The offload policy: where weights, KV cache and activations live, and how work is batched.

:class:`OffloadPolicy` carries FlexLLMGen's knobs under FlexLLMGen's names. Three tiers:

- ``gpu``: the compute device's memory (on a CPU-only machine, RAM);
- ``cpu``: host memory (on a CPU-only machine, also RAM: the ``gpu`` and ``cpu`` tiers are the
  same memory there and only their sum matters);
- ``disk``: files; the rest, ``100 - gpu - cpu`` percent.

Placement is by size, per item: the tensors of each layer are walked in order and each goes to
the tier in whose band the *midpoint* of its cumulative byte share falls (a layer with
``w_gpu_percent=10`` keeps about its first tenth resident). KV-cache layers and activation
micro-batches are placed the same way, each item the size of one layer's cache or one
micro-batch's hidden state.

Everything here is plain data: no torch, so the config module can import it cheaply.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["OffloadPolicy", "TIERS", "tier_of", "place_by_size", "parse_bytes"]

TIERS: tuple[str, str, str] = ("gpu", "cpu", "disk")
_PCT = dict(ge=0.0, le=100.0)


class OffloadPolicy(BaseModel):
    """``offload``: FlexLLMGen's placement policy and block schedule (see ``docs/offload.md``)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, use_attribute_docstrings=True)

    w_gpu_percent: float = Field(default=100.0, **_PCT)
    """Share of each layer's weight bytes kept in the compute device's memory."""
    w_cpu_percent: float = Field(default=0.0, **_PCT)
    """Share of each layer's weight bytes kept in host memory (the rest is read from disk)."""
    cache_gpu_percent: float = Field(default=100.0, **_PCT)
    """Share of the KV-cache layers kept in the compute device's memory."""
    cache_cpu_percent: float = Field(default=0.0, **_PCT)
    """Share of the KV-cache layers kept in host memory (the rest in files under offload_dir)."""
    act_gpu_percent: float = Field(default=100.0, **_PCT)
    """Share of the micro-batches whose hidden states stay in the compute device's memory."""
    act_cpu_percent: float = Field(default=0.0, **_PCT)
    """Share of the micro-batches whose hidden states stay in host memory (the rest on disk)."""
    gpu_batch_size: int | None = Field(default=None, ge=1)
    """Rows per micro-batch; ``None`` splits the batch given to ``generate`` into num_gpu_batches parts."""
    num_gpu_batches: int = Field(default=1, ge=1)
    """Micro-batches per block: a layer's weights are loaded once for all of them (zig-zag order)."""
    overlap: bool = True
    """Read the next layer's weights (and the next micro-batch's cache) on background threads."""
    pin_weight: bool = True
    """With an accelerator, keep the cpu-tier weights in pinned memory (ignored on CPU-only machines)."""
    cpu_cache_compute: bool = False
    """With an accelerator, run attention over cpu-tier cache on the CPU instead of moving the cache."""
    compress_weight: bool = False
    """Store weight matrices as int4 (group 64, asymmetric, two values per byte)."""
    compress_cache: bool = False
    """Store the KV cache as int4 (groups of 64 along the head dimension, asymmetric)."""
    offload_dir: str | None = None
    """Directory for disk-tier files; ``None``: a temporary directory removed when the runner closes."""
    direct_io: bool = False
    """True-disk mode: disk reads bypass the page cache (O_DIRECT, else POSIX_FADV_DONTNEED after each read)."""
    manage_host_heap: bool = True
    """On a CPU (glibc): serve large temporaries from the C heap and give its free pages back after every step."""

    @model_validator(mode="after")
    def _sums(self) -> OffloadPolicy:
        for kind in ("w", "cache", "act"):
            gpu, cpu = getattr(self, f"{kind}_gpu_percent"), getattr(self, f"{kind}_cpu_percent")
            if gpu + cpu > 100.0 + 1e-9:
                raise ValueError(f"{kind}_gpu_percent={gpu:g} plus {kind}_cpu_percent={cpu:g} is {gpu + cpu:g} > 100; "
                                 f"the disk share is 100 minus their sum, so lower one of them")
        return self

    # ------------------------------------------------------------------ derived views

    @property
    def w_disk_percent(self) -> float:
        """Share of weight bytes read from disk."""
        return max(0.0, 100.0 - self.w_gpu_percent - self.w_cpu_percent)

    @property
    def cache_disk_percent(self) -> float:
        """Share of KV-cache layers kept on disk."""
        return max(0.0, 100.0 - self.cache_gpu_percent - self.cache_cpu_percent)

    @property
    def act_disk_percent(self) -> float:
        """Share of micro-batch hidden states kept on disk."""
        return max(0.0, 100.0 - self.act_gpu_percent - self.act_cpu_percent)

    def percents(self, kind: str) -> tuple[float, float, float]:
        """``(gpu, cpu, disk)`` percentages for ``"w"``, ``"cache"`` or ``"act"``."""
        gpu, cpu = getattr(self, f"{kind}_gpu_percent"), getattr(self, f"{kind}_cpu_percent")
        return gpu, cpu, max(0.0, 100.0 - gpu - cpu)

    @property
    def percent(self) -> tuple[float, ...]:
        """The six numbers of FlexLLMGen's ``--percent`` flag."""
        return (self.w_gpu_percent, self.w_cpu_percent, self.cache_gpu_percent, self.cache_cpu_percent,
                self.act_gpu_percent, self.act_cpu_percent)

    @classmethod
    def from_percent(cls, percent: Sequence[float], **kwargs: Any) -> OffloadPolicy:
        """Build from FlexLLMGen's six ``--percent`` numbers (weights, cache, activations; gpu then cpu).

        Raises:
            ValueError: not six numbers.
        """
        if len(percent) != 6:
            raise ValueError(f"percent={list(percent)!r} must be six numbers: w_gpu w_cpu cache_gpu cache_cpu "
                             "act_gpu act_cpu (e.g. 10 0 100 0 100 0)")
        names = ("w_gpu_percent", "w_cpu_percent", "cache_gpu_percent", "cache_cpu_percent", "act_gpu_percent",
                 "act_cpu_percent")
        return cls(**{n: float(p) for n, p in zip(names, percent)}, **kwargs)

    def describe(self) -> str:
        """One line: ``percent=10/0/100/0/100/0 gpu_batch_size=8 num_gpu_batches=4 ...``."""
        pct = "/".join(f"{p:g}" for p in self.percent)
        flags = [name for name in ("compress_weight", "compress_cache", "direct_io", "cpu_cache_compute")
                 if getattr(self, name)]
        parts = [f"percent={pct}", f"gpu_batch_size={self.gpu_batch_size or 'auto'}",
                 f"num_gpu_batches={self.num_gpu_batches}", f"overlap={self.overlap}"]
        return " ".join(parts + flags)

    def resolved_offload_dir(self) -> str | None:
        """``offload_dir`` with ``~`` and variables expanded (``None`` stays ``None``)."""
        return os.path.abspath(os.path.expandvars(os.path.expanduser(self.offload_dir))) if self.offload_dir else None


def tier_of(mid_percent: float, percents: Sequence[float]) -> str:
    """The tier whose cumulative band ``[lo, hi)`` holds ``mid_percent`` (0-100).

    ``percents`` is ``(gpu, cpu, disk)``; an item past the last band (rounding) goes to the last
    tier with a non-zero share.
    """
    edge = 0.0
    for tier, pct in zip(TIERS, percents):
        edge += pct
        if pct > 0 and mid_percent < edge:
            return tier
    return next(t for t, p in zip(reversed(TIERS), reversed(tuple(percents))) if p > 0)


def place_by_size(sizes: Sequence[int], percents: Sequence[float]) -> list[str]:
    """Tier of each item, by the midpoint of its cumulative share of ``sum(sizes)``.

    Items of size 0 count as one byte, so every item gets a tier.
    """
    sizes = [max(1, int(s)) for s in sizes]
    total, seen, out = float(sum(sizes)), 0, []
    for s in sizes:
        out.append(tier_of(100.0 * (seen + s / 2) / total, percents))
        seen += s
    return out


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}


def parse_bytes(text: str | int | float, key: str = "mem_budget") -> int:
    """``"4GB"``, ``"512MiB"``, ``"1.5g"``, ``4096`` -> bytes (binary units: 1 GB = 2**30 bytes).

    Raises:
        ValueError: the text is not a size; the message names ``key``.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
        unit = ""
    else:
        s = str(text).strip().lower().replace(" ", "")
        num = s.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = s[len(num):]
        try:
            value = float(num)
        except ValueError:
            value, unit = -1.0, "?"
    if unit not in _UNITS or value <= 0:
        raise ValueError(f"{key}={text!r} is not a memory size; write e.g. 4GB, 512MB or 1.5GiB")
    return int(value * _UNITS[unit])
