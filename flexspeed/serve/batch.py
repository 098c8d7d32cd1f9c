"""Batch generation from a JSONL file of prompts to a JSONL file of completions, resumable.

Input, one JSON object per line::

    {"id": "q1", "prompt": "Once upon a time"}
    {"id": "q2", "messages": [{"role": "user", "content": "Hi!"}], "max_new_tokens": 64}

``id`` (a string or an integer; default: the line number) and exactly one of ``prompt`` (text) or
``messages`` (a chat, rendered with the tokenizer's chat template), plus, optionally, generation
options under HF's names (:data:`LINE_OPTIONS`), which override the command line's for that line.

Output, one JSON object per finished line, in the order they finish::

    {"id": "q1", "text": "...", "prompt_tokens": 5, "completion_tokens": 32, "finish_reason": "length"}
    {"id": 7, "line": 7, "error": "line 7: unknown field 'promt'. Did you mean 'prompt'?"}

A bad line (not JSON, unknown field, wrong type, too long for the model) gets an error record and
the rest of the file is processed. The output is append-only and flushed after every record; a
rerun skips every id already in it (completions and errors alike), so a killed run loses only the
lines that were running. A last line cut short by the kill is removed before appending.
"""

from __future__ import annotations

import json
import os
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from flexspeed.config.errors import ConfigError, did_you_mean
from flexspeed.serve.engine import Completion, Engine
from flexspeed.serve.errors import RequestError
from flexspeed.serve.sampling import SamplingParams
from flexspeed.serve.sequence import Output

__all__ = ["PromptLine", "read_prompts", "done_ids", "id_key", "run_batch", "sampling_from_hf", "LINE_OPTIONS",
           "BatchSummary"]

LINE_OPTIONS: dict[str, type | tuple[type, ...]] = {
    "max_new_tokens": int, "min_new_tokens": int, "do_sample": bool, "temperature": (int, float),
    "top_k": int, "top_p": (int, float), "repetition_penalty": (int, float), "stop_strings": (str, list),
    "seed": int,
}
"""Per-line generation options (HF ``generate``'s names) and their JSON types."""
_FIELDS = ("id", "prompt", "messages", *LINE_OPTIONS)


@dataclass
class PromptLine:
    """One input line: its id, and its token ids and options, or why it cannot run."""

    line: int
    id: Any
    ids: list[int] = field(default_factory=list)
    options: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def id_key(value: Any) -> str:
    """Ids compare by their JSON form (1 and "1" are different ids)."""
    return json.dumps(value, sort_keys=True)


def sampling_from_hf(options: dict[str, Any]) -> SamplingParams:
    """HF ``generate`` options -> :class:`SamplingParams` (greedy unless ``do_sample``, as in HF).

    Raises:
        RequestError: a value out of range (named).
    """
    stops = options.get("stop_strings") or ()
    return SamplingParams(
        max_tokens=options.get("max_new_tokens", 32), min_tokens=options.get("min_new_tokens", 0),
        temperature=float(options.get("temperature", 1.0)) if options.get("do_sample") else 0.0,
        top_k=options.get("top_k") or 0, top_p=float(options.get("top_p", 1.0)),
        repetition_penalty=float(options.get("repetition_penalty", 1.0)),
        stop=(stops,) if isinstance(stops, str) else tuple(stops), seed=options.get("seed"))


def _parse(n: int, text: str) -> tuple[Any, dict[str, Any]]:
    """(id, record) of line ``n``; raises ValueError with a message naming the line and field."""
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"line {n}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(rec, dict):
        raise ValueError(f"line {n}: expected a JSON object, got {type(rec).__name__}")
    rid = rec.get("id", n)
    if not isinstance(rid, (str, int)) or isinstance(rid, bool):
        raise ValueError(f"line {n}: field 'id' must be a string or an integer, got {rid!r}")
    return rid, rec


def _check(n: int, rec: dict[str, Any]) -> None:
    for name in rec:
        if name not in _FIELDS:
            raise ValueError(f"line {n}: unknown field {name!r}.{did_you_mean(name, _FIELDS)} Fields: {', '.join(_FIELDS)}")
    if ("prompt" in rec) == ("messages" in rec):
        raise ValueError(f"line {n}: give exactly one of 'prompt' (text) or 'messages' (a chat)")
    if "prompt" in rec and not isinstance(rec["prompt"], str):
        raise ValueError(f"line {n}: field 'prompt' must be a string, got {type(rec['prompt']).__name__}")
    msgs = rec.get("messages")
    if "messages" in rec and not (isinstance(msgs, list) and msgs and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs)):
        raise ValueError(f"line {n}: field 'messages' must be a non-empty list of {{'role': str, 'content': str}}")
    for name, kind in LINE_OPTIONS.items():
        value = rec.get(name)
        if value is not None and (not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool)):
            raise ValueError(f"line {n}: field {name!r} has the wrong type ({value!r})")


