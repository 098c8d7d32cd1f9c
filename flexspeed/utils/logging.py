"""``deepspeed.utils.logger`` / ``log_dist``: flexspeed's logger and rank-filtered logging."""

from __future__ import annotations

import logging
import os
import sys
import warnings

__all__ = ["logger", "log_dist", "print_dist", "ensure_handler", "human_bytes", "LEVEL_ENV"]

logger = logging.getLogger("flexspeed")
"""The ``flexspeed`` logger every part of flexspeed logs to (DeepSpeed's is named ``DeepSpeed``)."""

LEVEL_ENV = "FLEXSPEED_LOG_LEVEL"
"""``debug``/``info``/``warning``/``error``/``off``; default ``info`` on rank 0, ``warning`` elsewhere."""


def _rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


def human_bytes(n: float) -> str:
    """``1.23 GB`` / ``45.6 MB`` / ``789 kB`` (decimal units, as disk sizes are quoted)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.{2 if unit == 'GB' else 1}f} {unit}"
    return f"{int(n)} B"


def ensure_handler() -> logging.Logger:
    """Give the ``flexspeed`` logger a stderr handler, once, unless the application configured logging.

    Long work (checkpoint save/load, inference loading, building an offload store) then says what
    it did, with bytes and seconds, on rank 0; other ranks print warnings and errors only. The
    level comes from ``FLEXSPEED_LOG_LEVEL`` (``off`` silences flexspeed). An application that
    configured logging itself (a handler on the root or the ``flexspeed`` logger) keeps its setup.
    """
    if logger.handlers or logging.getLogger().handlers:
        return logger
    wanted = os.environ.get(LEVEL_ENV, "").strip().lower()
    if wanted == "off":
        logger.addHandler(logging.NullHandler())
        logger.setLevel(logging.CRITICAL + 1)
        return logger
    level = getattr(logging, wanted.upper(), None) if wanted else None
    if not isinstance(level, int):
        level = logging.INFO if _rank() == 0 else logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("[flexspeed] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # one line per record, not a second copy through an unconfigured root
    return logger


def _rank_message(message: str, ranks: list[int] | None) -> str | None:
    """``"[Rank r] message"`` when this rank should log it, else ``None``.

    Without a process group every call logs (rank -1). With one, only the ranks in ``ranks``
    log; ``[-1]`` means all; ``None`` or ``[]`` means none (DeepSpeed's rule).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return f"[Rank -1] {message}"
    rank = dist.get_rank()
    ranks = list(ranks or [])
    if ranks and (ranks[0] == -1 or rank in ranks):
        return f"[Rank {rank}] {message}"
    return None


def log_dist(message: str, ranks: list[int] | None = None, level: int = logging.INFO) -> None:
    """Log ``message`` at ``level`` on the given ranks (``[0]``: rank 0; ``[-1]``: every rank).

    Args:
        message: the text.
        ranks: ranks that log it; without a process group it is always logged.
        level: a ``logging`` level.
    """
    text = _rank_message(message, ranks)
    if text is not None:
        logger.log(level, text)


def print_dist(message: str, ranks: list[int] | None = None) -> None:
    """Print ``message`` on the given ranks whatever the log level (same rank rule as :func:`log_dist`)."""
    text = _rank_message(message, ranks)
    if text is not None:
        print(text, flush=True)


_warned: set[str] = set()


def warn_once(message: str, notes: list[str] | None = None, *, stacklevel: int = 2) -> None:
    """Emit ``message`` as a UserWarning once per process, and record it in ``notes``.

    ``stacklevel`` counts as ``warnings.warn``'s does, from the caller of this function (2: its caller).
    """
    if notes is not None and message not in notes:
        notes.append(message)
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, UserWarning, stacklevel=stacklevel + 1)


def reset_warn_once() -> None:
    """Forget which messages :func:`warn_once` emitted, so each is emitted again (once): for tests."""
    _warned.clear()
