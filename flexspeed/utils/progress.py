"""Progress of long work (loading a checkpoint, building an offload store): a bar redrawn in place
on a terminal, a log line every few seconds otherwise.

Quiet for work that finishes within ``after`` seconds (default 2 s), so fast loads print nothing
new. Follows the ``flexspeed`` logger: nothing where it does not log INFO (ranks other than 0,
``FLEXSPEED_LOG_LEVEL=warning`` or ``off``). The bar goes to the stream of the logger's handler
(stderr by default) when that stream is a TTY; otherwise lines go through the logger itself.

    with Progress("init_inference: loading checkpoint", total=n, unit="tensors") as bar:
        for ...:
            bar.update(1, note=human_bytes(read))
"""

from __future__ import annotations

import logging
import sys
import time
from typing import IO

from flexspeed.utils.logging import ensure_handler, logger

__all__ = ["Progress"]

_WIDTH = 30


def _stream() -> IO[str]:
    for handler in logger.handlers:
        stream = getattr(handler, "stream", None)
        if stream is not None:
            return stream
    return sys.stderr


def _isatty(stream: IO[str]) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class Progress:
    """``update()`` as work completes; ``close()`` (or the ``with`` block's end) when done.

    Args:
        desc: what is being done (the line's prefix).
        total: units of work in all (``None`` or 0: unknown, no percentage).
        unit: their name (``"tensors"``, ``"layers"``).
        after: seconds of work before anything is shown (default :attr:`default_after`, 2 s).
        every: seconds between log lines (non-TTY; default 10 s); the bar redraws at most every 0.1 s.
        stream: where the bar goes (default the logger handler's stream); ``tty`` overrides the
            TTY check (tests).
    """

    default_after = 2.0
    """``after`` when not given (tests set 0 to see every report)."""
    default_every = 10.0

    def __init__(self, desc: str, total: int | None, unit: str = "", *, after: float | None = None,
                 every: float | None = None, stream: IO[str] | None = None, tty: bool | None = None) -> None:
        ensure_handler()
        self.desc, self.total, self.unit = desc, int(total or 0), unit
        self.after = float(self.default_after if after is None else after)
        self.every = float(self.default_every if every is None else every)
        self.done, self.note = 0, ""
        self.enabled = logger.isEnabledFor(logging.INFO)
        self.stream = stream if stream is not None else _stream()
        self.tty = _isatty(self.stream) if tty is None else tty
        self.start = time.perf_counter()
        self._shown = False  # anything printed yet
        self._last = -1e9  # when last printed
        self._closed = False
        self._shown_done = -1  # units done when last printed

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close(ok=exc[0] is None)

    def _text(self) -> str:
        elapsed = time.perf_counter() - self.start
        count = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        unit = f" {self.unit}" if self.unit else ""
        note = f", {self.note}" if self.note else ""
        if self.total and self.tty:
            filled = int(_WIDTH * min(1.0, self.done / self.total))
            return (f"[flexspeed] {self.desc} [{'#' * filled}{'.' * (_WIDTH - filled)}] "
                    f"{100 * self.done / self.total:3.0f}% {count}{unit}{note} {elapsed:.1f} s")
        pct = f"{100 * self.done / self.total:.0f}% ({count}{unit})" if self.total else f"{count}{unit}"
        return f"{self.desc}: {pct}{note} after {elapsed:.1f} s"

    def update(self, n: int = 1, note: str | None = None) -> None:
        """``n`` more units done; ``note`` replaces the text after the count (e.g. bytes read)."""
        self.done += n
        if note is not None:
            self.note = note
        if not self.enabled or self._closed:
            return
        now = time.perf_counter()
        if now - self.start < self.after:
            return
        if self.tty:
            if now - self._last >= 0.1:
                self.stream.write("\r" + self._text())
                self.stream.flush()
                self._shown, self._last, self._shown_done = True, now, self.done
        elif now - self._last >= self.every:
            logger.info(self._text())
            self._shown, self._last, self._shown_done = True, now, self.done

    def close(self, ok: bool = True) -> None:
        """Finish: the bar's last state and a newline (TTY), or a closing line if any was logged
        and the last one is out of date."""
        if self._closed:
            return
        self._closed = True
        if not self.enabled or not self._shown:
            return
        if self.tty:
            self.stream.write("\r" + self._text() + ("" if ok else " (stopped)") + "\n")
            self.stream.flush()
        elif self._shown_done != self.done or not ok:  # the last line already says it all
            logger.info(self._text() + ("" if ok else " (stopped)"))
