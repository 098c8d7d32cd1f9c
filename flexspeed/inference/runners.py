"""The decode runner: what produces a generation's logits, chosen once, in one place.

A :class:`DecodeRunner` owns the order of one forward step (embeddings, decoder layers, head)
over a KV cache it allocates itself. ``generate`` drives any runner the same way: one prefill
step over the prompt, then one step per new token; a runner that can run the rest of a greedy
generation in one call (the native C loop) says so by returning a count from :meth:`greedy`,
every other runner returns ``None`` there.

:func:`select_runner` makes every path decision and records why:

========================  ====================================================================
runner                    when
========================  ====================================================================
offload                   ``init_inference(..., offload=...)``: tiered weights, its own cache
fused (injected)          ``replace_with_kernel_inject=True`` / ``inject_kernels``: static KV
                          cache; single-token steps on the native C kernel (CPU), a CUDA graph
                          (CUDA) or ``torch.compile`` (``compile_decode``), else eager torch
fused (shadow)            un-injected flexspeed GPT; un-injected HF families of
                          :mod:`~flexspeed.inference.families` on a CPU with the native kernel
hf-cache                  any other HF causal LM: its own ``forward`` with a ``DynamicCache``
recompute                 anything else (``model(ids) -> logits``), or ``use_cache=False``
========================  ====================================================================

The runner of a model is held by whoever built it (the :class:`InferenceEngine`, which passes
it to ``generate``); nothing is written onto the user's model. :func:`inject_kernels` and the
offload builder, which return the model rather than an engine, record the runner they built in
a weak table owned by this module (:func:`remember`), so ``generate(model, ...)`` and
``kernels.get_runner(model)`` find it; the entry disappears with the model.
"""

from __future__ import annotations

import inspect
import weakref
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn as nn

__all__ = ["DecodeRunner", "RunnerChoice", "select_runner", "remember", "remembered", "HFCacheRunner", "TokenCache",
           "RecomputeRunner"]


@runtime_checkable
class DecodeRunner(Protocol):
    """What ``generate`` (and the serving batchers) drive."""

    @property
    def max_positions(self) -> int | None:
        """Most positions the model embeds (``None``: no learned limit)."""

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> Any:
        """A fresh cache for ``batch`` rows of up to ``max_len`` tokens (may round ``max_len`` up)."""

    def step(self, ids: torch.Tensor, pos: torch.Tensor, cache: Any, start: int,
             key_mask: torch.Tensor | None = None, last_only: bool = True) -> torch.Tensor:
        """Logits (B, 1, V) (``last_only``) or (B, T, V) of tokens ``ids`` (B, T) at positions
        ``pos`` (B, T), written at cache columns ``start:start+T``; ``key_mask`` (B, >= start+T)
        is False at left padding, ``None`` when no row is padded."""

    def greedy(self, cache: Any, key_mask: torch.Tensor | None, seq: torch.Tensor, T: int, pos0: torch.Tensor,
               min_new: int, eos: list[int], pad: int | None, done: list[bool]) -> int | None:
        """The rest of a greedy generation in one call (new columns written into ``seq``), or ``None``."""

    def describe(self) -> str:
        """One line: which runner, and how its single-token steps run."""


@dataclass
class RunnerChoice:
    """The runner :func:`select_runner` picked and why (shown by ``InferenceEngine.describe``)."""

    runner: DecodeRunner
    why: str

    def describe(self) -> str:
        return f"{self.runner.describe()} ({self.why})"


_HELD: weakref.WeakKeyDictionary[nn.Module, DecodeRunner] = weakref.WeakKeyDictionary()


def remember(model: nn.Module, runner: DecodeRunner) -> None:
    """Record the runner flexspeed built for ``model`` (injection, offload); kept while the model lives."""
    _HELD[model] = runner


def remembered(model: nn.Module) -> DecodeRunner | None:
    """The runner recorded for ``model`` by :func:`remember`, or ``None``."""
    try:
        return _HELD.get(model)
    except TypeError:  # an unhashable module
        return None


def _is_hf(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "can_generate") and hasattr(model, "get_input_embeddings")


