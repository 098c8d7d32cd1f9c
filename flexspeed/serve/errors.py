"""The errors a request can cause, in the shape of OpenAI's error JSON."""

from __future__ import annotations

from typing import Any

__all__ = ["RequestError", "QueueFull", "error_body"]


class RequestError(ValueError):
    """A request the server cannot run as given (HTTP 4xx): the message names the field, its value and the fix.

    Attributes:
        param: the request field at fault (OpenAI's ``param``), or ``None``.
        status: the HTTP status (400 unless said otherwise).
        kind: OpenAI's error ``type``.
    """

    def __init__(self, message: str, param: str | None = None, status: int = 400,
                 kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.param, self.status, self.kind = param, status, kind


class QueueFull(RequestError):
    """Every slot is busy and the waiting queue is at its bound (HTTP 429)."""

    def __init__(self, waiting: int, bound: int) -> None:
        super().__init__(f"the server is at capacity: {waiting} requests are already waiting (max_queue={bound}); "
                         "retry later, or start the server with a larger --max-queue or --max-num-seqs",
                         status=429, kind="rate_limit_exceeded")


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None,
               code: int | str | None = None) -> dict[str, Any]:
    """OpenAI's error JSON: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
