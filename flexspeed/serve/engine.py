"""The serving engine: one worker thread owns the model and runs every request's steps.

Submitting (from any thread: the HTTP server's event loop, a batch job) checks the request
against the model's limits and queues it, or raises :class:`~flexspeed.serve.errors.QueueFull`
when ``max_queue`` requests already wait. Between two forward steps the worker drops cancelled
requests (their rows are freed at once), lets the batcher admit waiting requests into free
rows, runs one step, samples one token per row and reports each request's new text to its
sink. A failure inside a step ends the requests of that step with ``finish_reason="error"``; the
worker carries on.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from flexspeed.config.errors import ConfigError
from flexspeed.serve.errors import QueueFull, RequestError
from flexspeed.serve.metrics import Metrics
from flexspeed.serve.model import TextModel, make_batcher
from flexspeed.serve.sampling import SamplingParams, new_generator, sample_rows
from flexspeed.serve.sequence import Output, Sequence
from flexspeed.serve.tokenizer import TextTokenizer

__all__ = ["Engine", "EngineOptions", "Completion"]

_DEFAULT_MAX_LEN = 2048  # for a model that states no position limit


@dataclass(frozen=True)
class EngineOptions:
    """How requests are batched and bounded (vLLM's names where it has them)."""

    max_num_seqs: int = 16
    """Requests running at once (rows of the batch)."""
    max_queue: int = 256
    """Requests that may wait for a row; more are refused (HTTP 429)."""
    max_model_len: int | None = None
    """Prompt plus completion tokens of one request (default: the model's positions, else 2048)."""
    cache_len: int | None = None
    """KV-cache columns under continuous batching (default 2 x max_model_len; >= max_model_len)."""
    batching: str = "auto"
    """``auto`` (continuous where the fused runner drives the model), ``continuous`` or ``static``."""

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_queue", "max_model_len", "cache_len"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name}={value} must be >= 1", key=name)


