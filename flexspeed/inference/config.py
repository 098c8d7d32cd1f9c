"""The inference configuration: one typed model, and how a DeepSpeed-style source becomes it.

``init_inference(model, config=None, **kwargs)`` accepts the config as a dict, a JSON/HJSON
path or base64-encoded JSON, and lets keyword arguments add to it. :func:`resolve_inference_config`
turns both into a validated, frozen :class:`InferenceConfig`:

1. the config is read by the training loader (:func:`flexspeed.config.loader.read_source`):
   the same forms, duplicate-key and syntax errors (with line and column) as ``initialize()``;
   then each source is *canonicalised*: aliases (``kernel_inject``, ``tp``, ``mp_size``,
   ``max_tokens``, ...) become their canonical key, dtypes become ``"fp32" | "fp16" | "bf16" |
   "int8"``, config objects become plain dicts;
2. the two sources are merged by the training loader's :func:`~flexspeed.config.loader.merge_sources`;
   a key present in both with *different* values is a :class:`ConfigError` naming the full key
   path, both values and both sources (equal values are fine);
3. unknown keys are rejected with a suggestion, training keys are sent to
   ``flexspeed.initialize()``;
4. pydantic validates types (strict: ``"2"`` is not an int) and every error is re-raised as a
   :class:`ConfigError` carrying the dotted key path.
"""

from __future__ import annotations

import os
import typing
import warnings
from collections.abc import Mapping
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from flexspeed.config.errors import ConfigError, did_you_mean
from flexspeed.config.loader import merge_sources, read_source
from flexspeed.config.schema import UNSUPPORTED_SECTIONS, FlexConfig
from flexspeed.config.validate import values_equal
from flexspeed.inference.offload.policy import OffloadPolicy

__all__ = [
    "InferenceConfig",
    "InferenceTPConfig",
    "InferenceMoEConfig",
    "QuantConfig",
    "WeightQuantConfig",
    "resolve_inference_config",
    "canonical_dtype",
    "training_keys",
]

DtypeName = Literal["fp32", "fp16", "bf16", "int8"]

_DTYPE_NAMES: dict[str, DtypeName] = {
    "fp32": "fp32", "float32": "fp32", "float": "fp32", "torch.float32": "fp32",
    "fp16": "fp16", "float16": "fp16", "half": "fp16", "torch.float16": "fp16",
    "bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16",
    "int8": "int8", "torch.int8": "int8",
}
_TORCH_DTYPES: dict[torch.dtype, DtypeName] = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "int8",
}
_COMPUTE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

# DeepSpeed inference keys flexspeed knows but does not implement, with the reason.
_UNSUPPORTED: dict[str, str] = {
    "zero": "ZeRO-Inference is configured through flexspeed.initialize(), not init_inference()",
    "save_mp_checkpoint_path": "saving pre-sharded tensor-parallel checkpoints is not supported; "
                               "flexspeed slices unsharded checkpoints at load time instead",
    "training_mp_size": "checkpoints saved with Megatron-style model parallelism are not supported",
    "ep_size": "expert parallelism is not supported", "mpu": "pass tensor_parallel.tp_group instead",
    "checkpoint_config": "use checkpoint and base_dir", "triton_autotune": "Triton kernels are not supported",
}
# DeepSpeed keys that only tune DeepSpeed's own fused kernels; accepted and ignored with a warning.
_IGNORED: tuple[str, ...] = ("triangular_masking", "transposed_mode", "set_empty_params")

# alias -> canonical key, per section ("" is the top level).
_ALIASES: dict[str, dict[str, str]] = {
    "": {"kernel_inject": "replace_with_kernel_inject", "tp": "tensor_parallel",
         "max_tokens": "max_out_tokens", "min_tokens": "min_out_tokens",
         "injection_dict": "injection_policy", "ckpt": "checkpoint"},
    "tensor_parallel": {"mp_size": "tp_size"},
}

_warned: set[str] = set()


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, DeprecationWarning if "deprecated" in message else UserWarning, stacklevel=4)


def canonical_dtype(value: Any) -> DtypeName | None:
    """``torch.float16``, ``"half"``, ``"fp16"``... -> ``"fp16"``; ``None`` stays ``None``.

    Raises:
        ConfigError: the value names no supported dtype.
    """
    if value is None:
        return None
    if isinstance(value, torch.dtype):
        if value in _TORCH_DTYPES:
            return _TORCH_DTYPES[value]
    elif isinstance(value, str) and value.lower() in _DTYPE_NAMES:
        return _DTYPE_NAMES[value.lower()]
    raise ConfigError(
        f"dtype={value!r} is not supported; use one of torch.float32/float16/bfloat16/int8 or "
        f"{sorted(set(_DTYPE_NAMES))}." + (did_you_mean(value, _DTYPE_NAMES) if isinstance(value, str) else ""),
        key="dtype",
    )


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True, arbitrary_types_allowed=True,
                              use_attribute_docstrings=True)


