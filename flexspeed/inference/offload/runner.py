"""The offload runner: what ``init_inference(..., offload=...)`` builds instead of the in-memory path.

:class:`OffloadRunner` has the interface of the fused runner of ``kernels.py``
(``new_cache``, ``runner(ids, pos, cache, start, key_mask)``, ``max_positions``) and is recorded for
the model (``runners.remember``), so :func:`flexspeed.inference.generation.generate` (and the engine's
``generate``) drive it unchanged: left padding, sampling, eos handling all come from there.

Where the weights come from:

- ``checkpoint=`` a safetensors file or folder (or ``.pt``/``.bin``): loaded straight into the
  policy's tiers; the model may live on the meta device and is never filled;
- no checkpoint: the model's own tensors. Afterwards the model's parameters are replaced by
  meta tensors (the store holds what is resident; the rest went to ``offload_dir``), so the
  model object stops holding memory; compute goes through the engine.

:class:`OffloadedLM` is a parameter-free stand-in built from a folder's ``config.json``, for
when no model class is at hand (the ``flexspeed generate`` command uses it).
"""

from __future__ import annotations

import json
import math
import os
import time
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from flexspeed.config.errors import ConfigError
from flexspeed.inference.attention import StepContext, step_context
from flexspeed.inference.offload import heap
from flexspeed.inference.offload.arch import Arch, arch_from_config, config_of_module
from flexspeed.inference.offload.cache import OffloadKVCache
from flexspeed.inference.offload.policy import OffloadPolicy
from flexspeed.inference.offload.schedule import BlockSchedule
from flexspeed.inference.offload.store import TensorSource, WeightStore

__all__ = ["OffloadRunner", "OffloadedLM", "build_offload_runner", "get_offload_runner"]

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, UserWarning, stacklevel=3)


class OffloadRunner:
    """Embedding -> decoder layers -> head over tiered weights, KV cache and activations.

    Attributes:
        arch: the architecture.
        store: the :class:`~flexspeed.inference.offload.store.WeightStore`.
        policy: the :class:`~flexspeed.inference.offload.policy.OffloadPolicy`.
        on_step: called after each forward step with the step's wall time (progress bars).
        call_seconds: wall time of every step since the last :meth:`reset_stats`.
    """

    def __init__(self, arch: Arch, store: WeightStore, policy: OffloadPolicy, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.arch, self.store, self.policy, self.device, self.dtype = arch, store, policy, device, dtype
        self.schedule = BlockSchedule(arch, store, policy, device, dtype)
        self._manage_heap = policy.manage_host_heap and device.type == "cpu"
        if self._manage_heap:
            heap.serve_large_from_heap()
        self.on_step: Callable[[float], None] | None = None
        self.call_seconds: list[float] = []

    @property
    def max_positions(self) -> int | None:
        return self.arch.max_positions

    def micro_batches(self, batch: int) -> list[tuple[int, int]]:
        """Row ranges of the micro-batches a batch of ``batch`` rows is split into."""
        mb = self.policy.gpu_batch_size or math.ceil(batch / self.policy.num_gpu_batches)
        rows = [(r, min(r + mb, batch)) for r in range(0, batch, mb)]
        if self.policy.gpu_batch_size and len(rows) > self.policy.num_gpu_batches:
            _warn_once("block", f"offload: batch {batch} is more than gpu_batch_size x num_gpu_batches = "
                                f"{self.policy.gpu_batch_size} x {self.policy.num_gpu_batches}; it runs as {len(rows)} "
                                "micro-batches sharing each weight load")
        return rows

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> OffloadKVCache:
        """A KV cache for ``batch`` rows of up to ``max_len`` tokens, placed by the cache percentages."""
        return OffloadKVCache(n_layers=self.arch.n_layers, rows=self.micro_batches(batch), max_len=max_len,
                              n_kv_heads=self.arch.n_kv_heads, head_dim=self.arch.head_dim, dtype=dtype or self.dtype,
                              device=self.device, policy=self.policy)

    def _ctx(self, pos: torch.Tensor, key_mask: torch.Tensor | None, start: int, T: int) -> StepContext:
        return step_context(T, start, key_mask, pos.device, self.arch.rope(pos, self.dtype))

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, cache: OffloadKVCache, start: int,
                key_mask: torch.Tensor | None = None, last_only: bool = True) -> torch.Tensor:
        """Logits for tokens ``ids`` (B, T) at cache positions ``start:start+T``.

        Returns:
            (B, 1, V) logits of the last token with ``last_only``, else (B, T, V).
        """
        t0 = time.perf_counter()
        rows, T = cache.rows, ids.shape[1]
        if rows[-1][1] != ids.shape[0]:
            raise ValueError(f"the cache was made for {rows[-1][1]} rows but ids has {ids.shape[0]}; "
                             "make a new cache with new_cache(batch, max_len)")
        ctxs = [self._ctx(pos[r0:r1], None if key_mask is None else key_mask[r0:r1], start, T) for r0, r1 in rows]
        with torch.inference_mode():
            out = self.schedule.step(ids, pos, rows, ctxs, cache, start, last_only)
        if self._manage_heap:
            heap.release_free_heap()
        dt = time.perf_counter() - t0
        self.call_seconds.append(dt)
        if self.on_step is not None:
            self.on_step(dt)
        return out

    __call__ = step = forward

    def greedy(self, *args: Any) -> None:
        """No whole-loop greedy decoding: every step streams the weights (see ``DecodeRunner``)."""
        return None

    def describe(self) -> str:
        return f"offload runner ({self.arch.family}, {self.policy.describe()})"

    def logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Full-sequence logits (B, T, V), as a model's forward gives them (left padding allowed)."""
        B, T = input_ids.shape
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)
        pos = (mask.long().cumsum(1) - 1).clamp_(min=0)  # (B, T)
        key_mask = None if bool(mask.all()) else mask.bool()
        cache = self.new_cache(B, T)
        try:
            out = self.forward(input_ids, pos, cache, 0, key_mask, last_only=False)
        finally:
            cache.close()
            self.schedule.drain()
        return out

    def summary(self) -> dict[str, Any]:
        """Placement and counters: bytes per tier, resident fraction, read method, waits."""
        tiers = self.store.tier_bytes()
        read, secs = self.store.disk_stats()
        return {"policy": self.policy.describe(), "weight_bytes": tiers,
                "resident_fraction": self.store.resident_fraction, "read_method": self.store.read_method,
                "page_cache": dict(self.store.page_cache), "direct_bytes_read": read, "direct_read_seconds": secs, **self.schedule.stats}

    def reset_stats(self) -> None:
        self.call_seconds.clear()
        for key in self.schedule.stats:
            self.schedule.stats[key] = 0

    def close(self) -> None:
        """Stop the background threads, close files, remove offload files."""
        self.schedule.close()
        self.store.close()


