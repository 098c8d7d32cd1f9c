"""The one error type for anything a user can get wrong in a configuration."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

__all__ = ["ConfigError", "closest", "did_you_mean"]


class ConfigError(ValueError):
    """A configuration problem the user can fix.

    Attributes:
        key: dotted path of the offending key (``"zero_optimization.stage"``), or ``None``.
    """

    def __init__(self, message: str, key: str | None = None) -> None:
        self.key = key
        prefix = f"[{key}] " if key else ""
        super().__init__(prefix + message)


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate closest to ``name`` (case-insensitive), or ``None`` if nothing is close."""
    cands = list(candidates)
    lowered = {c.lower(): c for c in cands}
    hit = difflib.get_close_matches(name.lower(), list(lowered), n=1, cutoff=0.6)
    return lowered[hit[0]] if hit else None


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """``" Did you mean 'x'?"`` or an empty string."""
    hit = closest(name, candidates)
    return f" Did you mean {hit!r}?" if hit else ""