def read_prompts(path: str, tokenize: Callable[[dict[str, Any]], list[int]]) -> list[PromptLine]:
    """Every non-blank line of ``path``, parsed, checked and tokenized (or with its error).

    Args:
        tokenize: record -> token ids (raises RequestError for a chat the template rejects).
    Raises:
        ConfigError: the file cannot be read (key ``prompts``).
    """
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {path!r}: {exc}; --prompts must be a UTF-8 JSONL file",
                          key="prompts") from exc
    out: list[PromptLine] = []
    seen: dict[str, int] = {}
    for n, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        item = PromptLine(n, n)
        try:
            item.id, rec = _parse(n, text)
            if id_key(item.id) in seen:
                raise ValueError(f"line {n}: id {item.id!r} is already used on line {seen[id_key(item.id)]}")
            seen[id_key(item.id)] = n
            _check(n, rec)
            item.options = {k: rec[k] for k in LINE_OPTIONS if rec.get(k) is not None}
            item.ids = tokenize(rec)
        except (ValueError, RequestError) as exc:
            item.error = str(exc) if str(exc).startswith(f"line {n}") else f"line {n}: {exc}"
            if seen.setdefault(id_key(item.id), n) != n:  # an unreadable line whose number another line took as id
                item.id = f"line {n}"
        out.append(item)
    return out


def done_ids(path: str) -> set[str]:
    """Ids recorded in an output file (their JSON form); a cut-off last line is removed first.

    Raises:
        ConfigError: a complete line of the file is not a record (key ``output``).
    """
    if not os.path.exists(path):
        return set()
    with open(path, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a record cut short by a killed run: it is made again
            f.truncate(end)
    ids = set()
    for n, raw in enumerate(data[:end].decode("utf-8", errors="replace").splitlines(), start=1):
        try:
            ids.add(id_key(json.loads(raw)["id"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ConfigError(f"{path}:{n} is not an output record ({raw[:80]!r}); --output must be a file this "
                              "command wrote (or a new path)", key="output") from None
    return ids


@dataclass
class BatchSummary:
    written: int = 0
    errors: int = 0
    skipped: int = 0
    tokens: int = 0
    seconds: float = 0.0


def _record(item: PromptLine, done: Completion | None = None, error: str | None = None) -> dict[str, Any]:
    if error is not None:
        return {"id": item.id, "line": item.line, "error": error}
    return {"id": item.id, "text": done.text, "prompt_tokens": done.prompt_tokens,
            "completion_tokens": done.completion_tokens, "finish_reason": done.finish_reason}


def run_batch(engine: Engine, items: list[PromptLine], output: str, defaults: dict[str, Any],
              on_record: Callable[[int], None] | None = None) -> BatchSummary:
    """Generate every item not already in ``output``, shortest prompts first, appending a record as each ends.

    Args:
        engine: a started engine (its queue bound must hold every item).
        defaults: generation options (HF names) that lines may override.
        on_record: called with the completion tokens of every record written (progress).
    """
    summary, t0 = BatchSummary(), time.perf_counter()
    finished = done_ids(output)
    todo = [it for it in items if id_key(it.id) not in finished]
    summary.skipped = len(items) - len(todo)
    results: queue.Queue[tuple[int, Output]] = queue.Queue()
    parts: dict[int, Completion] = {}
    with open(output, "a", encoding="utf-8") as out:
        def write(rec: dict[str, Any], tokens: int = 0) -> None:
            out.write(json.dumps(rec, ensure_ascii=False) + "\n")
            out.flush()
            summary.errors += "error" in rec
            summary.written += "error" not in rec
            summary.tokens += tokens
            if on_record is not None:
                on_record(tokens)

        for i, item in sorted(enumerate(todo), key=lambda p: len(p[1].ids)):  # batches by length
            if item.error is not None:
                write(_record(item, error=item.error))
                continue
            try:
                params = sampling_from_hf({**defaults, **item.options})
                engine.submit(item.ids, params, lambda o, i=i: results.put((i, o)))
                parts[i] = Completion()
            except RequestError as exc:
                write(_record(item, error=f"line {item.line}: {exc}"))
        while parts:
            i, o = results.get()
            parts[i].add(o)
            if o.finish_reason is None:
                continue
            done = parts.pop(i)
            item = todo[i]
            if o.finish_reason in ("error", "abort"):
                write(_record(item, error=f"line {item.line}: {done.error or 'aborted'}"))
            else:
                write(_record(item, done), done.completion_tokens)
    summary.seconds = time.perf_counter() - t0
    return summary
