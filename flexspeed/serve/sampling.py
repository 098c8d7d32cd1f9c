"""Per-request sampling settings, and the sampler that turns a step's logits into one token per row.

Every request brings its own settings, so rows of one batch are processed with their own
values, in HF ``generate``'s order and with the same functions ``generate`` uses
(:mod:`flexspeed.inference.generation`): logit bias, repetition penalty, presence and frequency
penalties, ``min_tokens`` (end-of-sequence suppressed), then, for sampled rows, temperature,
top-k and top-p, and a draw from the request's own generator (seeded by ``seed`` when given, so
a request's samples do not depend on what else runs). Greedy rows without processors are one
batched argmax.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Protocol

import torch

from flexspeed.inference.generation import apply_repetition_penalty, apply_top_k, apply_top_p, greedy_tokens
from flexspeed.serve.errors import RequestError

__all__ = ["SamplingParams", "Row", "sample_rows", "new_generator"]


@dataclass(frozen=True)
class SamplingParams:
    """How one request is decoded (OpenAI's names; ``top_k``, ``min_tokens``, ``repetition_penalty``,
    ``ignore_eos`` and ``stop_token_ids`` as vLLM extends them)."""

    max_tokens: int = 16
    """New tokens at most."""
    temperature: float = 1.0
    """0 is greedy decoding; else logits are divided by it before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens whose probability reaches it (1 keeps all)."""
    top_k: int = 0
    """Sample among the k most likely tokens (0 keeps all)."""
    min_tokens: int = 0
    """End-of-sequence and stop tokens are suppressed until this many tokens are made."""
    seed: int | None = None
    """Seed of this request's generator (reproducible sampling)."""
    stop: tuple[str, ...] = ()
    """Strings that end the completion (not included in the text)."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end the completion, besides the model's end-of-sequence ids."""
    ignore_eos: bool = False
    """Keep generating after end-of-sequence tokens (fixed-length answers, for benchmarks)."""
    repetition_penalty: float = 1.0
    """HF's penalty on tokens of the prompt and the completion (1 disables it)."""
    presence_penalty: float = 0.0
    """Subtracted from the logits of tokens already in the completion."""
    frequency_penalty: float = 0.0
    """Subtracted once per earlier occurrence in the completion."""
    logit_bias: tuple[tuple[int, float], ...] = field(default=())
    """(token id, bias) pairs added to the logits."""

    def __post_init__(self) -> None:
        checks = [
            ("max_tokens", self.max_tokens >= 1, "must be >= 1"),
            ("temperature", 0 <= self.temperature <= 100, "must be in [0, 100] (0 is greedy)"),
            ("top_p", 0 < self.top_p <= 1, "must be in (0, 1] (1 disables nucleus sampling)"),
            ("top_k", self.top_k >= 0, "must be >= 0 (0 disables top-k)"),
            ("min_tokens", 0 <= self.min_tokens <= self.max_tokens, f"must be in [0, max_tokens={self.max_tokens}]"),
            ("repetition_penalty", self.repetition_penalty > 0, "must be > 0 (1 disables it)"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "must be in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "must be in [-2, 2]"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must hold non-empty strings"),
        ]
        for name, ok, rule in checks:
            if not ok:
                raise RequestError(f"{name}={getattr(self, name)!r} {rule}", param=name)
        for tok, bias in self.logit_bias:
            if not -100 <= bias <= 100:
                raise RequestError(f"logit_bias[{tok}]={bias} must be in [-100, 100]", param="logit_bias")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def plain(self) -> bool:
        """No logits processor applies: greedy rows like this are one batched argmax."""
        return (self.repetition_penalty == 1.0 and not self.presence_penalty and not self.frequency_penalty
                and not self.logit_bias and self.min_tokens == 0)

    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


class Row(Protocol):
    """What the sampler reads of a running request."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator | None


def new_generator(seed: int | None, device: torch.device) -> torch.Generator:
    """A generator on ``device`` seeded with ``seed``, or with fresh randomness."""
    return torch.Generator(device=device).manual_seed(seed if seed is not None else random.getrandbits(63))


def sample_rows(logits: torch.Tensor, rows: Sequence[Row], stop_ids: Sequence[int]) -> list[int]:
    """One token per row.

    Args:
        logits: (n, V) next-token logits of the rows.
        rows: the n requests, in the same order.
        stop_ids: end-of-sequence ids (suppressed under ``min_tokens``; ``stop_token_ids`` too).
    Returns:
        the n chosen token ids.
    """
    logits = logits.float()
    out: list[int | None] = [None] * len(rows)
    greedy_plain = [i for i, r in enumerate(rows) if r.params.greedy and r.params.plain]
    if greedy_plain:
        picked = greedy_tokens(logits[greedy_plain] if len(greedy_plain) < len(rows) else logits).tolist()
        for i, tok in zip(greedy_plain, picked):
            out[i] = tok
    rest = [i for i in range(len(rows)) if out[i] is None]
    processed = {i: _process(logits[i:i + 1].clone(), rows[i], stop_ids) for i in rest}
    groups: dict[tuple, list[int]] = {}
    for i in rest:
        p = rows[i].params
        if p.greedy:
            out[i] = int(greedy_tokens(processed[i])[0])
        else:
            groups.setdefault((p.temperature, p.top_k, p.top_p), []).append(i)
    for (temperature, top_k, top_p), idx in groups.items():  # filters batched per setting, draws per row
        batch = torch.cat([processed[i] for i in idx]) / temperature
        probs = apply_top_p(apply_top_k(batch, top_k), top_p).softmax(dim=-1)  # (m, V)
        for j, i in enumerate(idx):
            out[i] = int(torch.multinomial(probs[j], 1, generator=rows[i].generator))
    return [int(t) for t in out]


def _process(logits: torch.Tensor, row: Row, stop_ids: Sequence[int]) -> torch.Tensor:
    """The logits processors of one row, (1, V) -> (1, V), in HF's order."""
    p, vocab = row.params, logits.shape[-1]
    if p.logit_bias:
        ids = torch.tensor([t for t, _ in p.logit_bias], device=logits.device)
        logits[0].index_add_(0, ids, torch.tensor([b for _, b in p.logit_bias], device=logits.device))
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(row.prompt_ids + row.output_ids, device=logits.device)[None]  # (1, T)
        logits = apply_repetition_penalty(logits, seen, p.repetition_penalty)
    if (p.presence_penalty or p.frequency_penalty) and row.output_ids:
        counts = torch.bincount(torch.tensor(row.output_ids, device=logits.device), minlength=vocab)[:vocab]
        logits = logits - p.frequency_penalty * counts - p.presence_penalty * (counts > 0)
    if len(row.output_ids) < p.min_tokens:
        banned = [t for t in (*stop_ids, *p.stop_token_ids) if 0 <= t < vocab]
        if banned:
            logits[0, banned] = float("-inf")
    return logits
