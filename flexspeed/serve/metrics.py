"""The server's counters, gauges and latency histograms, written in Prometheus' text format (0.0.4).

Updated by the engine thread, read by ``/metrics`` on the server's thread: one lock guards them.
"""

from __future__ import annotations

import threading
import time
from collections import deque

__all__ = ["Metrics", "LATENCY_BUCKETS", "TOKEN_BUCKETS"]

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
"""Upper bounds (seconds) of the time-to-first-token and request-latency histograms."""
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
"""Upper bounds (seconds) of the time-per-output-token histogram."""
_RATE_WINDOW = 10.0  # seconds of history behind the tokens/s gauge


class _Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets, self.counts, self.sum, self.count = buckets, [0] * len(buckets), 0.0, 0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.count}"]


class Metrics:
    """What ``/metrics`` reports (names prefixed ``flexspeed_``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: dict[str, int] = {}
        self.rejected = 0
        self.running = 0
        self.waiting = 0
        self.slots = 0
        self.ttft = _Histogram(LATENCY_BUCKETS)
        self.tpot = _Histogram(TOKEN_BUCKETS)
        self.e2e = _Histogram(LATENCY_BUCKETS)
        self._recent: deque[tuple[float, int]] = deque()  # (time, tokens) of recent steps
        self._start = time.monotonic()

    def tokens(self, n: int, now: float | None = None) -> None:
        """``n`` tokens were generated in a step."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self.generation_tokens += n
            self._recent.append((now, n))
            while self._recent and self._recent[0][0] < now - _RATE_WINDOW:
                self._recent.popleft()

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def finish(self, reason: str, prompt_tokens: int, completion_tokens: int, seconds: float,
               decode_seconds: float | None) -> None:
        """A request ended: its latency, and its time per output token after the first."""
        with self._lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1
            self.prompt_tokens += prompt_tokens
            self.e2e.observe(seconds)
            if decode_seconds is not None and completion_tokens > 1:
                self.tpot.observe(decode_seconds / (completion_tokens - 1))

    def reject(self) -> None:
        with self._lock:
            self.rejected += 1

    def load(self, running: int, waiting: int, slots: int) -> None:
        with self._lock:
            self.running, self.waiting, self.slots = running, waiting, slots

    def tokens_per_second(self, now: float | None = None) -> float:
        """Tokens generated over the last 10 s (or since the start, if sooner), per second."""
        now = time.monotonic() if now is None else now
        with self._lock:
            made = sum(n for t, n in self._recent if t >= now - _RATE_WINDOW)
        return made / max(min(_RATE_WINDOW, now - self._start), 1e-3)

    def render(self) -> str:
        """The text exposition format."""
        rate = self.tokens_per_second()
        with self._lock:
            out: list[str] = []

            def metric(name: str, kind: str, help_text: str, lines: list[str]) -> None:
                out.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *lines])

            metric("flexspeed_num_requests_running", "gauge", "Requests in the running batch.",
                   [f"flexspeed_num_requests_running {self.running}"])
            metric("flexspeed_num_requests_waiting", "gauge", "Requests queued for a batch slot (queue depth).",
                   [f"flexspeed_num_requests_waiting {self.waiting}"])
            metric("flexspeed_batch_slots", "gauge", "Requests that can run at once.",
                   [f"flexspeed_batch_slots {self.slots}"])
            metric("flexspeed_generation_tokens_per_second", "gauge",
                   f"Tokens generated per second over the last {_RATE_WINDOW:g} s.",
                   [f"flexspeed_generation_tokens_per_second {rate:.3f}"])
            metric("flexspeed_prompt_tokens_total", "counter", "Prompt tokens of finished requests.",
                   [f"flexspeed_prompt_tokens_total {self.prompt_tokens}"])
            metric("flexspeed_generation_tokens_total", "counter", "Tokens generated.",
                   [f"flexspeed_generation_tokens_total {self.generation_tokens}"])
            metric("flexspeed_requests_finished_total", "counter",
                   "Requests ended, by finish reason (stop, length, abort: cancelled or disconnected, error).",
                   [f'flexspeed_requests_finished_total{{finish_reason="{r}"}} {n}' for r, n in sorted(self.finished.items())])
            metric("flexspeed_request_rejected_total", "counter", "Requests refused with 429 (queue full).",
                   [f"flexspeed_request_rejected_total {self.rejected}"])
            metric("flexspeed_time_to_first_token_seconds", "histogram", "Arrival to first token.",
                   self.ttft.lines("flexspeed_time_to_first_token_seconds"))
            metric("flexspeed_time_per_output_token_seconds", "histogram", "Mean time between tokens of a request.",
                   self.tpot.lines("flexspeed_time_per_output_token_seconds"))
            metric("flexspeed_e2e_request_latency_seconds", "histogram", "Arrival to last token.",
                   self.e2e.lines("flexspeed_e2e_request_latency_seconds"))
        return "\n".join(out) + "\n"
