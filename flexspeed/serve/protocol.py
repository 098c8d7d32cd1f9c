"""The OpenAI request bodies the server accepts, checked field by field, and the response bodies it writes.

Unknown fields are refused (400, naming the field), as OpenAI does; fields OpenAI defines that
this server does not implement (``logprobs``, ``suffix``, tools, ...) are refused when set,
never silently ignored. vLLM's extensions ``top_k``, ``min_tokens``, ``repetition_penalty``,
``ignore_eos`` and ``stop_token_ids`` are accepted.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from flexspeed.config.errors import did_you_mean
from flexspeed.serve.errors import RequestError
from flexspeed.serve.sampling import SamplingParams

__all__ = ["CompletionRequest", "ChatRequest", "parse_request", "sampling_params", "chat_messages",
           "completion_body", "chat_body", "completion_chunk", "chat_chunk", "usage"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    """Send a last chunk with the token counts."""
    continuous_usage_stats: bool = False


class _Common(_Strict):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(default=1, ge=1, le=128)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    top_k: int | None = None
    min_tokens: int = 0
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None


class CompletionRequest(_Common):
    """``POST /v1/completions``."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None
    logprobs: int | None = None


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_call_id: str | None = None


class ChatRequest(_Common):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None


def parse_request(kind: type[_Common], body: Any) -> Any:
    """Validate a JSON body.

    Raises:
        RequestError: not an object, an unknown field, or a value of the wrong type or range.
    """
    if not isinstance(body, dict):
        raise RequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    try:
        return kind.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            name = str(first["loc"][-1])
            hint = did_you_mean(name, kind.model_fields) if len(first["loc"]) == 1 else ""
            raise RequestError(f"unknown field {where!r} in the request.{hint}", param=where) from None
        got = first.get("input")
        shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
        raise RequestError(f"{where}: {first['msg']}{shown}", param=where or None) from None


def _refuse(req: _Common) -> None:
    """Refuse, by name, what OpenAI defines and this server does not do."""
    unsupported = {
        "logprobs": bool(req.logprobs) if isinstance(req, ChatRequest) else req.logprobs is not None,
        "top_logprobs": isinstance(req, ChatRequest) and req.top_logprobs is not None,
        "suffix": isinstance(req, CompletionRequest) and req.suffix is not None,
        "tools": isinstance(req, ChatRequest) and bool(req.tools or req.functions),
        "tool_choice": isinstance(req, ChatRequest) and req.tool_choice not in (None, "none"),
        "function_call": isinstance(req, ChatRequest) and req.function_call not in (None, "none"),
    }
    for name, used in unsupported.items():
        if used:
            raise RequestError(f"{name} is not supported by this server; remove it from the request", param=name)
    if isinstance(req, CompletionRequest) and req.best_of not in (None, req.n):
        raise RequestError(f"best_of={req.best_of} is not supported (only best_of == n={req.n}); remove it",
                           param="best_of")
    if isinstance(req, ChatRequest) and req.response_format not in (None, {"type": "text"}):
        raise RequestError(f"response_format={req.response_format} is not supported (only {{'type': 'text'}})",
                           param="response_format")
    if req.stream_options is not None and not req.stream:
        raise RequestError("stream_options is only allowed with stream=true", param="stream_options")


def sampling_params(req: _Common, max_tokens: int, choice: int = 0) -> SamplingParams:
    """The request's sampling settings for choice ``choice`` (seeded ``seed + choice``, so choices differ).

    Raises:
        RequestError: an unsupported field is set, or a value is out of range.
    """
    _refuse(req)
    bias = []
    for key, value in (req.logit_bias or {}).items():
        try:
            bias.append((int(key), float(value)))
        except ValueError:
            raise RequestError(f"logit_bias key {key!r} is not a token id", param="logit_bias") from None
    stop = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    top_k = req.top_k if req.top_k not in (None, -1) else 0
    return SamplingParams(
        max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p, top_k=top_k, min_tokens=min(req.min_tokens, max_tokens),
        seed=None if req.seed is None else req.seed + choice, stop=stop, stop_token_ids=tuple(req.stop_token_ids or ()),
        ignore_eos=req.ignore_eos, repetition_penalty=req.repetition_penalty or 1.0,
        presence_penalty=req.presence_penalty, frequency_penalty=req.frequency_penalty, logit_bias=tuple(bias))


def chat_messages(req: ChatRequest) -> list[dict[str, Any]]:
    """The messages as chat templates read them (text parts joined; ``developer`` as ``system``)."""
    out = []
    for m in req.messages:
        content = m.content if isinstance(m.content, str) or m.content is None else "".join(p.text for p in m.content)
        msg: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role, "content": content or ""}
        if m.name is not None:
            msg["name"] = m.name
        out.append(msg)
    return out


# ---------------------------------------------------------------------- responses

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(rid: str, model: str, choices: list[tuple[str, str | None]], use: dict[str, int]) -> dict[str, Any]:
    """A ``text_completion`` object from (text, finish_reason) per choice."""
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": reason}
                        for i, (text, reason) in enumerate(choices)], "usage": use}


def chat_body(rid: str, model: str, choices: list[tuple[str, str | None]], use: dict[str, int]) -> dict[str, Any]:
    """A ``chat.completion`` object from (text, finish_reason) per choice."""
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": reason} for i, (text, reason) in enumerate(choices)], "usage": use}


def completion_chunk(rid: str, model: str, created: int, index: int, text: str, reason: str | None) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": reason}]}


def chat_chunk(rid: str, model: str, created: int, index: int, delta: dict[str, Any],
               reason: str | None) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}]}
