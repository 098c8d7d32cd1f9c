"""Hugging Face's ``generate`` over flexspeed's decode runner.

``engine.generate`` (and :func:`flexspeed.inference.generation.generate`) run greedy and sampled
decoding in flexspeed's own loop. Every other argument ``transformers``' ``generate`` accepts
(``num_beams``, ``return_dict_in_generate``/``output_scores``, ``stopping_criteria``,
``logits_processor``, ``no_repeat_ngram_size``, ``min_p``, ``bad_words_ids``, a
``generation_config`` that asks for any of them, ...) runs here: HF's own generation loop,
logits processors, stopping criteria, streamers and beam search, driving flexspeed's runner.

:class:`RunnerLM` presents a :class:`~flexspeed.inference.runners.DecodeRunner` as a causal LM
HF's ``GenerationMixin`` can drive. The KV cache is the runner's own (static, preallocated),
passed to HF's loop as a :class:`RunnerCache`: HF reads its length, beam search reorders its rows
(``reorder_cache``), and each forward feeds only the tokens the cache has not seen. The logits
are the runner's, so the tokens equal HF's own ``generate`` on the original model (fp32), and a
step costs the runner's step plus HF's per-step bookkeeping.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

__all__ = ["RunnerCache", "RunnerLM", "hf_generate"]


class RunnerCache:
    """The runner's KV cache as HF's loop sees it (a ``Cache``-like object: length, reordering).

    Allocated on the first forward, when the batch HF expands (beams, return sequences) is known.
    """

    is_compileable = False
    is_croppable = True  # assisted decoding drops rejected draft tokens with :meth:`crop`

    def __init__(self, runner: Any, max_len: int) -> None:
        self.runner, self.max_len = runner, max_len
        self.store: Any = None
        self.seen = 0
        self.key_mask: torch.Tensor | None = None  # (B, T_max) bool, or None while no row is padded

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen

    def get_mask_sizes(self, *args: Any, **kwargs: Any) -> tuple[int, int]:
        return self.seen, 0

    def activate_past_recording(self, **kwargs: Any) -> None:
        """Nothing to record: a static cache keeps every column, :meth:`crop` only moves its length."""

    def crop(self, max_length: int) -> None:
        """Keep the first ``max_length`` positions (a negative value: drop that many from the end),
        as HF's ``DynamicCache.crop``. The static buffers keep their columns; the next step
        overwrites them and attends only up to its own position, so only the length moves."""
        keep = self.seen + max_length if max_length < 0 else min(max_length, self.seen)
        if keep < 0:
            raise ValueError(f"cannot crop {-max_length} tokens from a cache holding {self.seen}")
        from flexspeed.inference.runners import TokenCache

        if isinstance(self.store, TokenCache) and self.store.past is not None:
            self.store.past.crop(keep)
        elif self.store is not None and not hasattr(self.store, "k"):
            raise ValueError(f"assisted decoding cannot roll back the {type(self.runner).__name__}'s cache; "
                             "run without assistant_model (the offload runner streams its cache)")
        self.seen = keep

    def reorder_cache(self, beam_idx: torch.Tensor) -> None:
        """Rows follow ``beam_idx`` (beam search keeps the best continuations), in place."""
        from flexspeed.inference.fused import KVCache
        from flexspeed.inference.runners import TokenCache

        store = self.store
        if isinstance(store, KVCache):
            for buf in (*store.k, *store.v):
                buf.copy_(buf.index_select(0, beam_idx.to(buf.device)))
        elif isinstance(store, TokenCache):
            store.ids.copy_(store.ids.index_select(0, beam_idx))
            store.pos.copy_(store.pos.index_select(0, beam_idx))
            if store.past is not None:
                store.past.reorder_cache(beam_idx)
        else:
            raise ValueError(f"beam search cannot reorder the {type(self.runner).__name__}'s cache; use num_beams=1 "
                             "(the offload runner streams its cache) or run without offload")
        if self.key_mask is not None:
            self.key_mask.copy_(self.key_mask.index_select(0, beam_idx.to(self.key_mask.device)))


def _hf_config(model: nn.Module) -> Any:
    from transformers import PretrainedConfig

    cfg = getattr(model, "config", None)
    if isinstance(cfg, PretrainedConfig):
        return cfg
    vocab = getattr(cfg, "vocab_size", None)
    return PretrainedConfig(vocab_size=vocab, is_encoder_decoder=False)


def _lm_class():
    from transformers import GenerationConfig, GenerationMixin
    from transformers.modeling_outputs import CausalLMOutputWithPast

    class _RunnerLM(nn.Module, GenerationMixin):
        """A causal LM over a decode runner, for HF's ``GenerationMixin`` (see the module docstring)."""

        main_input_name = "input_ids"
        _is_stateful = False
        _supports_cache_class = True

        def __init__(self, model: nn.Module, runner: Any) -> None:
            super().__init__()
            object.__setattr__(self, "model", model)  # not a submodule: the runner computes, this wraps
            self.runner = runner
            self.config = _hf_config(model)
            gen = getattr(model, "generation_config", None)
            self.generation_config = gen if gen is not None else GenerationConfig.from_model_config(self.config)
            ref = next((p for p in model.parameters()), None)
            self._device = ref.device if ref is not None and not ref.is_meta else getattr(runner, "device", None) \
                or torch.device("cpu")

        @property
        def device(self) -> torch.device:
            return self._device

        @property
        def dtype(self) -> torch.dtype:
            return torch.float32

        @classmethod
        def can_generate(cls) -> bool:
            return True

        def _supports_logits_to_keep(self) -> bool:
            return True  # assisted decoding asks for the logits of every draft token

        def _valid_auto_compile_criteria(self, *args: Any, **kwargs: Any) -> bool:
            return False

        def get_experts_implementation(self) -> dict:
            return {}  # no mixture-of-experts modules here: HF's decode-time switch has nothing to do

        def set_experts_implementation(self, *args: Any) -> None:
            return None

        def prepare_inputs_for_generation(self, input_ids: torch.Tensor, cache: RunnerCache | None = None,
                                          attention_mask: torch.Tensor | None = None,
                                          logits_to_keep: int | None = None, **kwargs: Any) -> dict:
            return {"input_ids": input_ids, "attention_mask": attention_mask, "cache": cache,
                    "logits_to_keep": logits_to_keep}

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    position_ids: torch.Tensor | None = None, cache: RunnerCache | None = None,
                    logits_to_keep: int | None = None, **kwargs: Any) -> Any:
            if cache is None:
                raise ValueError("flexspeed's HF-generate bridge needs its RunnerCache; call hf_generate()")
            B, n = input_ids.shape
            start = cache.seen
            if cache.store is None:  # the prefill: the batch as HF expanded it
                cache.store = self.runner.new_cache(B, cache.max_len)
            mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
            if cache.key_mask is None and not bool(mask.all()):
                cache.key_mask = torch.ones(B, max(cache.max_len, n), dtype=torch.bool, device=input_ids.device)
            if cache.key_mask is not None:
                cache.key_mask[:, :n] = mask.bool()
            pos = (mask.long().cumsum(1) - 1).clamp_(min=0)[:, start:n]  # (B, new)
            keep = min(int(logits_to_keep or 1), n - start)  # > 1: assisted decoding's draft tokens
            logits = self.runner.step(input_ids[:, start:n], pos, cache.store, start, cache.key_mask,
                                      last_only=keep == 1)
            cache.seen = n
            return CausalLMOutputWithPast(logits=logits[:, -keep:].float(), cache=cache)

    return _RunnerLM


def RunnerLM(model: nn.Module, runner: Any) -> nn.Module:  # noqa: N802 - a class made on first use
    """A causal LM HF's ``generate`` can drive, computing with ``runner`` (``model`` supplies the configs)."""
    return _lm_class()(model, runner)


def hf_generate(model: nn.Module, runner: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                max_total: int, **kwargs: Any) -> Any:
    """HF's ``generate(input_ids, attention_mask=..., **kwargs)`` over ``runner``'s cache.

    Args:
        max_total: the longest sequence (prompt + new tokens) the cache must hold.
    Returns:
        what HF's ``generate`` returns (token ids, or a ``GenerateOutput`` with
        ``return_dict_in_generate=True``).
    """
    lm = RunnerLM(model, runner)
    cache = RunnerCache(runner, max_total)
    with torch.inference_mode():
        return lm.generate(input_ids, attention_mask=attention_mask, cache=cache, **kwargs)
