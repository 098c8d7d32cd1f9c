"""CUDA graphs for the fused runner's single-token decode steps.

At small batch a decode step of a 1-3B model on a current GPU is bound by kernel launches, not
by reading the weights: a fused layer is about fifteen kernels, each launched from Python in
several microseconds, while the whole step's weights stream from an H200's memory in about half
a millisecond. Capturing one step (embeddings, every fused layer over the static KV cache, the
head) as a CUDA graph and replaying it makes the step cost its GPU time.

A graph replays on the memory it was captured with, so :class:`DecodeGraphs` owns the KV-cache
buffers: :meth:`DecodeGraphs.cache` hands out the pooled cache for ``(batch, T_max, dtype)``,
the prompt is written into it by the eager prefill, and each following single-token step copies
its inputs (token ids, positions, the cache position, the key mask) into static buffers and
replays. ``T_max`` is rounded up to a multiple of 64 by the runner, so one graph serves
generations of nearby lengths; at most ``keep`` shapes are held (least recently used dropped).

Stale keys and values left in a pooled cache by an earlier generation are never attended: the
step masks every position after the one it writes, and the prefill overwrites the prompt's.
One runner serves one generation at a time (as before: the cache is the runner's).
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from flexspeed.inference.fused import FusedRunner, KVCache

__all__ = ["DecodeGraphs"]


@dataclass
class _Entry:
    """One shape's cache, static inputs, and (after the first step) its graph and output."""

    cache: KVCache
    ids: torch.Tensor  # (B, 1) long
    pos: torch.Tensor  # (B, 1) long
    index: torch.Tensor  # (1,) long: the cache position the step writes
    key_mask: torch.Tensor  # (B, T_max) bool
    graph: torch.cuda.CUDAGraph | None = None
    logits: torch.Tensor | None = None  # (B, 1, V), overwritten by every replay


class DecodeGraphs:
    """Pooled KV caches and one captured decode step per ``(batch, T_max, dtype)``.

    Args:
        runner: the :class:`~flexspeed.inference.fused.FusedRunner` whose steps are captured.
        keep: shapes held at once (each holds its cache and its graph's memory).
    """

    def __init__(self, runner: FusedRunner, keep: int = 2) -> None:
        self.runner, self.keep = runner, keep
        self._entries: OrderedDict[tuple, _Entry] = OrderedDict()
        self.captures = 0
        """Graphs captured so far (a new shape, or a shape dropped and seen again)."""
        self.failed: str | None = None
        """Why capture failed (steps then run eagerly on the same static path), else ``None``."""

    def cache(self, batch: int, max_len: int, dtype: torch.dtype, device: torch.device) -> KVCache:
        """The pooled cache for this shape (made, or taken from the pool and marked most recent)."""
        from flexspeed.inference.fused import KVCache

        key = (batch, max_len, dtype, device)
        entry = self._entries.pop(key, None)
        if entry is None:
            while len(self._entries) >= self.keep:
                self._entries.popitem(last=False)  # its cache and graph memory are released with it
            ks, vs = [], []
            for layer in self.runner.layers:
                shape = (batch, layer.n_kv_heads, max_len, layer.head_dim)
                ks.append(torch.zeros(shape, dtype=dtype, device=device))
                vs.append(torch.zeros(shape, dtype=dtype, device=device))
            entry = _Entry(KVCache(ks, vs), ids=torch.zeros(batch, 1, dtype=torch.long, device=device),
                           pos=torch.zeros(batch, 1, dtype=torch.long, device=device),
                           index=torch.zeros(1, dtype=torch.long, device=device),
                           key_mask=torch.ones(batch, max_len, dtype=torch.bool, device=device))
        self._entries[key] = entry
        return entry.cache

    def owns(self, cache: KVCache) -> bool:
        return any(e.cache is cache for e in self._entries.values())

    def step(self, ids: torch.Tensor, pos: torch.Tensor, cache: KVCache, start: int,
             key_mask: torch.Tensor | None) -> torch.Tensor:
        """Logits (B, 1, V) of tokens ``ids`` (B, 1) written at cache position ``start``.

        The returned tensor is the graph's static output: read it before the next step.
        """
        entry = next(e for e in self._entries.values() if e.cache is cache)
        entry.ids.copy_(ids)
        entry.pos.copy_(pos)
        entry.index.fill_(start)
        if key_mask is None:
            entry.key_mask.fill_(True)
        else:
            n = min(key_mask.shape[1], cache.max_len)
            entry.key_mask[:, :n].copy_(key_mask[:, :n])
            entry.key_mask[:, n:].fill_(True)
        if entry.graph is None and self.failed is None:
            self._capture(entry)
        if entry.graph is None:
            return self.runner.static_body(entry.ids, entry.pos, cache, entry.index, entry.key_mask)
        entry.graph.replay()
        return entry.logits

    def _capture(self, entry: _Entry) -> None:
        """Warm up on a side stream (lazy initialisation stays out of the graph), then capture.

        The warm-up runs the real step: it writes this step's keys and values, which the replay
        that follows writes again, identically.
        """
        runner, dev = self.runner, entry.ids.device
        args = (entry.ids, entry.pos, entry.cache, entry.index, entry.key_mask)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            runner.static_body(*args)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                logits = runner.static_body(*args)
        except RuntimeError as exc:  # an op that cannot be captured (a host sync, a host copy, ...)
            self.failed = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"flexspeed: capturing the decode step as a CUDA graph failed ({self.failed}); decoding "
                          "eagerly. Set get_runner(model).cuda_graphs = False to skip the attempt", stacklevel=3)
            return
        entry.graph, entry.logits = graph, logits
        self.captures += 1