@dataclass
class Completion:
    """A whole completion, assembled from a request's outputs."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None

    def add(self, out: Output) -> None:
        self.text += out.text
        self.token_ids += out.token_ids
        self.finish_reason, self.error = out.finish_reason, out.error
        self.prompt_tokens, self.completion_tokens = out.prompt_tokens, out.completion_tokens


class Engine:
    """Text generation for many concurrent requests on one model.

    Args:
        model: the loaded model.
        tokenizer: its tokenizer.
        options: batching and bounds.
    Raises:
        ConfigError: ``max_model_len`` beyond the model's positions, or ``cache_len`` below it.
    """

    def __init__(self, model: TextModel, tokenizer: TextTokenizer, options: EngineOptions = EngineOptions()) -> None:
        self.model, self.tokenizer, self.options = model, tokenizer, options
        limit = model.max_positions or _DEFAULT_MAX_LEN
        self.max_model_len = options.max_model_len or limit
        if model.max_positions is not None and self.max_model_len > model.max_positions:
            raise ConfigError(f"max_model_len={self.max_model_len} exceeds the model's {model.max_positions} "
                              f"positions ({model.folder}/config.json); use at most {model.max_positions}",
                              key="max_model_len")
        cache_len = options.cache_len or 2 * self.max_model_len
        if cache_len < self.max_model_len:
            raise ConfigError(f"cache_len={cache_len} is shorter than max_model_len={self.max_model_len}; a request "
                              "must fit in the cache: raise cache_len or lower max_model_len", key="cache_len")
        self.batcher = make_batcher(model, mode=options.batching, max_num_seqs=options.max_num_seqs,
                                    max_model_len=self.max_model_len, cache_len=cache_len)
        self.stop_ids = sorted(set(model.eos_ids) | ({tokenizer.eos_token_id} - {None}))
        self.device = model.engine.device
        self.metrics = Metrics()
        self._cv = threading.Condition()
        self._inbox: deque[Sequence] = deque()
        self._waiting: deque[Sequence] = deque()  # the worker's own
        self._running: list[Sequence] = []
        self._n_waiting = 0
        self._stop = False
        self._thread: threading.Thread | None = None
        self.failure: str | None = None
        """Why the worker thread died, if it did (it should not)."""
        self.metrics.load(0, 0, self.batcher.max_rows)

    def describe(self) -> str:
        return f"{self.batcher.describe()}; max_model_len {self.max_model_len}, max_queue {self.options.max_queue}"

    # ------------------------------------------------------------------ the submitting side

    def start(self) -> Engine:
        """Start the worker thread (once)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="flexspeed-engine", daemon=True)
            self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop

    def check(self, n_prompt: int, params: SamplingParams, param: str = "prompt") -> None:
        """Raise :class:`RequestError` if a request of ``n_prompt`` tokens cannot run as asked."""
        if n_prompt == 0:
            raise RequestError(f"the {param} is empty (0 tokens); give at least one token", param=param)
        if n_prompt + params.max_tokens > self.max_model_len:
            raise RequestError(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{n_prompt + params.max_tokens} tokens ({n_prompt} in the {param}, {params.max_tokens} for the "
                f"completion). Please reduce the length of the {param} or max_tokens.",
                param=param if n_prompt >= self.max_model_len else "max_tokens")
        vocab = self.model.vocab_size
        for name, ids in (("logit_bias", [t for t, _ in params.logit_bias]), ("stop_token_ids", params.stop_token_ids)):
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise RequestError(f"{name} has token ids {bad[:5]} outside the vocabulary [0, {vocab})", param=name)

    def submit(self, prompt_ids: list[int], params: SamplingParams, sink: Callable[[Output], None],
               param: str = "prompt") -> Sequence:
        """Queue a request; its outputs go to ``sink`` (called on the worker thread; it must not block).

        Returns:
            the request's :class:`Sequence` (``cancel()`` it to stop it).
        Raises:
            RequestError: too long, bad token ids, or the engine was closed or failed (503).
            QueueFull: ``max_queue`` requests are already waiting (429).
        """
        bad = [t for t in prompt_ids if not 0 <= t < self.model.vocab_size]
        if bad:
            raise RequestError(f"the {param} has token ids {bad[:5]} outside the vocabulary [0, "
                               f"{self.model.vocab_size})", param=param)
        self.check(len(prompt_ids), params, param)
        gen = None if params.greedy else new_generator(params.seed, self.device)
        seq = Sequence(prompt_ids, params, self.tokenizer, sink, gen, on_finish=self._count)
        with self._cv:
            if self._stop:  # (before start() requests queue up; they run once it is called)
                raise RequestError(f"the engine is not running ({self.failure or 'stopped'})", status=503,
                                   kind="server_error")
            if self._n_waiting >= self.options.max_queue:
                self.metrics.reject()
                raise QueueFull(self._n_waiting, self.options.max_queue)
            self._n_waiting += 1
            self._inbox.append(seq)
            self.metrics.load(len(self._running), self._n_waiting, self.batcher.max_rows)
            self._cv.notify()
        return seq

    def complete(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                 timeout: float | None = None) -> list[Completion]:
        """Run requests to the end and return their completions (blocking; the engine must be started).

        Args:
            prompts: token ids of each prompt.
            params: one setting for all, or one per prompt.
            timeout: seconds to wait for all of them (``None``: no limit).
        Raises:
            RequestError, QueueFull: as :meth:`submit`; TimeoutError: not done in time (they are cancelled).
        """
        per = params if isinstance(params, list) else [params] * len(prompts)
        results: queue.Queue[tuple[int, Output]] = queue.Queue()
        done = [Completion() for _ in prompts]
        seqs = [self.submit(ids, p, lambda o, i=i: results.put((i, o))) for i, (ids, p) in enumerate(zip(prompts, per))]
        deadline = None if timeout is None else time.monotonic() + timeout
        left = len(seqs)
        while left:
            try:
                i, out = results.get(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                for seq in seqs:
                    seq.cancel()
                raise TimeoutError(f"{left} of {len(seqs)} requests were not done within {timeout} s") from None
            done[i].add(out)
            left -= out.finish_reason is not None
        return done

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker; requests still queued or running end with ``finish_reason="abort"``."""
        with self._cv:
            self._stop = True
            self._cv.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        for seq in [*self._running, *self._waiting, *self._inbox]:
            seq.finish("abort", "the server is shutting down")
        self._running, self._inbox = [], deque()
        self._waiting.clear()

    # ------------------------------------------------------------------ the worker

    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while self._next():
                    self._iteration()
        except BaseException as exc:  # a bug: say so, end every request, refuse new ones
            self.failure = f"{type(exc).__name__}: {exc}"
            traceback.print_exc(file=sys.stderr)
            with self._cv:
                self._stop = True
            for seq in [*self._running, *self._waiting, *self._inbox]:
                seq.finish("error", f"the engine failed: {self.failure}")

    def _next(self) -> bool:
        """Wait for work; move new requests to the waiting line. False when stopping."""
        with self._cv:
            while not self._stop and not self._inbox and not self._waiting and not self._running:
                self._cv.wait()
            self._waiting.extend(self._inbox)
            self._inbox.clear()
            return not self._stop

    def _iteration(self) -> None:
        self._drop_cancelled()
        before = len(self._waiting)
        head = [s for s, _ in zip(self._waiting, range(self.batcher.max_rows))]
        self.batcher.admit(self._waiting)  # takes from the left
        admitted = head[:before - len(self._waiting)]
        if admitted:
            self._running += admitted
            with self._cv:
                self._n_waiting -= len(admitted)
        try:
            seqs, logits = self.batcher.forward()
            tokens = sample_rows(logits, seqs, self.stop_ids) if seqs else []
        except Exception as exc:  # a step failed: its requests end with an error; the engine goes on
            traceback.print_exc(file=sys.stderr)
            for seq in list(self._running):
                seq.finish("error", f"generation failed: {type(exc).__name__}: {exc}")
                self._retire(seq)
            return
        for seq, tok in zip(seqs, tokens):
            first = not seq.output_ids
            seq.append(tok, self.stop_ids)
            if first:
                self.metrics.first_token(seq.first_token_at - seq.arrival)
            if seq.finished:
                self._retire(seq)
        if seqs:
            self.metrics.tokens(len(seqs))
        self.metrics.load(len(self._running), self._n_waiting, self.batcher.max_rows)

    def _drop_cancelled(self) -> None:
        dropped = [s for s in self._waiting if s.cancelled]
        if dropped:
            self._waiting = deque(s for s in self._waiting if not s.cancelled)
            with self._cv:
                self._n_waiting -= len(dropped)
            for seq in dropped:
                seq.finish("abort")
        for seq in [s for s in self._running if s.cancelled]:
            seq.finish("abort")
            self._retire(seq)

    def _retire(self, seq: Sequence) -> None:
        self.batcher.release(seq)
        if seq in self._running:
            self._running.remove(seq)

    def _count(self, seq: Sequence) -> None:
        """A finished request in the metrics (its Sequence's on_finish: before its last output goes out)."""
        now = time.perf_counter()
        decode = None if seq.first_token_at is None else seq.last_token_at - seq.first_token_at
        self.metrics.finish(seq.finish_reason or "abort", len(seq.prompt_ids), len(seq.output_ids), now - seq.arrival,
                            decode)
