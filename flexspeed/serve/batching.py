"""How running requests share the model's forward steps.

:class:`SlotBatcher` (continuous batching, for models the fused runner drives: GPT-2, OPT,
Llama in memory). The runner's static KV cache has one row (*slot*) per running request and
``T_max`` columns. Every decode step writes the new keys of *all* rows at one shared column
``col`` (the runner's ``start``), so rows of different lengths are right-aligned at ``col``, as a
left-padded batch is: row ``r`` holds its tokens in columns ``start[r]:col`` and its key mask is
True exactly there; positions (rotary or learned) are each row's own, so nothing else in the
runner changes. A request joins between two steps: its prompt is prefilled into its row through
a one-row view of the cache, at columns ``col - len(prompt):col``, over whatever an earlier
request left there (masked out). A finished or cancelled request frees its row at once. When
``col`` reaches ``T_max`` the busy columns are moved left (by the oldest row's start); a prompt
longer than ``col`` moves them right first. With ``T_max`` twice the longest request (the
default) a move happens at most once per ``max_model_len`` steps and copies no more than the
steps in between wrote, so it costs less than one extra token per step. On the CPU a step runs
the rows up to the highest busy one; on an accelerator it runs every slot, a static shape whose
step the runner replays as a CUDA graph.

:class:`WaveBatcher` (static batching, for everything else: the offload runner, families the
fused runner does not cover, ``--batching static``): requests waiting when the model is idle
start together as one left-padded batch through :func:`~flexspeed.inference.generation.step_function`
(the steps ``generate`` runs); each row finishes on its own, and the next wave starts when every
row of this one has finished.

Both give every request exactly the tokens it would get alone: rows never see each other's keys.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING, Protocol

import torch

from flexspeed.inference.fused import FusedRunner, KVCache
from flexspeed.serve.sequence import Sequence

if TYPE_CHECKING:
    import torch.nn as nn

__all__ = ["Batcher", "SlotBatcher", "WaveBatcher"]


class Batcher(Protocol):
    """Runs the forward steps of the requests it admitted."""

    max_rows: int
    """Requests that can run at once."""

    def describe(self) -> str:
        """One line: how requests are batched, and the sizes."""

    def running(self) -> int:
        """Requests admitted and not yet released."""

    def admit(self, waiting: deque[Sequence]) -> None:
        """Take requests from the left of ``waiting`` while there is room (possibly none)."""

    def forward(self) -> tuple[list[Sequence], torch.Tensor]:
        """One step: the admitted requests that need a token now, and their (n, V) next-token logits."""

    def release(self, seq: Sequence) -> None:
        """Forget a finished or cancelled request and free its row."""


class SlotBatcher:
    """Continuous batching over a :class:`FusedRunner`'s static KV cache (see the module docstring).

    Args:
        runner: the model's fused runner.
        slots: rows of the cache (requests running at once).
        cache_len: columns of the cache; every request needs prompt + max_tokens <= this.
    """

    def __init__(self, runner: FusedRunner, slots: int, cache_len: int) -> None:
        self.runner, self.max_rows = runner, slots
        self.cache: KVCache = runner.new_cache(slots, cache_len)
        self.t_max = self.cache.max_len  # the runner may round it up
        self.device = self.cache.k[0].device
        self.rows: list[Sequence | None] = [None] * slots
        self.start = [0] * slots  # first busy column of each row
        self.key_mask = torch.zeros(slots, self.t_max, dtype=torch.bool, device=self.device)  # (slots, T_max)
        self.col = 0  # the column the next decode step writes
        self.pending: list[int] = []  # rows admitted, prompt not yet prefilled
        self.full_batch = self.device.type != "cpu"
        self.moves = 0
        """Times the busy columns were moved (left when the cache end was reached, right for a long prompt)."""
        self._views: dict[tuple[int, int], KVCache] = {}

    def describe(self) -> str:
        size = sum(t.numel() * t.element_size() for t in (*self.cache.k, *self.cache.v))
        return (f"continuous batching: {self.max_rows} slots x {self.t_max} cache columns "
                f"({size / 2**20:.0f} MiB, {self.cache.k[0].dtype}, {self.device.type})")

    def running(self) -> int:
        return sum(r is not None for r in self.rows)

    def admit(self, waiting: deque[Sequence]) -> None:
        for r in range(self.max_rows):
            if not waiting:
                return
            if self.rows[r] is None:
                self.rows[r] = waiting.popleft()
                self.pending.append(r)

    def release(self, seq: Sequence) -> None:
        r = next((i for i, s in enumerate(self.rows) if s is seq), None)
        if r is None:
            return
        self.rows[r] = None
        self.key_mask[r] = False
        if r in self.pending:
            self.pending.remove(r)
        if not self._decoding():
            self.col = 0  # nothing in the cache is needed any more

    def forward(self) -> tuple[list[Sequence], torch.Tensor]:
        seqs, logits = [], []
        decoding = self._decoding()
        if decoding:
            logits.append(self._decode(decoding))
            seqs += [self.rows[r] for r in decoding]
        while self.pending:
            r = self.pending[0]
            logits.append(self._prefill(r))
            seqs.append(self.rows[r])
            self.pending.pop(0)  # from here on its prompt is in the cache (moved with the others)
        return seqs, (torch.cat(logits) if logits else torch.empty(0))

    # ---------------------------------------------------------------- steps

    def _decoding(self) -> list[int]:
        """Rows whose prompt is in the cache and whose last token is to be fed."""
        return [r for r, s in enumerate(self.rows) if s is not None and r not in self.pending]

    def _view(self, r0: int, r1: int) -> KVCache:
        """Rows ``r0:r1`` of the cache (views: a row range of a (B, H, T, hd) buffer is contiguous)."""
        if (r0, r1) == (0, self.max_rows):
            return self.cache  # the runner's own object: its CUDA graphs are bound to it
        view = self._views.get((r0, r1))
        if view is None:
            view = self._views[(r0, r1)] = KVCache([k[r0:r1] for k in self.cache.k], [v[r0:r1] for v in self.cache.v])
        return view

    def _decode(self, rows: list[int]) -> torch.Tensor:
        """One token for every decoding row, written at column ``col``; (len(rows), V) logits."""
        if self.col == self.t_max:
            self._move(-min(self.start[r] for r in rows))
        n = self.max_rows if self.full_batch else rows[-1] + 1
        ids, pos = [0] * n, [0] * n
        for r in rows:
            seq = self.rows[r]
            ids[r], pos[r] = seq.output_ids[-1], seq.n_tokens - 1
        self.key_mask[:n, self.col] = True  # idle rows attend their own (ignored) key, never nothing
        dev = self.device
        ids_t = torch.tensor(ids, device=dev).view(n, 1)
        pos_t = torch.tensor(pos, device=dev).view(n, 1)
        out = self.runner(ids_t, pos_t, self._view(0, n), self.col, self.key_mask[:n])  # (n, 1, V)
        self.col += 1
        return out[rows, -1]

    def _prefill(self, r: int) -> torch.Tensor:
        """Write row ``r``'s prompt at columns ``col - L:col``; (1, V) logits of its last token."""
        seq = self.rows[r]
        L = len(seq.prompt_ids)
        if L > self.col:
            if self._decoding():
                self._move(L - self.col)
            else:
                self.col = L
        begin = self.col - L
        self.key_mask[r] = False
        self.key_mask[r, begin:self.col] = True
        self.start[r] = begin
        ids = torch.tensor(seq.prompt_ids, device=self.device).view(1, L)
        pos = torch.arange(L, device=self.device).view(1, L)
        out = self.runner(ids, pos, self._view(r, r + 1), begin, self.key_mask[r:r + 1, :self.col])  # (1, 1, V)
        return out[:, -1]

    def _move(self, shift: int) -> None:
        """Move every busy column by ``shift`` (left when negative), keys, values and mask alike."""
        rows = self._decoding()
        lo, hi = min(self.start[r] for r in rows), self.col
        assert 0 <= lo + shift and hi + shift <= self.t_max, (lo, hi, shift, self.t_max)
        n = rows[-1] + 1
        for buf in (*self.cache.k, *self.cache.v):  # (B, H, T_max, hd); the ranges overlap: copy out first
            buf[:n, :, lo + shift:hi + shift] = buf[:n, :, lo:hi].clone()
        moved = self.key_mask[:n, lo:hi].clone()
        self.key_mask[:n] = False
        self.key_mask[:n, lo + shift:hi + shift] = moved
        for r in rows:
            self.start[r] += shift
        self.col += shift
        self.moves += 1


