"""The fused runner: embeddings -> fused layers -> final norm -> ``lm_head`` over a static KV cache.

Split from :mod:`flexspeed.inference.kernels` (which builds the fused layers and re-exports
these names). The runner owns the order of a step and calls one layer at a time, so a later pass
can stream weights per layer; single-token steps go to the native decode kernel
(:mod:`flexspeed.inference.native_decoder`) where it applies, else to ``torch.compile`` when
``compile_decode`` is set, else to the layers' torch code.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from flexspeed.inference.attention import StepContext, step_context, window_keys
from flexspeed.inference.packed import onednn_linear

if TYPE_CHECKING:
    from flexspeed.inference.kernels import FusedDecoderLayer, ModelArch

__all__ = ["FusedRunner", "KVCache", "project"]


@dataclass
class KVCache:
    """Per-layer key/value buffers ``(B, H_kv, T_max, head_dim)``, preallocated, written in place."""

    k: list[torch.Tensor]
    v: list[torch.Tensor]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2] if self.k else 0


def project(mod: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``mod(x)``; under ``torch.compile`` a one-row ``nn.Linear`` becomes a fused row-dot reduction.

    For one row, Inductor's generated reduction streams the weight at close to memory bandwidth,
    where the BLAS GEMV it would otherwise call reaches about half of it.
    """
    if torch.compiler.is_compiling() and type(mod) is nn.Linear and x.numel() == x.shape[-1]:
        y = (mod.weight.float() * x.reshape(1, -1).float()).sum(-1).to(x.dtype)  # (N,)
        if mod.bias is not None:
            y = y + mod.bias
        return y.view(*x.shape[:-1], -1)
    weight = _plain_weight(mod, x) if x.numel() >= PROMPT_ROWS * x.shape[-1] else None
    if (weight is not None and not torch.compiler.is_compiling() and not mod._forward_pre_hooks
            and not mod._forward_hooks_with_kwargs and not _global_hooks()):
        y = onednn_linear(x, weight, mod.bias)  # a prompt over plain weights (the native kernel's)
        if y is not None:
            for hook in mod._forward_hooks.values():  # e.g. tensor parallelism's all-reduce, as mod(x) runs it
                out = hook(mod, (x,), y)
                y = y if out is None else out
            return y
    return mod(x)


def _plain_weight(mod: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The (out, in) weight of a plain ``nn.Linear``, or of HF's ``Conv1D`` (stored (in, out): its
    transposed view, which oneDNN reads as it is), else ``None``. Conv1D's own ``addmm`` took 1.6x
    (bf16) and 2.7x (fp32) oneDNN's time over the transposed view for 128 rows of GPT-2's four
    projections (2 threads, median of 15; see ``FusedRunner``'s prompt)."""
    if type(mod) is nn.Linear:
        return mod.weight
    w = getattr(mod, "weight", None)
    if (type(mod).__name__ == "Conv1D" and isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] == x.shape[-1]
            and getattr(mod, "nf", None) == w.shape[1]):
        return w.t()
    return None


def _global_hooks() -> bool:
    """Hooks registered for every module (``register_module_forward_*hook``): then only ``mod(x)`` runs them."""
    from torch.nn.modules import module as m

    return bool(m._global_forward_hooks or m._global_forward_pre_hooks)


PROMPT_ROWS = 32
"""Rows from which a plain ``nn.Linear`` (or HF ``Conv1D``) of a fused layer runs through oneDNN
(:func:`onednn_linear`)."""