def get_offload_runner(model: nn.Module) -> OffloadRunner | None:
    """The offload runner attached to ``model`` by ``init_inference(..., offload=...)``, or ``None``."""
    from flexspeed.inference.runners import remembered

    runner = remembered(model)
    return runner if isinstance(runner, OffloadRunner) else None


class OffloadedLM(nn.Module):
    """A parameter-free model stand-in: a ``config.json`` and nothing else (weights stay in the checkpoint).

    ``flexspeed.init_inference(OffloadedLM.from_pretrained(folder), checkpoint=folder, offload=...)``
    needs neither the model's class nor ``transformers``.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = types.SimpleNamespace(**config)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> OffloadedLM:
        """Read ``path/config.json`` (a Hugging Face model folder).

        Raises:
            ConfigError: no config.json there.
        """
        cfg_path = os.path.join(os.fspath(path), "config.json")
        if not os.path.isfile(cfg_path):
            raise ConfigError(f"{cfg_path!r} does not exist; --model must be a Hugging Face model folder with a "
                              "config.json and safetensors weights", key="model")
        with open(cfg_path) as f:
            return cls(json.load(f))

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        runner = get_offload_runner(self)
        if runner is None:
            raise RuntimeError("OffloadedLM holds no weights; wrap it with flexspeed.init_inference(model, "
                               "checkpoint=folder, offload=...) and call the engine")
        return runner.logits(*args, **kwargs)


# ------------------------------------------------------------------------------ building

def _check_compat(config: Any) -> None:
    if config.tp_size > 1:
        raise ConfigError(f"offload with tensor_parallel.tp_size={config.tp_size} is not supported; use tp_size=1 "
                          "(offloading streams one copy of the weights) or drop offload", key="offload")
    if config.quantize_bits is not None:
        key = "dtype" if config.dtype == "int8" else "quant.enabled"
        raise ConfigError(f"{key} quantizes weights in memory, but offload stores them itself; use offload="
                          "{'compress_weight': True} (int4, group 64) and drop the quantization setting", key=key)
    if config.enable_cuda_graph:
        raise ConfigError("enable_cuda_graph=True cannot capture offloaded generation (its reads change every "
                          "step); set enable_cuda_graph=False", key="enable_cuda_graph")
    if config.replace_with_kernel_inject:
        _warn_once("inject", "init_inference: replace_with_kernel_inject is ignored with offload; the offload "
                             "runner computes each layer with its own fused per-layer forward")


def _source_dtype(source: TensorSource) -> torch.dtype:
    for span in source.spans.values():
        if span.dtype.is_floating_point:
            return span.dtype
    for t in source.tensors.values():
        if t.is_floating_point():
            return t.dtype
    return torch.float32


def _release_module(model: nn.Module) -> None:
    """Swap the model's tensors for meta tensors: the store owns the weights now."""
    for mod in model.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and not p.is_meta:
                mod._parameters[name] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                                     requires_grad=False)
        for name, b in list(mod._buffers.items()):
            if b is not None and not b.is_meta and name not in mod._non_persistent_buffers_set:
                mod._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device="meta")


def build_offload_runner(model: nn.Module, config: Any, device: torch.device) -> OffloadRunner:
    """Build the offload runner for ``model`` under ``config`` (an ``InferenceConfig`` with ``offload`` set).

    Args:
        model: flexspeed GPT, HF OPT/Llama/GPT-2 causal LM (real or meta weights), or :class:`OffloadedLM`.
        config: the validated inference config; ``config.offload`` is the policy.
        device: the compute device.
    Returns:
        the runner, also attached to ``model`` (``get_offload_runner(model)``).
    Raises:
        ConfigError: an option that cannot combine with offloading, an unsupported model, or
            weights that do not match the model's config.
    """
    from flexspeed.inference.loading import checkpoint_files

    policy: OffloadPolicy = config.offload
    _check_compat(config)
    arch = arch_from_config(config_of_module(model))
    if config.checkpoint is not None:
        source = TensorSource.from_files(checkpoint_files(config.checkpoint, config.base_dir))
    else:
        source = TensorSource.from_module(model)
    dtype = config.compute_dtype or _source_dtype(source)
    store = WeightStore(arch, source, policy, device, dtype)
    if config.checkpoint is None:
        _release_module(model)
    del source
    runner = OffloadRunner(arch, store, policy, device, dtype)
    from flexspeed.inference.runners import remember

    remember(model, runner)  # flexspeed's weak table: nothing is written onto the model
    return runner