class WaveBatcher:
    """Static batching through :func:`~flexspeed.inference.generation.step_function` (see the module docstring).

    Args:
        model: what ``generate`` would be given (an HF model, or a stand-in with an offload runner).
        max_rows: requests per wave.
        max_len: longest prompt plus largest ``max_tokens`` in one wave (the model's positions).
        pad_id: the id fed to finished rows and left padding.
    """

    def __init__(self, model: nn.Module, max_rows: int, max_len: int, pad_id: int, why: str) -> None:
        self.model, self.max_rows, self.max_len, self.pad_id, self.why = model, max_rows, max_len, pad_id, why
        self.wave: list[Sequence] = []
        self.live: list[bool] = []
        self.step = None
        self._prompt: tuple[torch.Tensor, torch.Tensor, int] | None = None
        self.started = False
        self.waves = 0

    def describe(self) -> str:
        return f"static batching ({self.why}): up to {self.max_rows} requests per wave"

    def running(self) -> int:
        return sum(self.live)

    def admit(self, waiting: deque[Sequence]) -> None:
        if self.wave or not waiting:
            return
        longest = most = 0
        while waiting and len(self.wave) < self.max_rows:
            seq = waiting[0]
            L, m = max(longest, len(seq.prompt_ids)), max(most, seq.params.max_tokens)
            if self.wave and L + m > self.max_len:  # rows are left-padded to the longest prompt
                break
            longest, most = L, m
            self.wave.append(waiting.popleft())
        ids = torch.full((len(self.wave), longest), self.pad_id, dtype=torch.long)  # (B, T) left-padded
        mask = torch.zeros_like(ids)
        for i, seq in enumerate(self.wave):
            ids[i, longest - len(seq.prompt_ids):] = torch.tensor(seq.prompt_ids)
            mask[i, longest - len(seq.prompt_ids):] = 1
        self._prompt = (ids, mask, most)
        self.live, self.started = [True] * len(self.wave), False
        self.waves += 1

    def forward(self) -> tuple[list[Sequence], torch.Tensor]:
        if not self.wave:
            return [], torch.empty(0)
        if not self.started:  # (here, not in admit: a failure is one step's, which the engine reports)
            from flexspeed.inference.generation import step_function

            ids, mask, most = self._prompt
            device = _device_of(self.model)
            self.step = step_function(self.model, ids.to(device), mask.to(device), most)
            logits = self.step(None)  # (B, V)
            self.started = True
        else:
            fed = [s.output_ids[-1] if live else self.pad_id for s, live in zip(self.wave, self.live)]
            logits = self.step(torch.tensor(fed, device=_device_of(self.model)))
        rows = [i for i, live in enumerate(self.live) if live]
        return [self.wave[i] for i in rows], logits[rows]

    def release(self, seq: Sequence) -> None:
        for i, s in enumerate(self.wave):
            if s is seq:
                self.live[i] = False
        if not any(self.live):
            self.wave, self.live, self.step, self._prompt = [], [], None, None


def _device_of(model: nn.Module) -> torch.device:
    from flexspeed.inference.offload.runner import get_offload_runner

    runner = get_offload_runner(model)
    if runner is not None:
        return runner.device
    ref = next(model.parameters(), None)
    return ref.device if ref is not None else torch.device("cpu")