class InferenceTPConfig(_Section):
    """``tensor_parallel``: how the model is split across ranks."""

    enabled: bool = True
    """Turn tensor parallelism on (with ``tp_size`` > 1)."""
    tp_size: int = Field(default=1, ge=1)
    """Number of ranks one model is split across; must divide the attention heads."""
    tp_group: Any = None
    """A ``torch.distributed`` ProcessGroup of ``tp_size`` ranks; ``None`` builds one from the world."""


class WeightQuantConfig(_Section):
    """``quant.weight``: low-bit storage of Linear weights."""

    num_bits: Literal[4, 8] = 8
    """Bits per weight (4 or 8)."""
    group_size: int = Field(default=64, ge=1)
    """Weights sharing one scale and offset (along the input dimension)."""


class QuantConfig(_Section):
    """``quant``: weight quantization after sharding."""

    enabled: bool = False
    """Quantize the Linear weights."""
    weight: WeightQuantConfig = WeightQuantConfig()
    """Weight quantization parameters."""


class InferenceMoEConfig(_Section):
    """``moe``: DeepSpeed's mixture-of-experts inference section; only "off" is accepted.

    DeepSpeed also takes a bool here (``"moe": false`` is ``{"enabled": false}``).
    """

    enabled: bool = False
    """Mixture-of-experts inference (not supported: ``true`` is a ConfigError)."""


class InferenceConfig(_Section):
    """Everything ``init_inference`` reads; build it with :func:`resolve_inference_config`."""

    dtype: DtypeName | None = None
    """Compute dtype: fp32/fp16/bf16, or int8 (8-bit weight quantization); ``None`` keeps the model's."""
    tensor_parallel: InferenceTPConfig = InferenceTPConfig()
    """Tensor-parallel settings (alias ``tp``; the deprecated top-level ``mp_size`` sets ``tp_size``)."""
    replace_with_kernel_inject: bool = False
    """Swap recognised transformer blocks for fused ones (alias ``kernel_inject``)."""
    injection_policy: dict[Any, tuple[str, ...]] | None = None
    """Block class (or class name) -> names of its row-parallel Linear children; others are column-parallel."""
    checkpoint: str | dict | None = None
    """Weights to load: safetensors file/dir/index, .pt/.bin, or a DeepSpeed checkpoint json (path or dict)."""
    base_dir: str = ""
    """Directory the files listed in a DeepSpeed checkpoint json are relative to."""
    quant: QuantConfig = QuantConfig()
    """Weight quantization."""
    max_out_tokens: int = Field(default=1024, ge=1)
    """Longest sequence (prompt + new tokens) ``generate`` accepts (alias ``max_tokens``)."""
    min_out_tokens: int = Field(default=1, ge=1)
    """Fewest tokens the engine must be able to produce (alias ``min_tokens``)."""
    keep_module_on_host: bool = False
    """With CUDA, keep the weights in host memory and move each layer's weights only for its compute."""
    return_tuple: bool = True
    """DeepSpeed's switch for what injected blocks return; flexspeed's fused blocks always return what the
    host model's layer loop expects, so only ``True`` (the default) is accepted with kernel injection."""
    enable_cuda_graph: bool = False
    """Capture the forward in a CUDA graph (CUDA only)."""
    replace_method: Literal["auto", ""] = "auto"
    """Deprecated DeepSpeed knob; only "auto" is meaningful."""
    use_triton: bool = False
    """Triton kernels; not supported (must stay False)."""
    offload: OffloadPolicy | None = None
    """Offloaded generation (FlexLLMGen's policy: weights/cache/activations on device, CPU, disk); ``None``: in memory."""
    moe: InferenceMoEConfig = InferenceMoEConfig()
    """Mixture-of-experts inference: only disabled (``false`` or ``{"enabled": false}``) is accepted."""
    decode_path: Literal["auto", "native", "torch"] = "auto"
    """Where single-token decode steps run on the CPU when the native C kernel applies: ``"auto"``
    measures the native kernel and torch's path on the generation itself and runs the faster (again
    when the machine's load changes); ``"native"`` / ``"torch"`` pin one (benchmarks, tests).
    ``"torch"`` with kernel injection also packs the weights for oneDNN, as the torch path prefers."""

    @field_validator("moe", mode="before")
    @classmethod
    def _moe_bool(cls, v: Any) -> Any:
        # DeepSpeed: moe: Union[bool, DeepSpeedMoEConfig]; a bool is the section's "enabled"
        return {"enabled": v} if isinstance(v, bool) else v

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype(cls, v: Any) -> Any:
        return canonical_dtype(v)

    @field_validator("injection_policy", mode="before")
    @classmethod
    def _policy(cls, v: Any) -> Any:
        if v is None:
            return None
        if not isinstance(v, Mapping):
            raise ValueError(f"must map a block class to row-parallel child names, got {type(v).__name__}")
        out: dict[Any, tuple[str, ...]] = {}
        for block, names in v.items():
            if not (isinstance(block, (type, str))):
                raise ValueError(f"key {block!r} must be a module class or a class name")
            names = (names,) if isinstance(names, str) else tuple(names) if isinstance(names, (list, tuple)) else ()
            if not names or not all(isinstance(n, str) and n for n in names):
                raise ValueError(f"value for {getattr(block, '__name__', block)} must be a tuple of child "
                                 f"names like ('attn.c_proj', 'mlp.c_proj'), got {v[block]!r}")
            out[block] = names
        return out

    @property
    def compute_dtype(self) -> torch.dtype | None:
        """The floating dtype to run in (``None``: keep the model's; int8 keeps it too)."""
        return _COMPUTE_DTYPES.get(self.dtype) if self.dtype else None

    @property
    def quantize_bits(self) -> int | None:
        """Weight bits when quantization is on (``dtype="int8"`` implies 8), else ``None``."""
        if self.quant.enabled:
            return self.quant.weight.num_bits
        return 8 if self.dtype == "int8" else None

    @property
    def tp_size(self) -> int:
        """Effective tensor-parallel degree (1 when disabled)."""
        return self.tensor_parallel.tp_size if self.tensor_parallel.enabled else 1


