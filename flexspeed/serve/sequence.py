"""One request's state in the engine: its tokens, its text so far, when it finishes, and what it reports.

The engine thread owns a :class:`Sequence` from submission to its end; the submitting side
holds it only to :meth:`Sequence.cancel` it (a flag the engine reads between steps) and
receives :class:`Output` objects through the ``sink`` it gave.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence as Seq
from dataclasses import dataclass

import torch

from flexspeed.serve.sampling import SamplingParams
from flexspeed.serve.tokenizer import TextStream, TextTokenizer

__all__ = ["Output", "Sequence", "FINISH_REASONS"]

FINISH_REASONS = ("stop", "length", "abort", "error")
"""``stop``: an end-of-sequence token, a stop token or a stop string; ``length``: max_tokens;
``abort``: cancelled (the client went away); ``error``: the engine failed."""


@dataclass
class Output:
    """A piece of a completion, as the engine reports it to the request's sink."""

    text: str
    """New text since the last output."""
    token_ids: list[int]
    """New token ids since the last output."""
    finish_reason: str | None = None
    """Set on the last output (one of :data:`FINISH_REASONS`)."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    """Tokens made so far (the end-of-sequence or stop token included)."""
    error: str | None = None
    """Why the engine failed, with ``finish_reason="error"``."""


class Sequence:
    """A request in the engine.

    Args:
        prompt_ids: the prompt's token ids.
        params: how it is decoded.
        tokenizer: decodes its text.
        sink: receives its outputs (called on the engine thread; must not block).
        generator: its sampling generator (``None`` for greedy decoding).
        on_finish: called with the sequence once it has finished, before ``sink`` receives the last
            output (so whoever holds that output sees the finish counted, e.g. in the metrics).
    """

    def __init__(self, prompt_ids: list[int], params: SamplingParams, tokenizer: TextTokenizer,
                 sink: Callable[[Output], None], generator: torch.Generator | None = None,
                 on_finish: Callable[[Sequence], None] | None = None) -> None:
        self.prompt_ids, self.params, self.sink, self.generator = list(prompt_ids), params, sink, generator
        self.on_finish = on_finish
        self.output_ids: list[int] = []
        self._text_ids: list[int] = []  # what is decoded: the output without a final stop token
        self.stream = TextStream(tokenizer, params.stop)
        self.cancelled = False
        self.finish_reason: str | None = None
        self.arrival = time.perf_counter()
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def n_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return len(self.prompt_ids) + len(self.output_ids)

    def cancel(self) -> None:
        """Ask the engine to stop this request and free its row (thread-safe: a flag read between steps)."""
        self.cancelled = True

    def append(self, token: int, stop_ids: Seq[int]) -> None:
        """Add the token the engine chose, report the new text, and finish when a limit is reached.

        Args:
            stop_ids: the model's end-of-sequence ids (ignored with ``ignore_eos``).
        """
        now = time.perf_counter()
        if self.first_token_at is None:
            self.first_token_at = now
        self.last_token_at = now
        self.output_ids.append(token)
        p = self.params
        reason = None
        ends = token in p.stop_token_ids or (not p.ignore_eos and token in stop_ids)
        if ends and len(self.output_ids) > p.min_tokens:  # (the sampler suppressed them before min_tokens)
            reason = "stop"
        else:
            self._text_ids.append(token)
        if reason is None and len(self.output_ids) >= p.max_tokens:
            reason = "length"
        text = self.stream.push(self._text_ids, final=reason is not None)
        if self.stream.stopped:
            reason = "stop"
        self.finish_reason = reason
        self._emit(Output(text, [token], reason, len(self.prompt_ids), len(self.output_ids)))

    def finish(self, reason: str, error: str | None = None) -> None:
        """End the request from outside the token loop (cancelled, or the engine failed)."""
        if self.finished:
            return
        self.finish_reason = reason
        self._emit(Output("", [], reason, len(self.prompt_ids), len(self.output_ids), error))

    def _emit(self, out: Output) -> None:
        if out.finish_reason is not None and self.on_finish is not None:
            self.on_finish(self)
        try:
            self.sink(out)
        except Exception:  # the receiving side is gone (its event loop closed): nobody waits for the rest
            self.cancelled = True
