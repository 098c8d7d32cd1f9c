"""A model folder loaded for text generation: the inference engine, its limits, and how it is batched.

In memory, the folder is read with ``transformers``' ``AutoModelForCausalLM`` (local files only)
and prepared by ``flexspeed.init_inference``, with fused kernels where the family has them
(GPT-2, OPT, Llama); offloaded, it goes through ``init_inference(..., offload=policy)`` without
ever being whole in memory. :func:`make_batcher` then picks continuous batching for a fused
runner and static batching otherwise, and says why.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

from flexspeed.config.errors import ConfigError

__all__ = ["TextModel", "load_text_model", "check_model_folder", "make_batcher", "BATCHING"]

BATCHING = ("auto", "continuous", "static")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "block_size")


@dataclass
class TextModel:
    """What the serving engine needs of a loaded model."""

    engine: Any
    """The ``flexspeed.init_inference`` engine."""
    module: nn.Module
    """What ``generate`` is given: the prepared model, or the offloaded stand-in."""
    folder: str
    max_positions: int | None
    """Positions the model was trained for (``None``: not stated)."""
    vocab_size: int
    """Width of the logits."""
    eos_ids: list[int]
    """End-of-sequence ids (generation config, model config)."""
    pad_id: int
    offloaded: bool

    @property
    def fused_runner(self):
        """The fused runner driving the model in memory, or ``None``."""
        from flexspeed.inference.fused import FusedRunner
        from flexspeed.inference.kernels import get_runner

        runner = get_runner(self.module)
        return runner if isinstance(runner, FusedRunner) else None

    def describe(self) -> str:
        where = "offloaded" if self.offloaded else ("fused kernels" if self.fused_runner is not None else "HF modules")
        return f"{self.folder} ({where}, vocab {self.vocab_size}, {self.max_positions or 'unstated'} positions)"


def _read_json(folder: str, name: str) -> dict[str, Any]:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}); restore the model folder's file", key="model") from exc


def _ids(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def check_model_folder(folder: str) -> dict[str, Any]:
    """The folder's config.json.

    Raises:
        ConfigError: no such folder, or no config.json in it (key ``model``).
    """
    if not os.path.isdir(folder):
        raise ConfigError(f"model folder {folder!r} does not exist; pass a Hugging Face model folder (config.json, "
                          "safetensors weights, tokenizer files)", key="model")
    config = _read_json(folder, "config.json")
    if not config:
        raise ConfigError(f"{folder!r} has no config.json; pass a Hugging Face model folder", key="model")
    return config


def _load_in_memory(folder: str, dtype: torch.dtype | None, kernel_inject: bool) -> tuple[Any, nn.Module]:
    import flexspeed
    from flexspeed.inference.kernels import supports_injection

    try:
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging
    except ImportError as exc:
        raise ConfigError("loading a model folder in memory needs transformers: pip install 'flexspeed[serve]'",
                          key="model") from exc
    import transformers

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    key = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"  # renamed in 4.56
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, **{key: dtype or "auto"})
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"{folder!r} does not load as a causal language model ({type(exc).__name__}: {exc})",
                          key="model") from exc
    inject = kernel_inject and supports_injection(model)
    engine = flexspeed.init_inference(model, dtype=dtype, replace_with_kernel_inject=inject)
    return engine, engine.module


def _load_offloaded(folder: str, dtype: torch.dtype | None, policy: Any) -> tuple[Any, nn.Module]:
    import flexspeed
    from flexspeed.inference.offload.runner import OffloadedLM

    stub = OffloadedLM.from_pretrained(folder)
    engine = flexspeed.init_inference(stub, checkpoint=folder, dtype=dtype, offload=policy)
    return engine, stub


def load_text_model(folder: str, *, dtype: str | None = None, offload: Any = None,
                    kernel_inject: bool = True) -> TextModel:
    """Load ``folder`` for generation.

    Args:
        folder: a Hugging Face model folder.
        dtype: ``"bf16"``, ``"fp16"``, ``"fp32"`` or ``None`` (the checkpoint's).
        offload: an :class:`~flexspeed.inference.offload.policy.OffloadPolicy`, or ``None`` for in memory.
        kernel_inject: use the fused kernels where the family has them.
    Raises:
        ConfigError: the folder is missing, is not a model folder, or does not load (key ``model``).
    """
    config = check_model_folder(folder)
    if dtype is not None and dtype not in _DTYPES:
        raise ConfigError(f"dtype={dtype!r} is not one of {sorted(_DTYPES)}", key="dtype")
    torch_dtype = _DTYPES.get(dtype) if dtype else None
    if offload is not None:
        engine, module = _load_offloaded(folder, torch_dtype, offload)
    else:
        engine, module = _load_in_memory(folder, torch_dtype, kernel_inject)
    gen = _read_json(folder, "generation_config.json")
    eos = _ids(gen.get("eos_token_id", config.get("eos_token_id")))
    pad = gen.get("pad_token_id", config.get("pad_token_id"))
    positions = next((int(config[k]) for k in _POSITION_KEYS if isinstance(config.get(k), int)), None)
    vocab = int(config.get("vocab_size") or 0)
    if vocab <= 0:
        raise ConfigError(f"{folder}/config.json has no vocab_size", key="model")
    return TextModel(engine, module, folder, positions, vocab, eos, int(pad if pad is not None else (eos or [0])[0]),
                     offload is not None)


def make_batcher(model: TextModel, *, mode: Literal["auto", "continuous", "static"], max_num_seqs: int,
                 max_model_len: int, cache_len: int):
    """The batcher of ``model``: continuous batching over its fused runner, else static batching.

    Raises:
        ConfigError: ``mode="continuous"`` for a model without a fused runner (key ``batching``).
    """
    from flexspeed.serve.batching import SlotBatcher, WaveBatcher

    if mode not in BATCHING:
        raise ConfigError(f"batching={mode!r} is not one of {BATCHING}", key="batching")
    runner = model.fused_runner
    if runner is not None and mode != "static":
        return SlotBatcher(runner, max_num_seqs, cache_len)
    if mode == "continuous":
        why = "the model is offloaded" if model.offloaded else "its family has no fused kernels"
        raise ConfigError(f"batching='continuous' needs a model the fused runner drives (GPT-2, OPT or Llama in "
                          f"memory), but {why}; use --batching static (or auto)", key="batching")
    why = ("offloaded" if model.offloaded else "asked for" if mode == "static" and runner is not None
           else "no fused kernels for this family")
    return WaveBatcher(model.module, max_num_seqs, max_model_len, model.pad_id, why)