def select_runner(model: nn.Module, config: Any = None, *, use_cache: bool = True,
                  tp_group: Any = None, device: torch.device | None = None) -> RunnerChoice:
    """The runner for ``model``, and why; every decode-path decision is made here.

    Args:
        model: the (possibly injected, sharded, quantized) model.
        config: the :class:`~flexspeed.inference.config.InferenceConfig` it was prepared with, or
            ``None`` (a bare ``generate(model, ...)`` call).
        use_cache: ``False`` forces recomputation of the whole sequence every step (for checking).
        tp_group: the tensor-parallel group of a sharded model (the native step sums the ranks'
            partial products itself).
        device: where an offload runner computes (with ``config.offload``).
    """
    from flexspeed.inference.fused import FusedRunner

    if config is not None and getattr(config, "offload", None) is not None:
        from flexspeed.inference.offload.runner import build_offload_runner

        runner = build_offload_runner(model, config, device or torch.device("cpu"))
        return RunnerChoice(runner, "offload=... in the config")
    held = remembered(model)
    if held is not None and use_cache:
        if isinstance(held, FusedRunner) and tp_group is not None:
            held.tp_group = tp_group
        return RunnerChoice(held, "built by " + ("offloading" if not isinstance(held, FusedRunner)
                                                  else "kernel injection"))
    if not use_cache:
        if _is_hf(model):
            return RunnerChoice(HFCacheRunner(model, use_cache=False), "use_cache=False")
        return RunnerChoice(RecomputeRunner(model), "use_cache=False")
    from flexspeed.inference.kernels import injected_runner, shadow_runner

    runner = injected_runner(model)
    if runner is not None:  # fused layers in the tree (a copy of an injected model, say)
        runner.tp_group = tp_group
        remember(model, runner)
        return RunnerChoice(runner, "the model's blocks are fused layers")
    runner, why_not = shadow_runner(model)
    if runner is not None:
        runner.tp_group = tp_group
        return RunnerChoice(runner, "un-injected: fused wrappers over the model's own modules")
    if _is_hf(model):
        return RunnerChoice(HFCacheRunner(model), f"no fused runner: {why_not}")
    return RunnerChoice(RecomputeRunner(model), f"no fused runner ({why_not}) and no cache API")


def _logits_of(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    return out[0]


@dataclass
class TokenCache:
    """What a runner without a KV cache keeps: every token so far and its position."""

    ids: torch.Tensor  # (B, T_max) long
    pos: torch.Tensor  # (B, T_max) long
    past: Any = None  # HF's DynamicCache, when it keeps one

    @property
    def max_len(self) -> int:
        return self.ids.shape[1]


class HFCacheRunner:
    """An HF causal LM's own ``forward`` with a ``DynamicCache`` (or, without cache, the whole sequence)."""

    def __init__(self, model: nn.Module, use_cache: bool = True) -> None:
        self.model, self.use_cache = model, use_cache
        params = inspect.signature(model.forward).parameters
        self._keep = "logits_to_keep" in params
        self._cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers >= 5.24: ``cache``

    @property
    def max_positions(self) -> int | None:
        return None

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> TokenCache:
        from transformers import DynamicCache

        dev = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        past = DynamicCache(config=self.model.config) if self.use_cache else None
        return TokenCache(torch.zeros(batch, max_len, dtype=torch.long, device=dev),
                           torch.zeros(batch, max_len, dtype=torch.long, device=dev), past)

    def step(self, ids: torch.Tensor, pos: torch.Tensor, cache: TokenCache, start: int,
             key_mask: torch.Tensor | None = None, last_only: bool = True) -> torch.Tensor:
        B, T = ids.shape
        end = start + T
        cache.ids[:, start:end], cache.pos[:, start:end] = ids, pos
        mask = (torch.ones(B, end, dtype=torch.long, device=ids.device) if key_mask is None
                else key_mask[:, :end].long().contiguous())
        lo = start if self.use_cache else 0
        keep = {"logits_to_keep": 1} if self._keep and last_only else {}
        out = self.model(input_ids=cache.ids[:, lo:end], attention_mask=mask, position_ids=cache.pos[:, lo:end],
                         use_cache=self.use_cache, **{self._cache_kw: cache.past}, **keep)
        logits = _logits_of(out)
        return logits[:, -1:] if last_only else logits[:, -T:]

    __call__ = step

    def greedy(self, *args: Any) -> None:
        return None

    def describe(self) -> str:
        return "hf-cache runner (the model's forward, DynamicCache)" if self.use_cache else \
            "hf runner without cache (whole sequence every step)"


class RecomputeRunner:
    """Any ``model(ids) -> logits`` module: the whole sequence is run again for every new token.

    Such a module takes no mask, so rows with left padding are run one at a time on their
    unpadded tokens (O(T^2), for checking and for models without a cache API).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    @property
    def max_positions(self) -> int | None:
        return None

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> TokenCache:
        dev = next((p.device for p in self.model.parameters()), torch.device("cpu"))
        return TokenCache(torch.zeros(batch, max_len, dtype=torch.long, device=dev),
                           torch.zeros(batch, max_len, dtype=torch.long, device=dev))

    def step(self, ids: torch.Tensor, pos: torch.Tensor, cache: TokenCache, start: int,
             key_mask: torch.Tensor | None = None, last_only: bool = True) -> torch.Tensor:
        end = start + ids.shape[1]
        cache.ids[:, start:end] = ids
        if key_mask is None:
            out = _logits_of(self.model(cache.ids[:, :end]))
            return out[:, -1:] if last_only else out[:, start:end]
        firsts = (~key_mask[:, :end]).sum(dim=1).tolist()  # left padding: the first real token of each row
        rows = [_logits_of(self.model(cache.ids[b:b + 1, s:end])) for b, s in enumerate(firsts)]
        if last_only:
            return torch.cat([r[:, -1:] for r in rows])
        if all(r.shape[1] >= end - start for r in rows):
            return torch.cat([r[:, -(end - start):] for r in rows])
        raise ValueError("a padded row's new tokens reach into its padding; run recompute steps one token at a time")

    __call__ = step

    def greedy(self, *args: Any) -> None:
        return None

    def describe(self) -> str:
        return "recompute runner (the whole sequence every step)"
