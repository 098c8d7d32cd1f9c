"""Read config sources (path, dict, base64 JSON) and merge them with conflict detection.

DeepSpeed takes its config from ``initialize(config=...)``, ``initialize(config_params=...)``
or ``args.deepspeed_config``. flexspeed accepts any combination: sources are deep-merged, and
a key set by two sources to different values is an error naming both. Duplicate keys inside
one JSON file are errors too (``json.loads`` would silently keep the last one).
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Mapping
from typing import Any, Union

from flexspeed.config.errors import ConfigError
from flexspeed.config.validate import canonicalize, format_value, values_equal

__all__ = ["ConfigSource", "load_config", "read_source", "parse_config_text", "merge_sources"]

ConfigSource = Union[str, "os.PathLike[str]", Mapping[str, Any]]
"""A path to a JSON/HJSON file, a dict, or a base64-encoded JSON string."""

_HOW_TO_PASS = (
    "Fix: pass config='ds_config.json' (a path, a dict, or base64-encoded JSON) to "
    "flexspeed.initialize(), or run with --deepspeed_config ds_config.json after "
    "flexspeed.add_config_arguments(parser)."
)


def load_config(config: ConfigSource | None = None, config_params: ConfigSource | None = None,
                args: Any = None) -> dict[str, Any]:
    """Gather the raw config from every source DeepSpeed accepts and merge them.

    Args:
        config: path, dict or base64 JSON (``initialize(config=...)``).
        config_params: DeepSpeed's older name for ``config``; same forms.
        args: an argparse namespace; ``args.deepspeed_config`` (and the legacy
            ``args.deepscale_config``) are read when set.

    Returns:
        The merged raw dict (keys canonical, values not yet validated).

    Raises:
        ConfigError: no source given, unreadable or malformed source, or two sources that
            disagree on a key.
    """
    sources: list[tuple[str, dict[str, Any]]] = []
    for label, source in (("config", config), ("config_params", config_params)):
        if source is not None:
            sources.append(read_source(source, label=label))
    for attr in ("deepspeed_config", "deepscale_config"):
        path = getattr(args, attr, None) if args is not None else None
        if path is not None:
            sources.append(read_source(path, label=f"--{attr}", path_only=True))
    if not sources:
        raise ConfigError(f"no configuration was given. {_HOW_TO_PASS}")
    return merge_sources([(label, canonicalize(data)) for label, data in sources])


def read_source(source: ConfigSource, *, label: str = "config", path_only: bool = False,
                how_to_pass: str = _HOW_TO_PASS) -> tuple[str, dict[str, Any]]:
    """Read one source (training and inference configs alike).

    Args:
        source: a path to a JSON/HJSON file, a dict, or a base64-encoded JSON string.
        label: what the caller calls it, for messages (``"config"``, ``"--deepspeed_config"``).
        path_only: refuse base64 (command-line flags name files).
        how_to_pass: the fix a message gives for a source of the wrong kind.
    Returns:
        ``(description for messages, raw dict)``.
    Raises:
        ConfigError: a missing or unreadable file, malformed JSON/HJSON, a duplicate key.
    """
    if isinstance(source, Mapping):
        return f"{label} (dict)", dict(source)
    if not isinstance(source, (str, os.PathLike)):
        raise ConfigError(
            f"{label} must be a path, a dict or a base64-encoded JSON string, got "
            f"{type(source).__name__}. {how_to_pass}",
            key=None,
        )
    text = os.fspath(source)
    if os.path.isfile(text):
        return f"{label}={text!r}", _read_file(text)
    if os.path.isdir(text):
        raise ConfigError(f"{label}={text!r} is a directory, not a config file. {how_to_pass}")
    decoded = None if path_only or isinstance(source, os.PathLike) else _decode_base64(text)
    if decoded is None:
        raise ConfigError(
            f"config file {text!r} (from {label}) does not exist"
            f"{'' if path_only else ' and is not base64-encoded JSON'}. "
            f"Fix: check the path (relative paths are from {os.getcwd()!r}).",
        )
    return f"{label} (base64)", parse_config_text(decoded, origin=f"{label} (base64)")


def _read_file(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {path!r} is not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path!r}: {exc.strerror}.") from None
    return parse_config_text(text, origin=repr(path))


def _decode_base64(text: str) -> str | None:
    """The decoded text if ``text`` is base64 (standard or URL-safe) of a JSON object, else None."""
    compact = "".join(text.split()).replace("-", "+").replace("_", "/")
    if not compact or not re.fullmatch(r"[A-Za-z0-9+/]+={0,2}", compact):
        return None
    compact += "=" * (-len(compact) % 4)
    try:
        decoded = base64.b64decode(compact, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    return decoded if decoded.lstrip().startswith("{") else None


class _DuplicateKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def parse_config_text(text: str, *, origin: str = "config") -> dict[str, Any]:
    """Parse JSON (or HJSON when it is not JSON and ``hjson`` is installed) into a dict.

    Raises:
        ConfigError: malformed text (with line and column), a duplicate key (with its path,
            line and column), or a top level that is not an object.
    """
    try:
        data = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as dup:
        raise _duplicate_error(text, dup.key, origin) from None
    except json.JSONDecodeError as exc:
        data = _parse_hjson(text, origin, exc)
    if not isinstance(data, dict):
        raise ConfigError(
            f"{origin} must hold a JSON object ({{...}}) at the top level, got {format_value(data)}."
        )
    return data


def _parse_hjson(text: str, origin: str, json_error: json.JSONDecodeError) -> Any:
    where = f"line {json_error.lineno} column {json_error.colno}"
    try:
        import hjson
    except ImportError:
        raise ConfigError(
            f"{origin} is not valid JSON: {json_error.msg} at {where}. Fix the JSON there "
            "(HJSON is also accepted when the 'hjson' package is installed)."
        ) from None
    try:
        return hjson.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as dup:
        raise ConfigError(
            f"{origin} (read as HJSON) sets key {dup.key!r} twice in the same object. "
            "Fix: keep one of them.",
            key=dup.key,
        ) from None
    except Exception as exc:  # noqa: BLE001 - hjson raises several error types
        raise ConfigError(
            f"{origin} is not valid JSON: {json_error.msg} at {where}; it is not valid HJSON "
            f"either ({exc}). Fix the syntax there."
        ) from None


# A JSON token: a string (with escapes), a structural character, or a bare literal/number.
_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[{}\[\]:,]|[^\s{}\[\]:,"]+')


def _duplicate_error(text: str, key: str, origin: str) -> ConfigError:
    found = _find_duplicate(text)
    if found is None:  # pragma: no cover - the scan agrees with json.loads on valid JSON
        return ConfigError(f"{origin} sets key {key!r} twice in the same object. Fix: keep one.", key=key)
    path, pos = found
    line = text.count("\n", 0, pos) + 1
    col = pos - (text.rfind("\n", 0, pos) + 1) + 1
    return ConfigError(
        f"{origin} sets key {path!r} twice in the same object (second time at line {line} "
        f"column {col}); JSON would silently keep the last value. Fix: keep one of them.",
        key=path,
    )


def _find_duplicate(text: str) -> tuple[str, int] | None:
    """The dotted path and offset of the first key repeated in the same object of valid JSON."""
    # Each frame: [is_object, keys seen, current key or list index]
    frames: list[list[Any]] = []
    for match in _TOKEN.finditer(text):
        tok = match.group()
        top = frames[-1] if frames else None
        if tok in ("{", "["):
            frames.append([tok == "{", set(), None if tok == "{" else 0])
        elif tok in ("}", "]"):
            frames.pop()
        elif tok == "," and top is not None:
            top[2] = None if top[0] else top[2] + 1
        elif tok.startswith('"') and top is not None and top[0] and top[2] is None:
            key = json.loads(tok)
            path = _path([f[2] for f in frames[:-1]] + [key])
            if key in top[1]:
                return path, match.start()
            top[1].add(key)
            top[2] = key
    return None


def _path(parts: list[Any]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def merge_sources(sources: list[tuple[str, Mapping[str, Any]]]) -> dict[str, Any]:
    """Deep-merge ``[(label, dict), ...]``; equal values agree, different values are an error.

    Nested dicts and lists are copied (the sources are not modified); other values, such as the
    objects an inference config may hold (a process group, a dtype), are shared, not copied.
    """
    merged: dict[str, Any] = {}
    owners: dict[str, str] = {}
    for label, data in sources:
        _merge_into(merged, data, label, owners, "")
    return merged


def _merge_into(target: dict[str, Any], data: Mapping[str, Any], label: str,
                owners: dict[str, str], path: str) -> None:
    for key, value in data.items():
        name = key.__name__ if isinstance(key, type) else str(key)  # inference keys may be classes
        full = f"{path}.{name}" if path else name
        if key not in target:
            target[key] = _copy_containers(value)
            owners[full] = label
            continue
        current = target[key]
        if isinstance(current, dict) and isinstance(value, Mapping):
            _merge_into(current, value, label, owners, full)
            continue
        if values_equal(current, value):
            continue
        first = owners.get(full) or next(
            (v for k, v in owners.items() if full.startswith(k + ".")), "an earlier source")
        raise ConfigError(
            f"set to different values by two sources: {format_value(current)} in {first} and "
            f"{format_value(value)} in {label}. Fix: remove it from one of them or make them agree.",
            key=full,
        )


def _copy_containers(value: Any) -> Any:
    """A copy of nested dicts and lists; everything else is the same object."""
    if isinstance(value, Mapping):
        return {k: _copy_containers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_containers(v) for v in value]
    return value