def training_keys() -> frozenset[str]:
    """Top-level keys of a training config (``ds_config.json``) that are not inference keys."""
    keys = set(FlexConfig.model_fields) | set(FlexConfig.json_aliases) | set(UNSUPPORTED_SECTIONS)
    return frozenset(keys - set(InferenceConfig.model_fields))


def _as_dict(value: Any, where: str) -> dict:
    if isinstance(value, BaseModel):
        return value.model_dump(exclude_unset=True)
    if isinstance(value, Mapping):
        return dict(value)
    raise ConfigError(f"must be a dict, got {type(value).__name__} ({value!r})", key=where)


def _canonicalise(src: Mapping[str, Any], origin: str) -> dict:
    """Aliases -> canonical keys, dtypes -> names, sections -> dicts; conflicts inside one source."""
    out: dict[str, Any] = {}
    spelled: dict[str, str] = {}  # canonical path -> how the source spelled it first

    def put(section: dict, key: str, value: Any, path: str, given_as: str) -> None:
        if key in section and not values_equal(section[key], value):
            raise ConfigError(f"{origin} sets it twice with different values: {section[key]!r} (as "
                              f"{spelled[path]!r}) and {value!r} (as {given_as!r}); keep one", key=path)
        section[key] = value
        spelled.setdefault(path, given_as)

    for raw_key, value in src.items():
        key = _ALIASES[""].get(raw_key, raw_key)
        if raw_key == "mp_size":
            _warn_once("mp_size", "init_inference: 'mp_size' is deprecated; use tensor_parallel={'tp_size': N}")
            tp = out.setdefault("tensor_parallel", {})
            put(tp, "tp_size", value, "tensor_parallel.tp_size", "mp_size")
            continue
        if key == "dtype":
            value = canonical_dtype(value)
        elif key in ("checkpoint", "base_dir") and isinstance(value, os.PathLike):
            value = os.fspath(value)
        elif key == "offload" and value is None:
            pass
        elif key in ("tensor_parallel", "quant", "offload"):
            value = _as_dict(value, key)
            if key == "quant" and "weight" in value:
                value["weight"] = _as_dict(value["weight"], "quant.weight")
            section: dict[str, Any] = {}
            for sub_key, sub_value in value.items():
                canon = _ALIASES.get(key, {}).get(sub_key, sub_key)
                put(section, canon, sub_value, f"{key}.{canon}", f"{raw_key}.{sub_key}")
            value = section
            if key in out:  # e.g. mp_size came first
                for sub_key, sub_value in value.items():
                    put(out[key], sub_key, sub_value, f"{key}.{sub_key}", f"{raw_key}.{sub_key}")
                continue
        put(out, key, value, key, raw_key)
    return out



