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
``kernels.get_runner(model)`` find it; the entry disappears with the model. Bare
``generate(model, ...)`` calls on an un-injected model build its shadow runner per call but share
one :class:`DecodePathChooser` per model (another weak table), so a call does not probe again
what an earlier one measured.
"""

from __future__ import annotations

import inspect
import logging
import statistics
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
import torch.nn as nn

__all__ = ["DecodeRunner", "RunnerChoice", "select_runner", "remember", "remembered", "HFCacheRunner", "TokenCache",
           "RecomputeRunner", "DecodePathChooser", "DECODE_PATHS"]

log = logging.getLogger("flexspeed.inference.decode_path")


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
        pin = _pin(held, config) if isinstance(held, FusedRunner) else ""
        return RunnerChoice(held, "built by " + ("offloading" if not isinstance(held, FusedRunner)
                                                  else "kernel injection") + pin)
    if not use_cache:
        if _is_hf(model):
            return RunnerChoice(HFCacheRunner(model, use_cache=False), "use_cache=False")
        return RunnerChoice(RecomputeRunner(model), "use_cache=False")
    from flexspeed.inference.kernels import injected_runner, shadow_runner

    runner = injected_runner(model)
    if runner is not None:  # fused layers in the tree (a copy of an injected model, say)
        runner.tp_group = tp_group
        remember(model, runner)
        return RunnerChoice(runner, "the model's blocks are fused layers" + _pin(runner, config))
    runner, why_not = shadow_runner(model)
    if runner is not None:
        runner.tp_group = tp_group
        if config is None and tp_group is None:  # a bare generate(model, ...): this model's measurements so far
            runner.paths = _model_paths(model)
        return RunnerChoice(runner, "un-injected: fused wrappers over the model's own modules" + _pin(runner, config))
    if _is_hf(model):
        return RunnerChoice(HFCacheRunner(model), f"no fused runner: {why_not}")
    return RunnerChoice(RecomputeRunner(model), f"no fused runner ({why_not}) and no cache API")


_PATHS: weakref.WeakKeyDictionary[nn.Module, tuple[Any, DecodePathChooser]] = weakref.WeakKeyDictionary()


def _model_paths(model: nn.Module) -> DecodePathChooser:
    """The decode-path chooser of an un-injected model's bare ``generate`` calls, kept across calls in
    a weak table of this module (nothing is written onto the model): each call builds its shadow
    runner again, and without this each would probe both paths again (on a bf16 model a torch
    step costs ~3x a native one). A new one when the model's dtype or device changed."""
    ref = next(iter(model.parameters()), None)
    key = (ref.dtype, ref.device) if ref is not None else None
    try:
        held = _PATHS.get(model)
        if held is None or held[0] != key:
            held = _PATHS[model] = (key, DecodePathChooser())
    except TypeError:  # an unhashable module
        return DecodePathChooser()
    return held[1]


def _pin(runner: Any, config: Any) -> str:
    """Apply the config's ``decode_path`` pin to a fused runner (``"auto"`` leaves the runner's own)."""
    path = getattr(config, "decode_path", "auto")
    if path == "auto":
        return ""
    runner.decode_path = path
    return f"; decode_path={path!r} in the config"


DECODE_PATHS = ("auto", "native", "torch")
"""Where a fused runner's single-token steps run: measured and chosen at run time, or pinned."""


@dataclass
class _PathState:
    """What :class:`DecodePathChooser` knows about one kind of step (one batch size)."""

    samples: dict[str, list[float]] = field(default_factory=lambda: {"native": [], "torch": []})
    measured: dict[str, float] = field(default_factory=dict)  # per-step seconds of the last probe
    choice: str | None = None  # None: probing
    since: int = 0  # steps on ``choice`` since the probe ended
    recent: float = 0.0  # moving average of the chosen path's single-step time
    chunk: float | None = None  # per-step time of the first greedy-loop run after the probe
    probes: int = 0
    why: str = "first steps"


