"""The OpenAI-compatible HTTP API (Starlette): completions, chat completions, models, health, metrics.

The handlers only parse, tokenize and queue: every request's sequences (``n`` choices per
prompt) go to the :class:`~flexspeed.serve.engine.Engine`, whose worker thread reports their
text through an asyncio queue of this request. Streaming answers are server-sent events
(``data: {chunk}`` ... ``data: [DONE]``). While a request waits or streams, a second task
listens for the client's disconnect; when it comes, the request's unfinished sequences are
cancelled, which frees their batch rows before the next step. Anything a request gets wrong is
answered with OpenAI's error JSON and a 4xx status; an unexpected failure with a 500 and the
same JSON (the traceback goes to the server's log, never to the client).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from flexspeed.serve.engine import Completion, Engine
from flexspeed.serve.errors import RequestError, error_body
from flexspeed.serve.protocol import (ChatRequest, CompletionRequest, chat_body, chat_chunk, chat_messages,
                                      completion_body, completion_chunk, new_id, parse_request, sampling_params, usage)
from flexspeed.serve.sequence import Output, Sequence

__all__ = ["build_app"]


class _Job:
    """The sequences of one HTTP request, and the queue their outputs arrive on."""

    def __init__(self, engine: Engine) -> None:
        self.engine, self.loop = engine, asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Output]] = asyncio.Queue()
        self.seqs: list[Sequence] = []
        self.prompt_tokens = 0

    def submit(self, ids: list[int], params, param: str) -> None:
        index = len(self.seqs)

        def sink(out: Output, index: int = index) -> None:  # on the engine thread
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, out))

        try:
            self.seqs.append(self.engine.submit(ids, params, sink, param))
        except RequestError:
            self.cancel()
            raise

    def cancel(self) -> None:
        for seq in self.seqs:
            seq.cancel()

    async def outputs(self) -> AsyncIterator[tuple[int, Output]]:
        """Every output of every sequence, until each has finished."""
        left = len(self.seqs)
        while left:
            index, out = await self.queue.get()
            if out.finish_reason is not None:
                left -= 1
            yield index, out


async def _until_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class _EventStream(StreamingResponse):
    """Server-sent events that cancel the job when the client goes away (or the stream ends)."""

    def __init__(self, content: AsyncIterator[str], job: _Job) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.job = job

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as tg:
                async def watch() -> None:
                    await _until_disconnect(receive)
                    tg.cancel_scope.cancel()

                tg.start_soon(watch)
                try:
                    await self.stream_response(send)
                except OSError:  # the client went away mid-send
                    pass
                tg.cancel_scope.cancel()
        finally:
            self.job.cancel()  # no-op for finished sequences; frees the rows of the others


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _collect(request: Request, job: _Job) -> list[Completion]:
    """Wait for every sequence; cancel them all if the client disconnects first."""
    done = [Completion() for _ in job.seqs]
    watcher = asyncio.ensure_future(_until_disconnect(request.receive))
    try:
        async def gather() -> None:
            async for index, out in job.outputs():
                done[index].add(out)

        gatherer = asyncio.ensure_future(gather())
        finished, _ = await asyncio.wait({gatherer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if gatherer not in finished:
            gatherer.cancel()
            job.cancel()
            raise RequestError("the client disconnected", status=499)
        gatherer.result()
    finally:
        watcher.cancel()
    failed = next((c for c in done if c.finish_reason in ("error", "abort")), None)
    if failed is not None:
        status = 503 if failed.finish_reason == "abort" else 500
        raise RequestError(failed.error or "the request was aborted", status=status, kind="server_error")
    return done


class API:
    """The routes over one engine, serving the model under ``model_name``."""

    def __init__(self, engine: Engine, model_name: str) -> None:
        self.engine, self.name, self.created = engine, model_name, int(time.time())

    async def _body(self, request: Request) -> Any:
        raw = await request.body()
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise RequestError(f"the request body is not valid JSON ({exc})") from None

    def _check_model(self, name: str | None) -> None:
        if name is not None and name != self.name:
            raise RequestError(f"The model `{name}` does not exist. This server serves `{self.name}` (see "
                               "/v1/models).", param="model", status=404, kind="model_not_found")

    def _prompts(self, prompt: Any) -> list[tuple[list[int], str | None]]:
        """(token ids, text or None) of each prompt of a completion request."""
        tok = self.engine.tokenizer
        if isinstance(prompt, str):
            return [(tok.encode(prompt), prompt)]
        if not prompt:
            raise RequestError("prompt is an empty list; give a string, a list of strings or token ids", param="prompt")
        if all(isinstance(p, str) for p in prompt):
            return [(tok.encode(p), p) for p in prompt]
        if all(isinstance(p, int) for p in prompt):
            return [(list(prompt), None)]
        return [(list(p), None) for p in prompt]

    # ---------------------------------------------------------------- routes

    async def completions(self, request: Request) -> Response:
        req = parse_request(CompletionRequest, await self._body(request))
        self._check_model(req.model)
        prompts = self._prompts(req.prompt)
        max_tokens = 16 if req.max_tokens is None else req.max_tokens
        job = _Job(self.engine)
        echoes = []
        for ids, text in prompts:
            job.prompt_tokens += len(ids)
            for j in range(req.n):
                job.submit(ids, sampling_params(req, max_tokens, j), "prompt")
                echoes.append((text if text is not None else self.engine.tokenizer.decode(ids)) if req.echo else "")
        rid = new_id("cmpl")
        if req.stream:
            include = req.stream_options is not None and req.stream_options.include_usage
            return _EventStream(self._stream_completion(job, rid, echoes, include), job)
        done = await _collect(request, job)
        choices = [(echo + c.text, c.finish_reason) for echo, c in zip(echoes, done)]
        return JSONResponse(completion_body(rid, self.name, choices,
                                            usage(job.prompt_tokens, sum(c.completion_tokens for c in done))))

    async def chat(self, request: Request) -> Response:
        req = parse_request(ChatRequest, await self._body(request))
        self._check_model(req.model)
        ids = self.engine.tokenizer.encode_chat(chat_messages(req))
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = asked if asked is not None else max(1, self.engine.max_model_len - len(ids))
        job = _Job(self.engine)
        job.prompt_tokens = len(ids)
        for j in range(req.n):
            job.submit(ids, sampling_params(req, max_tokens, j), "messages")
        rid = new_id("chatcmpl")
        if req.stream:
            include = req.stream_options is not None and req.stream_options.include_usage
            return _EventStream(self._stream_chat(job, rid, include), job)
        done = await _collect(request, job)
        return JSONResponse(chat_body(rid, self.name, [(c.text, c.finish_reason) for c in done],
                                      usage(job.prompt_tokens, sum(c.completion_tokens for c in done))))

    async def _stream_completion(self, job: _Job, rid: str, echoes: list[str], include_usage: bool) -> AsyncIterator[str]:
        created, made = int(time.time()), [0] * len(job.seqs)
        for i, echo in enumerate(echoes):
            if echo:
                yield _sse(completion_chunk(rid, self.name, created, i, echo, None))
        async for i, out in job.outputs():
            made[i] = out.completion_tokens
            if out.error is not None or out.finish_reason == "abort":
                yield _sse(error_body(out.error or "the request was aborted", "server_error", code=500))
                continue
            if out.text or out.finish_reason:
                yield _sse(completion_chunk(rid, self.name, created, i, out.text, out.finish_reason))
        if include_usage:
            yield _sse({"id": rid, "object": "text_completion", "created": created, "model": self.name,
                        "choices": [], "usage": usage(job.prompt_tokens, sum(made))})
        yield "data: [DONE]\n\n"

    async def _stream_chat(self, job: _Job, rid: str, include_usage: bool) -> AsyncIterator[str]:
        created, made = int(time.time()), [0] * len(job.seqs)
        for i in range(len(job.seqs)):
            yield _sse(chat_chunk(rid, self.name, created, i, {"role": "assistant", "content": ""}, None))
        async for i, out in job.outputs():
            made[i] = out.completion_tokens
            if out.error is not None or out.finish_reason == "abort":
                yield _sse(error_body(out.error or "the request was aborted", "server_error", code=500))
                continue
            if out.text:
                yield _sse(chat_chunk(rid, self.name, created, i, {"content": out.text}, None))
            if out.finish_reason:
                yield _sse(chat_chunk(rid, self.name, created, i, {}, out.finish_reason))
        if include_usage:
            yield _sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": self.name,
                        "choices": [], "usage": usage(job.prompt_tokens, sum(made))})
        yield "data: [DONE]\n\n"

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [
            {"id": self.name, "object": "model", "created": self.created, "owned_by": "flexspeed",
             "max_model_len": self.engine.max_model_len}]})

    async def health(self, request: Request) -> Response:
        if not self.engine.alive:
            return JSONResponse(error_body(f"the engine is not running ({self.engine.failure or 'stopped'})",
                                           "server_error", code=503), status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics(self, request: Request) -> Response:
        return PlainTextResponse(self.engine.metrics.render(), media_type="text/plain; version=0.0.4")


async def _request_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestError)
    return JSONResponse(error_body(str(exc), exc.kind, exc.param, exc.status), status_code=exc.status)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    text = {404: f"no route {request.url.path}; the API is under /v1 (completions, chat/completions, models), with "
                 "/health and /metrics", 405: f"{request.method} is not allowed on {request.url.path}"}
    message = text.get(exc.status_code, str(exc.detail))
    return JSONResponse(error_body(message, "invalid_request_error", code=exc.status_code), status_code=exc.status_code)


async def _server_error(request: Request, exc: Exception) -> Response:
    # (Starlette re-raises it after this answer, so the server's log gets the traceback)
    return JSONResponse(error_body(f"internal error ({type(exc).__name__}: {exc})", "server_error", code=500),
                        status_code=500)


def build_app(engine: Engine, model_name: str) -> Starlette:
    """The ASGI application serving ``engine`` (started by the caller) as model ``model_name``."""
    api = API(engine, model_name)
    routes = [
        Route("/v1/completions", api.completions, methods=["POST"]),
        Route("/v1/chat/completions", api.chat, methods=["POST"]),
        Route("/v1/models", api.models, methods=["GET"]),
        Route("/health", api.health, methods=["GET"]),
        Route("/metrics", api.metrics, methods=["GET"]),
    ]
    handlers = {RequestError: _request_error, HTTPException: _http_error, Exception: _server_error}
    return Starlette(routes=routes, exception_handlers=handlers)