@dataclass
class FusedRunner:
    """Embeddings -> fused layers -> final norm -> ``lm_head``, over a :class:`KVCache`.

    Modules are looked up by path on every call, so passes that replace them (quantization)
    need no re-wiring. ``layers`` may be given explicitly (a runner that shadows an un-injected
    model keeps its own fused wrappers around the model's modules).
    """

    root: nn.Module
    arch: ModelArch
    own_layers: list[FusedDecoderLayer] | None = None
    _dtype: torch.dtype | None = field(default=None, repr=False)
    compile_decode: bool = False
    """Run single-token steps through ``torch.compile`` (static shapes; falls back to eager on failure)."""
    cache_dtype: torch.dtype | None = None
    """KV cache dtype; ``None`` picks one (see :meth:`new_cache`)."""
    decode_path: str = "auto"
    """Where single-token steps of up to :attr:`native_max_batch` rows run when the native C kernel
    (:mod:`flexspeed.inference.native`) is available and supports the model: ``"auto"`` measures
    both paths and runs the faster (:class:`~flexspeed.inference.runners.DecodePathChooser`),
    ``"native"`` / ``"torch"`` pin one (config key ``decode_path``)."""
    native_max_batch: int = 16
    tp_group: object | None = None
    """The tensor-parallel process group of a sharded model (set by ``init_inference``)."""
    cuda_graphs: bool = True
    """On CUDA, single-token steps replay a captured graph (see :mod:`flexspeed.inference.graphs`)."""
    _native: object | None = field(default=None, repr=False)
    _graphs: object | None = field(default=None, repr=False)
    _shadowed: tuple | None = field(default=None, repr=False)
    """For a shadow runner: the model's blocks and their modules when the wrappers were built."""
    _paths: object | None = field(default=None, repr=False)

    @property
    def native_decode(self) -> bool:
        """The native kernel may run single-token steps (``decode_path`` is not ``"torch"``);
        setting it pins ``decode_path`` to ``"native"`` (True) or ``"torch"`` (False)."""
        return self.decode_path != "torch"

    @native_decode.setter
    def native_decode(self, on: bool) -> None:
        self.decode_path = "native" if on else "torch"

    @property
    def paths(self):
        """The :class:`~flexspeed.inference.runners.DecodePathChooser` deciding native kernel or
        torch for every single-token step (made again when :attr:`decode_path` changes)."""
        from flexspeed.inference.runners import DecodePathChooser

        if (self._paths is None or self._paths.mode != self.decode_path
                or (self._paths.agree is None) != (self.tp_group is None)):
            self._paths = DecodePathChooser(self.decode_path, agree=self._agree if self.tp_group is not None else None)
        return self._paths

    @paths.setter
    def paths(self, chooser) -> None:
        """Use ``chooser`` (its measurements so far): one that does not fit :attr:`decode_path` or the
        tensor-parallel group is replaced on the next use."""
        self._paths = chooser

    def _agree(self, times: list[float]) -> list[float]:
        """The probe's step times, the slowest over the tensor-parallel ranks (one decision for all)."""
        import torch.distributed as dist

        t = torch.tensor(times, dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.tp_group)
        return t.tolist()

    def shadow(self) -> None:
        """Record the blocks this runner's own layers wrap (see :meth:`current`)."""
        blocks = tuple(self.root.get_submodule(self.arch.layers_path))
        self._shadowed = (blocks, tuple(tuple(b.modules()) for b in blocks))

    def current(self) -> bool:
        """The runner still computes what the model does: always for an injected model (its layers are
        looked up in the model); for a shadow runner, unless a block or a module in one was replaced
        since (kernels injected, weights quantized after the runner was chosen)."""
        if self._shadowed is None:
            return True
        blocks, mods = self._shadowed
        now = tuple(self.root.get_submodule(self.arch.layers_path))
        return len(now) == len(blocks) and all(a is b for a, b in zip(now, blocks)) and all(
            len(m) == len(n) and all(x is y for x, y in zip(m, n)) for m, n in zip((tuple(b.modules()) for b in now), mods))

    @property
    def layers(self) -> list[FusedDecoderLayer]:
        return self.own_layers if self.own_layers is not None else list(self.root.get_submodule(self.arch.layers_path))

    @property
    def max_positions(self) -> int | None:
        return self.arch.max_positions

    def _module(self, path: str) -> nn.Module | None:
        try:
            return self.root.get_submodule(path)
        except AttributeError:
            return None

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """Zeroed per-layer buffers for ``batch`` rows of up to ``max_len`` tokens.

        The dtype defaults to :attr:`cache_dtype`: the compute dtype (given at injection, else the
        model's), except that a 16-bit model on CPU whose steps run on torch keeps an fp32 cache:
        torch 2.13's CPU attention for one query is 2-5x slower in bf16 than in fp32 (measured at
        batch 1 and 16, OPT-125M heads), which outweighs reading twice the cache bytes. The native
        decode kernel reads a bf16 cache at full speed, so a bf16 model whose steps it runs keeps
        a bf16 cache (half the bytes: at 140 tokens, OPT-125M's fp32 cache is 10 MB a step, 15% of
        its int4 weights).
        """
        ref = next((t for t in self.root.parameters() if t.is_floating_point()), None)
        if ref is None:
            ref = next((t for t in self.root.buffers() if t.is_floating_point()), torch.empty(0))
        dt = dtype or self.cache_dtype or self._dtype or ref.dtype
        graphs = self._graphs_ok(ref)
        if self.compile_decode or graphs:  # static steps are specialised on T_max: round it up
            max_len = -(-max_len // 64) * 64
        if graphs:  # the graphs are bound to their cache's buffers: reuse them across calls
            return self._decode_graphs().cache(batch, max_len, dt, ref.device)
        if dtype is None and self.cache_dtype is None and ref.device.type == "cpu" and dt in (torch.bfloat16,
                                                                                                torch.float16):
            native = (dt == torch.bfloat16 and self.native_decode and not self.compile_decode
                      and batch <= self.native_max_batch and self.native_reason() is None)
            # "auto" keeps a bf16 cache: the native path reads it at full speed, and a probe that
            # finds torch faster on it (its attention over bf16 is slower) has measured that cost
            dt = torch.bfloat16 if native else torch.float32
        ks, vs = [], []
        for layer in self.layers:
            shape = (batch, layer.n_kv_heads, max_len, layer.head_dim)
            ks.append(torch.zeros(shape, dtype=dt, device=ref.device))
            vs.append(torch.zeros(shape, dtype=dt, device=ref.device))
        return KVCache(ks, vs)

    def context(self, x: torch.Tensor, pos: torch.Tensor, start: int, key_mask: torch.Tensor | None,
                window: int | None = None, rope: tuple | None = None) -> StepContext:
        """Mask and rotary tables for new tokens at cache positions ``start:start+T``.

        Args:
            x: embedded tokens (B, T, C) (dtype/device for the rotary tables).
            pos: position ids (B, T).
            key_mask: (B, >= start+T) bool, False for padding; ``None`` if there is none.
            window: the layers' sliding attention window, ``None`` for full attention.
            rope: the rotary tables, when already computed for another context of this step.
        """
        if rope is None and self.arch.rope is not None:
            rope = self.arch.rope(self.root, x, pos)
        return step_context(x.shape[1], start, key_mask, x.device, rope, window)

    @property
    def windows(self) -> tuple[int | None, ...]:
        """Per layer, its sliding attention window (``None``: full); empty when no layer slides."""
        dims = getattr(self.arch, "dims", None)
        return tuple(getattr(dims, "windows", ()) or ())

    def _window_mask(self, B: int, start: int, key_mask: torch.Tensor | None,
                     device: torch.device) -> torch.Tensor | None | bool:
        """The key mask of one native step at column ``start`` with the layers' sliding window
        folded in: ``key_mask`` itself where no window reaches back past column 0 yet, a
        (B, start + 1) mask when every layer has the same window, ``False`` when the layers'
        windows differ (the native step takes one mask for all layers: the step runs eagerly)."""
        ws = self.windows
        if not ws or all(w is None or start + 1 <= w for w in ws):
            return key_mask
        if len(set(ws)) != 1:
            return False
        keys = window_keys(start, start + 1, ws[0], device).expand(B, start + 1)
        return keys if key_mask is None else keys & key_mask[:, :start + 1]

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, cache: KVCache, start: int,
                key_mask: torch.Tensor | None = None, last_only: bool = True) -> torch.Tensor:
        """Logits for tokens ``ids`` (B, T) at cache positions ``start:start+T``.

        Returns:
            (B, 1, V) logits of the last token with ``last_only``, else (B, T, V).
        """
        if ids.shape[1] == 1 and self._graphs_ok(ids):
            graphs = self._decode_graphs()
            if graphs.owns(cache):
                return graphs.step(ids, pos, cache, start, key_mask)
        x = self.arch.embed(self.root, ids, pos)  # (B, T, C)
        keys = self._window_mask(x.shape[0], start, key_mask, x.device) if ids.shape[1] == 1 else False
        if keys is False or not self.native_capable(x, cache):
            return self._torch_forward(x, pos, cache, start, key_mask, last_only)

        def native() -> torch.Tensor:
            rope = self.arch.rope(self.root, x, pos) if self.arch.rope is not None else None
            return self._native.forward(x, cache.k, cache.v, start, keys, rope)  # (B, 1, V)

        return self.paths.run(x.shape[0], native, lambda: self._torch_forward(x, pos, cache, start, key_mask,
                                                                              last_only))

    __call__ = step = forward

    def _torch_forward(self, x: torch.Tensor, pos: torch.Tensor, cache: KVCache, start: int,
                       key_mask: torch.Tensor | None, last_only: bool) -> torch.Tensor:
        """The step on torch's path: compiled (``compile_decode``, single tokens) or eager layers."""
        if x.shape[1] == 1 and self.compile_decode and self._compiled_ok():
            try:
                return self._static_forward(x, pos, cache, start, key_mask)
            except Exception as exc:  # an op without a compiled form, no C++ compiler, ...
                warnings.warn(f"compiled decode failed ({type(exc).__name__}: {exc}); running eagerly", stacklevel=2)
                self.compile_decode = False
        ctx = self.context(x, pos, start, key_mask)
        ctxs = {None: ctx}
        for w in set(self.windows) - {None}:  # sliding-window layers (Mistral, Qwen2): their own mask
            ctxs[w] = self.context(x, pos, start, key_mask, w, ctx.rope)
        ws = self.windows
        for i, layer in enumerate(self.layers):
            x = layer.step(x, ctxs[ws[i]] if ws else ctx, cache.k[i], cache.v[i])
        if last_only:
            prompt = x.shape[1] > 1
            x = x[:, -1:]  # (B, 1, C): the head reads only what generation needs
            if prompt and self.tp_group is not None and x.device.type == "cpu" and x.shape[0] <= self.native_max_batch \
                    and self.native_reason() is None:  # each rank its block of the head's rows, gathered
                return self._native.head_logits(x)
        return self._head(x)

    def describe(self) -> str:
        """Which runner this is and where its single-token steps run (see :meth:`step_path`)."""
        kind = "shadow" if self.own_layers is not None and self.arch.copies else "fused"
        return f"{kind} runner ({self.arch.name}), single-token steps: {self.step_path()}"

    def step_path(self) -> str:
        """``"native C kernel"``, ``"CUDA graph"``, ``"torch.compile"`` or ``"eager torch (<why>)"``,
        for a model on its current device (the native kernel serves up to :attr:`native_max_batch` rows)."""
        ref = next((t for t in self.root.parameters()), None)
        dev = ref.device.type if ref is not None else "cpu"
        if dev == "cuda" and self._graphs_ok(ref):
            return "CUDA graph"
        if self.compile_decode and self._compiled_ok():
            return "torch.compile"
        reason = self.native_reason() if dev == "cpu" else "not on the CPU"
        if reason is None:
            return f"native C kernel or torch (<= {self.native_max_batch} rows; {self.paths.describe()})"
        return f"eager torch ({reason})"

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        for path in self.arch.final_paths:
            mod = self._module(path)
            if mod is not None:
                x = project(mod, x)
        return project(self.root.get_submodule(self.arch.head_path), x)  # (B, T, V)

    def native_available(self) -> bool:
        """The native decode kernel is built and this model lives on the CPU."""
        from flexspeed.inference.native import library

        ref = next(iter(self.root.parameters()), None)
        if ref is None:
            ref = next(iter(self.root.buffers()), torch.empty(0))
        return ref.device.type == "cpu" and library() is not None

    def native_reason(self) -> str | None:
        """Why single-token steps do not run natively (``None``: they do, up to ``native_max_batch`` rows)."""
        from flexspeed.inference.native_decoder import NativeDecoder

        if not self.native_decode:
            return "native_decode is off"
        if self.compile_decode:
            return "compile_decode is on"
        blocker = self.arch.native_blocker()
        if blocker is not None:
            return blocker
        if self._native is None:
            self._native = NativeDecoder(self)
        return self._native.unsupported()

    def greedy(self, cache: KVCache, key_mask: torch.Tensor | None, seq: torch.Tensor, T: int, pos0: torch.Tensor,
               min_new: int, eos: list[int], pad: int | None, done: list[bool]) -> int | None:
        """Greedy decoding after column ``T`` in native calls (see :meth:`NativeDecoder.greedy`), as far
        as :attr:`paths` lets the native path run before it looks again (so fewer columns than
        ``seq`` has may come back: the caller's loop goes on from there); ``None`` where the next
        step is not native."""
        if not self.native_capable(seq, cache) or any(w is not None and seq.shape[1] > w for w in self.windows):
            return None  # past a sliding window, each step's mask moves: the per-step path applies it
        B = seq.shape[0]
        budget = self.paths.native_budget(B)
        if budget == 0:
            return None
        width = seq.shape[1] if budget is None else min(seq.shape[1], T + 1 + budget)
        part = seq if width == seq.shape[1] else seq[:, :width].contiguous()
        t0 = self.paths.clock()
        made = self._native.greedy(cache.k, cache.v, key_mask, part, T, pos0, min_new, eos, pad, done)
        if made is None:
            return None
        if made > 1:
            self.paths.record(B, "native", self.paths.clock() - t0, steps=made - 1)
        if part is not seq:
            seq[:, T + 1:T + made] = part[:, T + 1:T + made]
        return made

    def native_capable(self, x: torch.Tensor, cache: KVCache) -> bool:
        """The native kernel can run single-token steps for ``x`` (B, ...) (its rows and device) over
        ``cache``; whether it does is :attr:`paths`' decision."""
        if not self.native_decode or self.compile_decode or x.device.type != "cpu" or x.shape[0] > self.native_max_batch:
            return False
        if not cache.k or cache.k[0].dtype not in (torch.float32, torch.bfloat16) or not cache.k[0].is_contiguous():
            return False
        return self.native_reason() is None

    def _graphs_ok(self, ref: torch.Tensor) -> bool:
        """Single-token steps of a model on CUDA replay graphs: on, not compiled, not tensor-parallel
        (a graph would capture the TP hooks' collectives; kept out as for compiled steps)."""
        return (self.cuda_graphs and ref.device.type == "cuda" and not self.compile_decode
                and self._compiled_ok())

    def _decode_graphs(self):
        from flexspeed.inference.graphs import DecodeGraphs

        if self._graphs is None:
            self._graphs = DecodeGraphs(self)
        return self._graphs

    def static_body(self, ids: torch.Tensor, pos: torch.Tensor, cache: KVCache, index: torch.Tensor,
                    key_mask: torch.Tensor) -> torch.Tensor:
        """One new token per row with every shape static and every input a tensor (CUDA graphs).

        Args:
            ids, pos: (B, 1) token and position ids; index: (1,) the cache position written.
            key_mask: (B, T_max) bool, False for padded keys.
        Returns:
            (B, 1, V) logits.
        """
        x = self.arch.embed(self.root, ids, pos)  # (B, 1, C)
        valid = (torch.arange(cache.max_len, device=x.device) <= index) & key_mask  # (B, T_max)
        rope = self.arch.rope(self.root, x, pos) if self.arch.rope is not None else None
        ws = self.windows
        for i, layer in enumerate(self.layers):
            keys = window_keys(index, cache.max_len, ws[i], x.device) if ws else None
            x = layer.static_step(x, cache.k[i], cache.v[i], index, valid if keys is None else valid & keys, rope)
        return self._head(x)

    def _compiled_ok(self) -> bool:
        # TP all-reduce hooks run inside the layers; keep them out of Dynamo's graphs
        from flexspeed.inference.tp import tp_size_of

        return self.tp_group is None and tp_size_of(self.root) == 1

    def _static_forward(self, x: torch.Tensor, pos: torch.Tensor, cache: KVCache, start: int,
                        key_mask: torch.Tensor | None) -> torch.Tensor:
        B, t_max = x.shape[0], cache.max_len
        valid = (torch.arange(t_max, device=x.device) <= start).expand(B, t_max)  # (B, T_max)
        if key_mask is not None:  # key_mask may be shorter than the rounded-up cache
            n = min(t_max, key_mask.shape[1])
            valid = torch.cat([valid[:, :n] & key_mask[:, :n], valid[:, n:]], dim=1)
        index = torch.tensor([start], device=x.device)
        rope = self.arch.rope(self.root, x, pos) if self.arch.rope is not None else None
        step, head = _compiled()
        ws = self.windows
        for i, layer in enumerate(self.layers):
            keys = window_keys(start, t_max, ws[i], x.device) if ws else None
            x = step(layer, x, cache.k[i], cache.v[i], index, valid if keys is None else valid & keys, rope)
        return head(self, x)


@functools.cache
def _compiled() -> tuple[Callable, Callable]:
    """The compiled layer step and head, shared by every runner (Dynamo caches per shape)."""
    def step(layer, x, k, v, index, valid, rope):
        return layer.static_step(x, k, v, index, valid, rope)

    return torch.compile(step, dynamic=False), torch.compile(FusedRunner._head, dynamic=False)