class DecodePathChooser:
    """Measures a fused runner's single-token steps on the native kernel and on torch's path, and
    runs the faster one; the only place that decides between them.

    A probe alternates the two paths (native, torch, native, ...) for ``probe_steps`` steps each (or
    until, after a pair, one is ``clear`` times slower than the other) on the real generation (same
    model, same cache: both paths write the same keys and values and give the same logits to fp32
    rounding) and keeps the path with the lower median step time. It probes again after
    ``reprobe_every`` steps on the chosen path; or when that path's step time grows by more than
    ``jump`` times from what the probe measured *and* above the other path's probed time (another
    process took the cores, and the choice could now be wrong: a smaller slowdown is no reason to
    run the slower path's steps, which under bursty load would be most of the time); or when
    torch's shrinks by ``jump`` times (the load went away: the native kernel, which loses most under
    load, may win again; a native step that got faster needs no probe). Single steps are tracked as
    a moving average against the probe's median, runs of the native greedy loop (no Python between
    steps, so faster per step than the probe's single steps) against the first such run after the
    probe. State is kept per batch size (``key``). ``mode`` pins one path (``"native"``/``"torch"``)
    for benchmarks and tests. Under tensor parallelism (``agree`` given) every rank must take the
    same path in the same step: the probe's times are reduced over the ranks (``agree``) and only
    the step count triggers a new probe, never a rank's own times.

    Args:
        mode: ``"auto"``, ``"native"`` or ``"torch"`` (see :data:`DECODE_PATHS`).
        clock: the time source (seconds); tests pass a fake one.
        agree: ``values -> values`` reduced over the tensor-parallel ranks (max), or ``None``.
    """

    def __init__(self, mode: str = "auto", *, probe_steps: int = 3, reprobe_every: int = 256, jump: float = 1.5,
                 clear: float = 2.0, clock: Callable[[], float] = time.perf_counter,
                 agree: Callable[[list[float]], list[float]] | None = None) -> None:
        if mode not in DECODE_PATHS:
            raise ValueError(f"decode_path={mode!r} is not one of {DECODE_PATHS}; use 'auto' to measure both")
        if probe_steps < 1 or reprobe_every < 1 or jump <= 1:
            raise ValueError(f"probe_steps={probe_steps} and reprobe_every={reprobe_every} must be >= 1 and "
                             f"jump={jump} > 1")
        self.mode, self.probe_steps, self.reprobe_every, self.jump = mode, probe_steps, reprobe_every, jump
        self.clock, self.agree, self.clear = clock, agree, clear
        self.states: dict[Any, _PathState] = {}
        self.last: dict[str, float] = {}  # the latest step time of each path (pinned modes too)

    def state(self, key: Any) -> _PathState:
        return self.states.setdefault(key, _PathState())

    def pick(self, key: Any) -> str:
        """The path of the next single-token step of this ``key``."""
        if self.mode != "auto":
            return self.mode
        st = self.state(key)
        if st.choice is not None:
            return st.choice
        n, t = len(st.samples["native"]), len(st.samples["torch"])
        return "native" if n <= t else "torch"

    def native_budget(self, key: Any) -> int | None:
        """Steps the native path may run in one go (the greedy loop in C) before this chooser must
        look again: 0 when the next step is not native, ``None`` for no limit."""
        if self.mode != "auto":
            return None if self.mode == "native" else 0
        st = self.state(key)
        if st.choice != "native":
            return 0
        return max(1, self.reprobe_every - st.since)

    def run(self, key: Any, native: Callable[[], Any], torch_path: Callable[[], Any]) -> Any:
        """One step on the path :meth:`pick` names, timed and recorded."""
        path = self.pick(key)
        t0 = self.clock()
        out = native() if path == "native" else torch_path()
        self.record(key, path, self.clock() - t0)
        return out

    def record(self, key: Any, path: str, seconds: float, steps: int = 1) -> None:
        """``steps`` steps of ``path`` took ``seconds`` in all."""
        per = seconds / max(1, steps)
        self.last[path] = per
        if self.mode != "auto":
            return
        st = self.state(key)
        if st.choice is None:
            st.samples[path].append(per)
            # under tensor parallelism the probe's length must not depend on a rank's own times
            if min(len(v) for v in st.samples.values()) >= self.probe_steps or (self.agree is None and self._clear(st)):
                self._decide(key, st)
            return
        if path != st.choice:
            return
        st.since += steps
        if steps > 1:  # a run of the greedy loop in C: no Python between steps, so it has its own baseline
            st.chunk = st.chunk or per
            ratio = per / st.chunk
        else:
            st.recent = 0.75 * st.recent + 0.25 * per
            ratio = st.recent / st.measured[path]
        # a slower chosen path is worth a probe only once it is slower than the other path was: a probe
        # runs the other path's (slower) steps, and under bursty load step times move all the time
        other = "torch" if path == "native" else "native"
        could_flip = ratio * st.measured[path] > st.measured[other]
        if st.since >= self.reprobe_every:
            self._reprobe(key, st, f"{st.since} steps since the last probe")
        elif self.agree is None and ((ratio > self.jump and could_flip) or (ratio < 1 / self.jump and path == "torch")):
            self._reprobe(key, st, f"{path} step time moved {ratio:.2f}x from the probe's")

    def _clear(self, st: _PathState) -> bool:
        """Both paths measured equally often and one is ``clear`` times slower: no need to run it
        again (on a bf16 model, a torch step can cost 10x a native one)."""
        n, t = st.samples["native"], st.samples["torch"]
        if not n or len(n) != len(t):
            return False
        a, b = statistics.median(n), statistics.median(t)
        return max(a, b) >= self.clear * min(a, b)

    def _decide(self, key: Any, st: _PathState) -> None:
        times = [statistics.median(st.samples["native"]), statistics.median(st.samples["torch"])]
        if self.agree is not None:
            times = self.agree(times)  # every rank decides on the same numbers
        st.measured = {"native": times[0], "torch": times[1]}
        st.choice = "native" if times[0] <= times[1] else "torch"
        st.since, st.recent, st.chunk, st.probes = 0, st.measured[st.choice], None, st.probes + 1
        log.debug("decode path for %s: %s (probe %d, %s; native %.3f ms, torch %.3f ms a step)", key, st.choice,
                  st.probes, st.why, times[0] * 1e3, times[1] * 1e3)

    def _reprobe(self, key: Any, st: _PathState, why: str) -> None:
        log.debug("decode path for %s: probing again (%s)", key, why)
        st.choice, st.why = None, why
        st.samples = {"native": [], "torch": []}

    def describe(self) -> str:
        """The mode, and per batch size the path in use and the times it was chosen on."""
        if self.mode != "auto":
            seen = ", ".join(f"{p} {t * 1e3:.2f} ms a step" for p, t in self.last.items())
            return f"decode path pinned to {self.mode}" + (f" (last: {seen})" if seen else "")
        parts = []
        for key, st in self.states.items():
            if st.choice is None:
                parts.append(f"batch {key}: probing ({st.why})")
                continue
            m = st.measured
            parts.append(f"batch {key}: {st.choice} (probe {st.probes} after {st.why}: native "
                         f"{m['native'] * 1e3:.2f} ms, torch {m['torch'] * 1e3:.2f} ms a step)")
        return "decode path auto: " + ("; ".join(parts) if parts else "not measured yet")


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
