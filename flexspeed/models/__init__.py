"""Small reference models used by the demo, the tests and the benchmarks."""

from __future__ import annotations

from flexspeed.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
