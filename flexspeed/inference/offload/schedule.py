"""The block schedule: layers outer, micro-batches inner, reads one step ahead on background threads.

One forward step (the prompt, or one new token for every row) walks the layers in order: the
embedding, every decoder layer, the head. A layer's weights are fetched **once** and used by
every micro-batch of the block before the next layer's (FlexLLMGen's zig-zag order), so the
bytes read per step do not grow with the number of micro-batches. With ``overlap``:

- a *weight* thread reads layer ``j + 1`` while layer ``j`` computes; while the head computes it
  reads the embedding and the first decoder layer of the next step;
- a *cache* thread reads the KV-cache prefix of the next (layer, micro-batch) from disk while
  the current one computes, and writes new cache rows back.

Without ``overlap`` the same reads run inline, in the same order. Both threads spend their time
in system calls and copies that release the GIL.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from flexspeed.inference.attention import StepContext
from flexspeed.inference.offload.arch import Arch
from flexspeed.inference.offload.cache import ActivationStore, OffloadKVCache, attend
from flexspeed.inference.offload.policy import OffloadPolicy
from flexspeed.inference.offload.store import Fetched, WeightStore

__all__ = ["BlockSchedule", "Prefetcher"]


class Prefetcher:
    """A one-thread executor, or inline execution when overlap is off (same interface)."""

    def __init__(self, enabled: bool, name: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"flexspeed-{name}") if enabled else None

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        if self._pool is not None:
            return self._pool.submit(fn, *args)
        fut: Future = Future()
        fut.set_result(fn(*args))
        return fut

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


class BlockSchedule:
    """Runs forward steps over a :class:`WeightStore` and an :class:`OffloadKVCache`."""

    def __init__(self, arch: Arch, store: WeightStore, policy: OffloadPolicy, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.arch, self.store, self.policy, self.device, self.dtype = arch, store, policy, device, dtype
        self._weights = Prefetcher(policy.overlap, "weights")
        self._cache = Prefetcher(policy.overlap, "cache")
        self._pending: dict[int, Future] = {}
        self.stats: dict[str, float] = {"steps": 0, "weight_wait_s": 0.0, "cache_wait_s": 0.0, "layer_loads": 0}

    # ------------------------------------------------------------------ fetching

    def _fetch(self, j: int) -> Future:
        """Layer ``j``'s fetch: one already in flight, or a new one."""
        if j in self._pending:
            return self._pending.pop(j)
        self.stats["layer_loads"] += 1
        return self._weights.submit(self.store.fetch, j)

    def _prefetch(self, j: int) -> None:
        if self.policy.overlap and j not in self._pending:
            self.stats["layer_loads"] += 1
            self._pending[j] = self._weights.submit(self.store.fetch, j)

    def _wait(self, fut: Future, stat: str) -> Any:
        t0 = time.perf_counter()
        out = fut.result()
        self.stats[stat] += time.perf_counter() - t0
        return out

    def _load_cache(self, cache: OffloadKVCache, j: int, k: int, start: int) -> Future:
        if cache.slots[j][k].data is not None:  # memory slot: nothing to read
            fut: Future = Future()
            fut.set_result(cache.load(j, k, start))
            return fut
        return self._cache.submit(cache.load, j, k, start)

    # ------------------------------------------------------------------ one step

    def step(self, ids: torch.Tensor, pos: torch.Tensor, rows: list[tuple[int, int]], ctxs: list[StepContext],
             cache: OffloadKVCache, start: int, last_only: bool) -> torch.Tensor:
        """Logits (B, 1 or T, V) for tokens ids (B, T) at cache positions ``start:start+T``."""
        n_layers, L = len(self.arch.layers), self.arch.n_layers
        acts = ActivationStore(len(rows), self.policy, self.device)
        end = start + ids.shape[1]
        logits: list[torch.Tensor] = []
        fut = self._fetch(0)
        cache_fut: Future | None = None
        for j in range(n_layers):
            fetched: Fetched = self._wait(fut, "weight_wait_s")
            w = fetched.ready()
            if j + 1 < n_layers:
                fut = self._fetch(j + 1)
            else:  # the head computes: read the next step's first layers meanwhile
                self._prefetch(0)
                self._prefetch(1)
            kind = self.arch.layers[j].kind
            if kind == "embed":
                for k, (r0, r1) in enumerate(rows):
                    acts.put(k, self.arch.embed(w, ids[r0:r1], pos[r0:r1], self.dtype))  # (mb, T, C)
                cache_fut = self._load_cache(cache, 0, 0, start) if L else None
            elif kind == "decoder":
                d = j - 1
                for k in range(len(rows)):
                    work = self._wait(cache_fut, "cache_wait_s")
                    if k + 1 < len(rows):
                        cache_fut = self._load_cache(cache, d, k + 1, start)
                    elif d + 1 < L:
                        cache_fut = self._load_cache(cache, d + 1, 0, start)
                    ctx, scale, cpu = ctxs[k], self.arch.scale(d), self.policy.cpu_cache_compute

                    def att(q: torch.Tensor, kk: torch.Tensor, vv: torch.Tensor, work: Any = work, ctx: StepContext = ctx,
                            scale: float = scale, cpu: bool = cpu) -> torch.Tensor:
                        return attend(work, q, kk, vv, ctx.start, ctx.mask, ctx.is_causal, scale, cpu)

                    acts.put(k, self.arch.layer(w, acts.get(k), ctx, d, att))
                    if work.pooled:
                        self._cache.submit(cache.commit, work, start, end)
            else:
                for k in range(len(rows)):
                    x = acts.get(k)
                    logits.append(self.arch.head(w, x[:, -1:] if last_only else x))  # (mb, 1|T, V)
            self.store.release(fetched)
        self.stats["steps"] += 1
        return torch.cat(logits) if len(logits) > 1 else logits[0]

    def drain(self) -> None:
        """Finish and give back fetches made ahead for a next step that will not come."""
        for fut in self._pending.values():
            self.store.release(fut.result())
        self._pending.clear()

    def close(self) -> None:
        self.drain()
        self._weights.close()
        self._cache.close()