def _section_model(ann: Any) -> type[BaseModel] | None:
    """The config section class of a field annotation (``Section`` or ``Section | None``)."""
    for cand in (ann, *typing.get_args(ann)):
        if isinstance(cand, type) and issubclass(cand, BaseModel):
            return cand
    return None


def _check_keys(data: Mapping[str, Any], model: type[BaseModel], path: str = "") -> None:
    fields = model.model_fields
    for key, value in data.items():
        full = f"{path}{key}"
        if key in fields:
            section = _section_model(fields[key].annotation)
            if section is not None and isinstance(value, Mapping):
                _check_keys(value, section, full + ".")
            continue
        if not path and key in _UNSUPPORTED:
            raise ConfigError(f"is a DeepSpeed inference option flexspeed does not support: {_UNSUPPORTED[key]}",
                              key=full)
        if not path and key in training_keys():
            raise ConfigError("is a training option; it belongs to flexspeed.initialize(), not "
                              "init_inference(); remove it here", key=full)
        aliases = list(_ALIASES.get(path.rstrip("."), {}))
        raise ConfigError(f"unknown inference config key.{did_you_mean(key, list(fields) + aliases)} "
                          f"Valid keys: {sorted(fields)}", key=full)


_HOW_TO_PASS = ("Fix: pass config= a dict, a path to a JSON/HJSON file or base64-encoded JSON to "
                "flexspeed.init_inference(), or give the keys as keyword arguments.")


def _load_source(config: Any) -> dict:
    """The raw dict of ``config``, read by the training loader (same forms, same errors)."""
    if config is None:
        return {}
    if isinstance(config, InferenceConfig):
        return config.model_dump(exclude_unset=True)
    return read_source(config, label="config", how_to_pass=_HOW_TO_PASS)[1]


def _drop_ignored(data: dict) -> dict:
    for key in _IGNORED:
        if key in data:
            _warn_once(key, f"init_inference: {key!r} only tunes DeepSpeed's own fused kernels; ignored")
            data.pop(key)
    return data


def resolve_inference_config(config: Any = None, **kwargs: Any) -> InferenceConfig:
    """Merge ``config`` (dict, JSON path, or :class:`InferenceConfig`) with keyword arguments.

    Args:
        config: the config source, or ``None``.
        **kwargs: more keys, as ``init_inference`` receives them.
    Returns:
        the validated, frozen config.
    Raises:
        ConfigError: a conflicting, unknown, training-only or invalid key (the message names it).
    """
    base = _drop_ignored(_canonicalise(_load_source(config), "config"))
    extra = _drop_ignored(_canonicalise(kwargs, "keyword arguments"))
    merged = merge_sources([("config", base), ("keyword arguments", extra)])
    _check_keys(merged, InferenceConfig)
    try:
        cfg = InferenceConfig.model_validate(merged)
    except ValidationError as e:
        err = e.errors()[0]
        key = _loc_to_key(err["loc"])
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{msg} (got {err.get('input')!r})", key=key or None) from None
    _check_semantics(cfg)
    return cfg


def _loc_to_key(loc: tuple) -> str:
    """Pydantic's error location as a dotted config key (union branch tags dropped)."""
    parts: list[str] = []
    model: type[BaseModel] | None = InferenceConfig
    for p in loc:
        if model is None or not isinstance(p, str) or p not in model.model_fields:
            break
        parts.append(p)
        model = _section_model(model.model_fields[p].annotation)
    return ".".join(parts)


def _check_semantics(cfg: InferenceConfig) -> None:
    if cfg.moe.enabled:
        raise ConfigError("is a DeepSpeed inference option flexspeed does not support: mixture-of-experts "
                          'inference is not supported. Fix: remove "moe" or set it to false', key="moe")
    if cfg.use_triton:
        raise ConfigError("Triton kernels are not supported by flexspeed; set use_triton=False",
                          key="use_triton")
    if cfg.min_out_tokens > cfg.max_out_tokens:
        raise ConfigError(f"min_out_tokens={cfg.min_out_tokens} exceeds max_out_tokens={cfg.max_out_tokens}; "
                          "raise max_out_tokens", key="min_out_tokens")
    if cfg.enable_cuda_graph and not torch.cuda.is_available():
        raise ConfigError("CUDA graphs need a CUDA device and none is available; set enable_cuda_graph=False",
                          key="enable_cuda_graph")
    if cfg.dtype == "int8" and cfg.quant.enabled and cfg.quant.weight.num_bits != 8:
        raise ConfigError(f"dtype='int8' means 8-bit weights but quant.weight.num_bits="
                          f"{cfg.quant.weight.num_bits}; drop dtype='int8' or set num_bits=8",
                          key="quant.weight.num_bits")
