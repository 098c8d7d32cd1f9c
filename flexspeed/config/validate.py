"""Turn a raw config dict into a :class:`FlexConfig`, or a :class:`ConfigError` that names the key.

Validation runs in three passes, so every failure reads the same way whatever caught it:

1. a walk over the raw dict: non-string keys, unknown keys (with the closest valid key),
   alternative spellings (``bfloat16``), deprecated keys, and DeepSpeed features flexspeed
   does not implement;
2. pydantic, whose ``ValidationError`` is translated here: key path, the value given, and what
   the key accepts, described from the field's type;
3. cross-field checks (:mod:`flexspeed.config.checks`).
"""

from __future__ import annotations

import copy
import json
import types
import typing
import warnings
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union

import annotated_types
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from flexspeed.config.errors import ConfigError, did_you_mean
from flexspeed.config.fields import Section
from flexspeed.config.schema import UNSUPPORTED_SECTIONS, FlexConfig

__all__ = [
    "validate_config",
    "model_validate",
    "canonicalize",
    "describe_type",
    "describe_field",
    "format_value",
    "values_equal",
    "translate_validation_error",
]

_MISSING = object()


def validate_config(raw: Mapping[str, Any] | FlexConfig) -> FlexConfig:
    """Validate a raw ds_config dict (not yet resolved: ``"auto"`` may remain).

    Args:
        raw: the parsed JSON object; it is not modified.

    Returns:
        The typed config.

    Raises:
        ConfigError: naming the offending key, the value and the fix.
    """
    from flexspeed.config.checks import check_compatibility

    if isinstance(raw, FlexConfig):
        return raw
    data = _strip_unsupported(canonicalize(raw))
    _apply_deprecated_zero(data)
    cfg = model_validate(FlexConfig, data)
    check_compatibility(cfg)
    return cfg


