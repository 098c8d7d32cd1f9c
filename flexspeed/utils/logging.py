"""``deepspeed.utils.logger`` / ``log_dist``: flexspeed's logger and rank-filtered logging."""

from __future__ import annotations

import logging

__all__ = ["logger", "log_dist", "print_dist"]

logger = logging.getLogger("flexspeed")
"""The ``flexspeed`` logger every part of flexspeed logs to (DeepSpeed's is named ``DeepSpeed``)."""


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