def model_validate(model: type[BaseModel], data: Mapping[str, Any]) -> Any:
    """``model.model_validate(data)`` with any ValidationError translated to a ConfigError."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise translate_validation_error(exc, data, model) from None


# ---------------------------------------------------------------------------- pass 1: keys


def canonicalize(raw: Any, model: type[Section] = FlexConfig, path: str = "") -> dict[str, Any]:
    """A deep copy of ``raw`` with alternative spellings renamed, checking every key exists.

    Raises:
        ConfigError: for a non-object config, a non-string key, an unknown key, or an alias
            given together with its canonical key with a different value.
    """
    if not isinstance(raw, Mapping):
        where = path or "the config"
        raise ConfigError(
            f"{where} must be a JSON object, got {format_value(raw)}. "
            'Fix: write it as {"key": value, ...}.',
            key=path or None,
        )
    fields = model.model_fields
    out: dict[str, Any] = {}
    given_as: dict[str, str] = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise ConfigError(f"config keys must be strings, got {key!r}.", key=path or None)
        name = model.json_aliases.get(key, key)
        full = _join(path, key)
        if name not in fields:
            if not path and key in UNSUPPORTED_SECTIONS:
                out[key] = copy.deepcopy(value)  # checked by _strip_unsupported
                continue
            raise _unknown_key(key, full, model, path)
        sub = _model_in(fields[name].annotation)
        if sub is not None and isinstance(value, Mapping):
            value = canonicalize(value, sub, _join(path, name))
        else:
            value = copy.deepcopy(value)
        if name in out:
            if not values_equal(out[name], value):
                raise ConfigError(
                    f"{given_as[name]!r} and {key!r} are two spellings of the same setting and "
                    f"were given different values ({format_value(out[name])} and "
                    f"{format_value(value)}). Fix: keep only {name!r}.",
                    key=_join(path, name),
                )
            continue
        out[name] = value
        given_as[name] = key
    return out


def _unknown_key(key: str, full: str, model: type[Section], path: str) -> ConfigError:
    valid = sorted(set(model.model_fields) | set(model.json_aliases))
    if not path:
        valid = sorted(set(valid) | set(UNSUPPORTED_SECTIONS))
    where = f"in {path!r}" if path else "at the top level"
    hint = did_you_mean(key, valid)
    listing = f" Valid keys: {', '.join(valid)}." if len(valid) <= 12 else ""
    return ConfigError(
        f"unknown key {key!r} {where}.{hint}{listing} "
        "Fix: correct the spelling or remove the key (flexspeed rejects keys it would ignore).",
        key=full,
    )


def _strip_unsupported(data: dict[str, Any]) -> dict[str, Any]:
    for name, (what, fix) in UNSUPPORTED_SECTIONS.items():
        if name not in data:
            continue
        if _section_enabled(data[name]):
            raise ConfigError(
                f"flexspeed does not implement {name!r} ({what}); it is enabled here "
                f"({format_value(data[name])}). Fix: {fix}, or disable it with "
                f'"{name}": {{"enabled": false}}.',
                key=name,
            )
        del data[name]
    return data


def _section_enabled(value: Any) -> bool:
    """Whether an unsupported section asks for its feature.

    ``{"enabled": x}`` decides by ``x`` (``"auto"`` counts as off); a section without an
    ``enabled`` switch is on when any nested ``enabled`` is true, or, with none, when any of
    its values is truthy (``{}``, ``null`` and all-false sections are off).
    """
    if isinstance(value, Mapping):
        if "enabled" in value:
            return _section_enabled(value["enabled"])
        return any(_section_enabled(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_section_enabled(v) for v in value)
    if isinstance(value, str) and value == "auto":
        return False
    try:
        return bool(value)
    except Exception:  # noqa: BLE001 - an object without a truth value counts as "on"
        return True


_DEPRECATED_OFFLOAD = {"cpu_offload": "offload_optimizer", "cpu_offload_param": "offload_param"}


def _apply_deprecated_zero(data: dict[str, Any]) -> None:
    """Map ``cpu_offload``/``cpu_offload_param`` onto the offload sections, refusing conflicts."""
    zero = data.get("zero_optimization")
    if not isinstance(zero, dict):
        return
    for old, section in _DEPRECATED_OFFLOAD.items():
        if zero.get(old) is not True:
            continue
        warnings.warn(
            f'zero_optimization.{old} is deprecated; write "{section}": {{"device": "cpu"}}.',
            FutureWarning,
            stacklevel=3,
        )
        current = zero.get(section)
        if current is None:
            pin = zero.get("cpu_offload_use_pin_memory", False)
            zero[section] = {"device": "cpu", "pin_memory": pin}
        elif not (isinstance(current, Mapping) and current.get("device") == "cpu"):
            raise ConfigError(
                f'"{old}": true asks for CPU offload but {section} is {format_value(current)}. '
                f'Fix: remove the deprecated {old!r} and set "{section}": {{"device": "cpu"}}.',
                key=f"zero_optimization.{old}",
            )


# ----------------------------------------------------------------- pass 2: pydantic errors


def translate_validation_error(
    exc: ValidationError, data: Mapping[str, Any], model: type[BaseModel] = FlexConfig
) -> ConfigError:
    """One ConfigError for a pydantic ValidationError: key path, value given, what is allowed."""
    errors = exc.errors(include_url=False)
    for err in errors:
        inner = (err.get("ctx") or {}).get("error")
        if isinstance(inner, ConfigError):
            return inner
    paths = []
    for err in errors:
        path = _field_path(model, err["loc"])
        if path not in paths:
            paths.append(path)
    keys, field = paths[0]
    dotted = _dotted(keys)
    value = _value_at(data, keys)
    if field is None:
        message = f"invalid value {format_value(value)}: {errors[0]['msg']}."
    elif value is _MISSING:
        message = f"missing; expected {describe_field(field)}."
    else:
        expected = describe_field(field)
        shown = format_value(value)
        if isinstance(value, str) and value == "auto" and "'auto'" not in expected:
            shown += ', but this key does not accept "auto"'
        message = f"got {shown}; expected {expected}."
    others = [_dotted(k) for k, _ in paths[1:]]
    if others:
        message += f" Also invalid: {', '.join(others[:5])}{' ...' if len(others) > 5 else ''}."
    return ConfigError(message + f" Fix: set {dotted!r} to an allowed value.", key=dotted or None)


def _field_path(model: type[BaseModel], loc: tuple[Any, ...]) -> tuple[tuple[str, ...], FieldInfo | None]:
    """The keys of ``loc`` that name fields and the deepest field reached.

    pydantic puts union-branch tags (``"literal['auto']"``) and list indices in ``loc``; the
    error is reported on the field that holds them.
    """
    keys: list[str] = []
    field: FieldInfo | None = None
    current: type[BaseModel] | None = model
    for part in loc:
        if current is None:
            break
        if isinstance(part, str) and part in current.model_fields:
            field = current.model_fields[part]
            keys.append(part)
            current = _model_in(field.annotation)
    return tuple(keys), field


def _value_at(data: Any, keys: tuple[str, ...]) -> Any:
    for key in keys:
        if not (isinstance(data, Mapping) and key in data):
            return _MISSING
        data = data[key]
    return data


def _dotted(keys: tuple[str, ...]) -> str:
    return ".".join(keys)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _model_in(annotation: Any) -> type[Section] | None:
    """The Section class inside ``annotation`` (``X | None``, ``Annotated[X, ...]``), if any."""
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def values_equal(a: Any, b: Any) -> bool:
    """Deep equality of JSON-like values where ``true`` differs from ``1`` (an object equals itself)."""
    if a is b:
        return True
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return a.keys() == b.keys() and all(values_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(values_equal(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - an exotic object with a raising __eq__ is "different"
        return False


# ------------------------------------------------------------------ describing types


def describe_field(field: FieldInfo) -> str:
    """Human description of what a field accepts, e.g. ``"an integer >= 1, or 'auto'"``."""
    return _with_bounds(describe_type(field.annotation), field.metadata)


def describe_type(annotation: Any) -> str:
    """Human description of a type annotation used in the schema."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        base, *meta = typing.get_args(annotation)
        return _with_bounds(describe_type(base), meta)
    if origin in (Union, types.UnionType):
        args = typing.get_args(annotation)
        literals = [a for a in args if typing.get_origin(a) is Literal]
        parts = [describe_type(a) for a in args if a is not type(None) and a not in literals]
        values = [v for lit in literals for v in typing.get_args(lit)]
        if values:
            parts.append(", ".join(_literal(v) for v in values))
        if type(None) in args:
            parts.append("null")
        return ", or ".join(parts)
    if origin is Literal:
        values = typing.get_args(annotation)
        shown = ", ".join(_literal(v) for v in values)
        return shown if len(values) == 1 else f"one of {shown}"
    if isinstance(annotation, type) and issubclass(annotation, Section):
        return "an object (a config section)"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if annotation in names:
        return names[annotation]
    if origin is dict or annotation is dict:
        return "an object"
    if origin in (list, tuple) or annotation in (list, tuple):
        return "a list"
    return str(annotation)


def _with_bounds(text: str, metadata: list[Any]) -> str:
    bounds = []
    for item in metadata:
        for bound in item.metadata if isinstance(item, FieldInfo) else [item]:
            for cls, attr, symbol in _BOUNDS:
                if isinstance(bound, cls):
                    bounds.append(f"{symbol} {getattr(bound, attr)}")
    return f"{text} {' and '.join(bounds)}" if bounds else text


_BOUNDS = (
    (annotated_types.Ge, "ge", ">="),
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Le, "le", "<="),
    (annotated_types.Lt, "lt", "<"),
)


def _literal(value: Any) -> str:
    return f"'{value}'" if isinstance(value, str) else json.dumps(value)


def format_value(value: Any, limit: int = 80) -> str:
    """A value as the user wrote it in JSON (``true``, ``null``, ``"x"``), shortened."""
    try:
        text = json.dumps(value, allow_nan=True, sort_keys=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
