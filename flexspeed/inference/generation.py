"""Autoregressive generation with a KV cache, left-padded batches, greedy or sampled decoding.

``generate(model, input_ids, attention_mask=None, max_new_tokens=20, ...)`` returns the prompt
followed by the new tokens, ``(B, T_prompt + new)``. It drives a
:class:`~flexspeed.inference.runners.DecodeRunner`: the one passed as ``runner=`` (the
inference engine passes its own), else :func:`~flexspeed.inference.runners.select_runner`'s
choice (fused runner over a static KV cache, the model's own HF cache API, or recomputation;
see :mod:`flexspeed.inference.runners` for when each applies).

Batches are **left-padded**: ``attention_mask`` has zeros on the left; position ids are
``cumsum(mask) - 1`` (pads get 0), as HF does, so greedy output equals HF ``generate``.
Decoding follows HF's order: repetition penalty, ``min_new_tokens`` (eos suppressed), then for
sampling temperature, top-k, top-p. A row that emits an eos token is finished: it emits
``pad_token_id`` afterwards; generation stops early when every row is finished.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from flexspeed.inference.runners import DecodeRunner

__all__ = ["generate", "resolve_settings", "resolve_special_tokens", "step_function", "apply_repetition_penalty", "apply_top_k",
           "apply_top_p", "greedy_tokens"]


def _attr(model: nn.Module, name: str):
    for src in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        value = getattr(src, name, None) if src is not None else None
        if value is not None:
            return value
    return None


def resolve_special_tokens(model: nn.Module, eos_token_id: int | Sequence[int] | None,
                           pad_token_id: int | None) -> tuple[list[int], int | None]:
    """Eos ids and pad id: the arguments, else the model's generation config, else its config.

    As HF does, a missing pad id falls back to the first eos id.
    """
    eos = eos_token_id if eos_token_id is not None else _attr(model, "eos_token_id")
    eos_list = [] if eos is None else [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
    pad = pad_token_id if pad_token_id is not None else _attr(model, "pad_token_id")
    if pad is None and eos_list:
        pad = eos_list[0]
    return eos_list, (None if pad is None else int(pad))


class _Sampler:
    """Turns the next-token logits of each step into tokens (HF's processor order)."""

    def __init__(self, *, do_sample: bool, temperature: float, top_k: int | None, top_p: float,
                 repetition_penalty: float, min_new_tokens: int, eos: list[int],
                 generator: torch.Generator | None) -> None:
        if do_sample and temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0 when do_sample=True; use do_sample=False "
                             "for greedy decoding")
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p={top_p} must be in (0, 1]; use 1.0 to disable nucleus sampling")
        if top_k is not None and top_k < 0:
            raise ValueError(f"top_k={top_k} must be >= 0; use 0 or None to disable top-k")
        if repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty={repetition_penalty} must be > 0; use 1.0 to disable it")
        self.do_sample, self.temperature, self.top_k, self.top_p = do_sample, temperature, top_k or 0, top_p
        self.penalty, self.min_new, self.eos, self.generator = repetition_penalty, min_new_tokens, eos, generator
        self._eos_t: torch.Tensor | None = None
        self.padding: torch.Tensor | None = None
        """(B, >= T) True at left-padding positions (excluded from the repetition penalty, as HF)."""

    def __call__(self, logits: torch.Tensor, seq: torch.Tensor, n_done: int) -> torch.Tensor:
        """``logits`` (B, V) float32, ``seq`` (B, T) tokens so far -> next tokens (B,)."""
        if self.penalty != 1.0:
            logits = apply_repetition_penalty(logits, seq, self.penalty,
                                              None if self.padding is None else self.padding[:, :seq.shape[1]])
        if n_done < self.min_new and self.eos:
            if self._eos_t is None or self._eos_t.device != logits.device:
                self._eos_t = torch.tensor(self.eos, dtype=torch.long, device=logits.device)
            logits.index_fill_(1, self._eos_t, float("-inf"))
        if not self.do_sample:
            return greedy_tokens(logits)
        logits = apply_top_p(apply_top_k(logits / self.temperature if self.temperature != 1.0 else logits,
                                         self.top_k), self.top_p)
        probs = logits.softmax(dim=-1)  # (B, V)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)


# The logits processors, in HF's order (penalty, then for sampling temperature, top-k, top-p). The
# serving engine applies the same functions row by row with each request's own settings.

def apply_repetition_penalty(logits: torch.Tensor, seq: torch.Tensor, penalty: float,
                             padding: torch.Tensor | None = None) -> torch.Tensor:
    """HF's (CTRL) repetition penalty: ``logits`` (B, V) of tokens in ``seq`` (B, T) divided by
    ``penalty`` (multiplied where negative). ``padding`` (B, T) marks left padding, which is not
    "already generated" (routed to a dummy column). Returns a new tensor."""
    vocab = logits.shape[-1]
    ids = seq if padding is None else seq.masked_fill(padding, vocab)
    padded = torch.nn.functional.pad(logits, (0, 1))  # (B, V + 1)
    picked = padded.gather(1, ids)  # (B, T)
    penalised = torch.where(picked < 0, picked * penalty, picked / penalty)
    return padded.scatter(1, ids, penalised)[:, :vocab]


def apply_top_k(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """Keep the ``top_k`` largest logits of each row (B, V); 0 keeps all."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return logits


def apply_top_p(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches ``top_p``."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1)  # ascending
    cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= 1 - top_p
    drop[:, -1] = False  # always keep the most likely token
    return logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))


def greedy_tokens(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)`` of (B, V) logits (the native kernel's on the CPU, ~10x faster)."""
    if logits.device.type == "cpu":
        from flexspeed.inference.native import argmax_rows

        fast = argmax_rows(logits)
        if fast is not None:
            return fast
    return logits.argmax(dim=-1)


def _prepare_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, pad: int | None,
                  eos: list[int]) -> torch.Tensor:
    if attention_mask is None:
        # HF's inference: padding is recognisable only if the pad id differs from eos
        if pad is not None and pad not in eos and bool((input_ids == pad).any()):
            attention_mask = (input_ids != pad).long()
        else:
            return torch.ones_like(input_ids, dtype=torch.long)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has "
                         f"{tuple(input_ids.shape)}; pass one mask entry per token")
    mask = attention_mask.long()
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError("attention_mask has zeros after ones (right padding); pad prompts on the left "
                         "(tokenizer.padding_side = 'left')")
    if bool((mask.sum(dim=1) == 0).any()):
        raise ValueError("a row of attention_mask is all zeros (an empty prompt); give every row at least one token")
    return mask


_FAST = ("max_new_tokens", "max_length", "do_sample", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id",
         "min_new_tokens", "repetition_penalty", "num_return_sequences", "use_cache")
"""Generation settings flexspeed's own loop runs; everything else goes to HF's loop (``hf_generate``)."""
_INERT = frozenset({"bos_token_id", "decoder_start_token_id", "transformers_version", "_from_model_config",
                    "output_attentions", "output_hidden_states", "is_assistant", "cache_implementation",
                    "compile_config", "disable_compile"})
_PLAIN_DEFAULTS = dict(do_sample=False, temperature=1.0, top_k=0, top_p=1.0, repetition_penalty=1.0, min_new_tokens=0,
                       num_return_sequences=1, use_cache=True)


def _hf_defaults() -> dict[str, Any]:
    try:
        from transformers import GenerationConfig
    except ImportError:  # pragma: no cover - transformers is a test extra
        return {}
    return GenerationConfig._get_default_generation_params()


def resolve_settings(model: nn.Module, given: dict[str, Any], generation_config: Any = None
                     ) -> tuple[dict[str, Any], list[str]]:
    """The generation settings of one call, and what (if anything) needs HF's own loop.

    Precedence as in HF: the arguments, then ``generation_config`` (default: the model's), then
    HF's defaults for an HF model (``top_k=50`` when sampling), else flexspeed's (no top-k); 20
    new tokens when no length is set anywhere (as HF 5 does).

    Returns:
        (the :data:`_FAST` settings, the names of set options only HF's loop runs).
    """
    cfg = generation_config if generation_config is not None else getattr(model, "generation_config", None)
    diff = cfg.to_diff_dict() if hasattr(cfg, "to_diff_dict") else {}
    defaults = _hf_defaults() if cfg is not None else {}
    out = {**_PLAIN_DEFAULTS, **{k: defaults[k] for k in _FAST if k in defaults and k != "max_length"}}
    if cfg is None:
        out["top_k"] = 0
    for key in _FAST:
        value = given.get(key, diff.get(key))
        if value is not None:
            out[key] = value
    needs_hf = [k for k, v in diff.items() if k not in _FAST and k not in _INERT and not k.startswith("_")
                and v is not None and v != defaults.get(k, None) and v is not False]
    return out, needs_hf


def generate(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             max_new_tokens: int | None = None, *, do_sample: bool | None = None, temperature: float | None = None,
             top_k: int | None = None, top_p: float | None = None, eos_token_id: int | Sequence[int] | None = None,
             pad_token_id: int | None = None, min_new_tokens: int | None = None, max_length: int | None = None,
             repetition_penalty: float | None = None, num_return_sequences: int | None = None,
             use_cache: bool | None = None, generator: torch.Generator | int | None = None,
             runner: DecodeRunner | None = None, streamer: Any = None, generation_config: Any = None,
             **hf_kwargs: Any) -> Any:
    """Generate tokens after ``input_ids``, with HF ``generate``'s arguments and defaults.

    Greedy and sampled decoding with the arguments below run in flexspeed's own loop (the native
    whole-loop greedy kernel where it applies). Every other argument HF's ``generate`` accepts
    (``num_beams``, ``return_dict_in_generate``, ``output_scores``, ``stopping_criteria``,
    ``logits_processor``, ``no_repeat_ngram_size``, ``min_p``, ...), and a ``generation_config``
    that sets one, runs HF's own loop over the same runner (:mod:`flexspeed.inference.hf_generate`).

    Args:
        model: a kernel-injected model, an HF causal LM, or any ``model(ids) -> logits`` module.
        input_ids: (B, T) prompt tokens, left-padded.
        attention_mask: (B, T), 1 for tokens and 0 for (left) padding; inferred from the pad id
            as HF does when omitted.
        max_new_tokens: tokens to add (default: the generation config's, else ``max_length - T``,
            else 20).
        do_sample: sample (else greedy).
        temperature, top_k, top_p: sampling filters (HF models: ``top_k`` defaults to 50, as HF).
        eos_token_id: id(s) that finish a row (default: the model's generation config).
        pad_token_id: id emitted by finished rows (default: the model's, else the first eos).
        min_new_tokens: eos is suppressed until this many tokens are generated.
        max_length: cap on prompt + new tokens (``max_new_tokens`` wins if both are given).
        repetition_penalty: HF's (CTRL) penalty on tokens already in the sequence.
        num_return_sequences: samples per prompt (rows are repeated; needs ``do_sample`` or beams).
        use_cache: ``False`` recomputes the whole sequence each step (for checking).
        generator: ``torch.Generator`` or an int seed for sampling (flexspeed's loop; HF's loop
            takes an int seed only). Without one, sampling draws from torch's global generator
            exactly as HF's ``generate`` does, so seeded runs give HF's tokens.
        runner: the :class:`~flexspeed.inference.runners.DecodeRunner` to drive (the engine passes
            its own); default :func:`~flexspeed.inference.runners.select_runner`'s choice.
        streamer: an HF streamer (``put``/``end``): the prompt, then each new token as it is made.
        generation_config: an HF ``GenerationConfig``; its values are the defaults of this call.
        **hf_kwargs: any other argument of HF's ``generate``.
    Returns:
        (B * num_return_sequences, T + n) token ids, ``n <= max_new_tokens`` (fewer when every
        row finished early); what HF returns (``GenerateOutput``...) where HF's loop ran.
    Raises:
        ValueError: an invalid argument, named.
    """
    given = {k: v for k, v in dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                   top_k=top_k, top_p=top_p, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                                   min_new_tokens=min_new_tokens, max_length=max_length,
                                   repetition_penalty=repetition_penalty, num_return_sequences=num_return_sequences,
                                   use_cache=use_cache).items() if v is not None}
    settings, needs_hf = resolve_settings(model, given, generation_config)
    hf_args = {k: v for k, v in hf_kwargs.items() if not (k in ("logits_processor", "stopping_criteria") and not v)}
    if hf_args or needs_hf:
        return _through_hf(model, runner, input_ids, attention_mask, settings, given, generator, streamer,
                           generation_config, hf_args, sorted(hf_args) + needs_hf)
    max_new_tokens, max_length = settings.get("max_new_tokens"), settings.get("max_length")
    do_sample, temperature, top_k, top_p = (settings[k] for k in ("do_sample", "temperature", "top_k", "top_p"))
    min_new_tokens, repetition_penalty = settings["min_new_tokens"], settings["repetition_penalty"]
    num_return_sequences, use_cache = settings["num_return_sequences"], settings["use_cache"]
    eos_token_id, pad_token_id = settings.get("eos_token_id"), settings.get("pad_token_id")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    if max_new_tokens is None:
        max_new_tokens = (max_length - T) if max_length is not None else 20
        if max_new_tokens < 0:
            raise ValueError(f"max_length={max_length} is shorter than the prompt ({T} tokens); raise it or "
                             "pass max_new_tokens")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if num_return_sequences < 1 or (num_return_sequences > 1 and not do_sample):
        raise ValueError(f"num_return_sequences={num_return_sequences} needs do_sample=True (greedy decoding "
                         "returns one sequence per prompt)")
    if isinstance(generator, int):
        generator = torch.Generator(device=input_ids.device).manual_seed(generator)
    eos, pad = resolve_special_tokens(model, eos_token_id, pad_token_id)
    mask = _prepare_mask(input_ids, attention_mask, pad, eos)
    if num_return_sequences > 1:
        input_ids = input_ids.repeat_interleave(num_return_sequences, dim=0)
        mask = mask.repeat_interleave(num_return_sequences, dim=0)
        B = input_ids.shape[0]
    sampler = _Sampler(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                       repetition_penalty=repetition_penalty, min_new_tokens=min_new_tokens, eos=eos,
                       generator=generator)
    seq = torch.full((B, T + max_new_tokens), pad if pad is not None else 0, dtype=torch.long,
                     device=input_ids.device)  # (B, T + new), filled in place
    seq[:, :T] = input_ids
    if not bool(mask.all()):
        sampler.padding = torch.zeros_like(seq, dtype=torch.bool)
        sampler.padding[:, :T] = mask == 0
    if streamer is not None:
        streamer.put(seq[:, :T].cpu())
    if max_new_tokens == 0:
        if streamer is not None:
            streamer.end()
        return seq
    try:
        return _loop(model, input_ids, mask, seq, sampler, max_new_tokens, use_cache, runner, streamer, eos, pad,
                     do_sample, repetition_penalty, min_new_tokens)
    finally:
        if streamer is not None:
            streamer.end()


def _loop(model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor, seq: torch.Tensor, sampler: _Sampler,
          max_new_tokens: int, use_cache: bool, runner: DecodeRunner | None, streamer: Any, eos: list[int],
          pad: int | None, do_sample: bool, repetition_penalty: float, min_new_tokens: int) -> torch.Tensor:
    """flexspeed's decoding loop: fills ``seq`` (B, T + max_new) in place; returns its filled columns."""
    B, T = input_ids.shape
    step = step_function(model, input_ids, mask, max_new_tokens, use_cache, None if not use_cache else runner)
    # greedy decoding of a native-kernel model: everything after the first token in one C call
    on_cpu, eos_set, done = input_ids.device.type == "cpu", set(eos), [False] * B
    fast = step.greedy if on_cpu and not do_sample and repetition_penalty == 1.0 and streamer is None else None
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    eos_t = torch.tensor(eos, dtype=torch.long, device=input_ids.device)
    with torch.inference_mode():
        logits = step(None)
        i = 0
        while i < max_new_tokens:
            nxt = sampler(logits.float(), seq[:, :T + i], i)  # (B,)
            if on_cpu:  # the bookkeeping in Python: a few us, where six small tensor ops cost ~40
                if pad is not None and eos and any(done):
                    nxt = torch.tensor([pad if d else v for v, d in zip(nxt.tolist(), done)], dtype=torch.long)
                seq[:, T + i] = nxt
                if eos:
                    done = [d or v in eos_set for v, d in zip(nxt.tolist(), done)]
                    if all(done):
                        return seq[:, :T + i + 1]
            else:
                if pad is not None and eos:
                    nxt = torch.where(finished, torch.full_like(nxt, pad), nxt)
                seq[:, T + i] = nxt
                if eos:
                    finished |= torch.isin(nxt, eos_t)
                    if bool(finished.all()):
                        return seq[:, :T + i + 1]
            if streamer is not None:
                streamer.put(seq[:, T + i].cpu())
            if i + 1 >= max_new_tokens:
                break
            made = fast(seq, min_new_tokens, eos, pad, done) if fast is not None else None
            if made is None:
                logits = step(nxt)
                i += 1
                continue
            # the runner filled columns T + i + 1 .. T + made - 1 (it may stop early: its path
            # chooser wants to look again, or every row finished)
            if made >= max_new_tokens:
                return seq
            if eos:
                done = [d or bool(torch.isin(seq[b, T + i + 1:T + made], eos_t).any()) for b, d in enumerate(done)]
                if all(done):
                    return seq[:, :T + made]
            i = made
            logits = step(seq[:, T + i - 1])
    return seq


def _positions(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(dim=1) - 1).clamp_(min=0)  # (B, T); pads get 0, as HF


def step_function(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, max_new: int, use_cache: bool = True,
                  runner: DecodeRunner | None = None):
    """The forward steps :func:`generate` runs, as a closure over a fresh cache of ``runner``.

    Args:
        ids, mask: (B, T) left-padded prompt tokens and their mask (1 for tokens).
        max_new: the most tokens any row will be given (sizes the cache).
        runner: the runner to drive (default: :func:`~flexspeed.inference.runners.select_runner`'s).
    Returns:
        ``step``: ``step(None)`` runs the prompts, then ``step(tokens)`` feeds one new token
        (B,) per row; both return the next-token logits (B, V). ``step.greedy(seq, min_new, eos,
        pad, done)`` runs greedy steps after the newest token in one call where the runner can
        (all the rest, or as many as its path chooser allows; returns how many new columns ``seq``
        holds), else returns ``None``.
    """
    if runner is None:
        from flexspeed.inference.runners import select_runner

        runner = select_runner(model, use_cache=use_cache).runner
    B, T = ids.shape
    longest = int(mask.sum(dim=1).max())
    if runner.max_positions is not None and longest + max_new > runner.max_positions:
        raise ValueError(f"prompt ({longest} tokens) plus max_new_tokens={max_new} exceeds the model's "
                         f"{runner.max_positions} positions; generate fewer tokens or shorten the prompt")
    cache = runner.new_cache(B, T + max_new)
    key_mask = None
    if not bool(mask.all()):
        key_mask = torch.ones(B, T + max_new, dtype=torch.bool, device=ids.device)  # (B, T_max)
        key_mask[:, :T] = mask.bool()
    pos = _positions(mask)
    state = {"start": 0, "pos": pos[:, -1:]}

    def step(tokens: torch.Tensor | None) -> torch.Tensor:
        if tokens is None:
            logits = runner.step(ids, pos, cache, 0, key_mask)
            state["start"] = T
        else:
            state["pos"] = state["pos"] + 1  # (B, 1)
            logits = runner.step(tokens[:, None], state["pos"], cache, state["start"], key_mask)
            state["start"] += 1
        return logits[:, -1]  # (B, V)

    def greedy(seq: torch.Tensor, min_new: int, eos: list[int], pad: int | None, done: list[bool]) -> int | None:
        """After a new token in column ``start`` (not yet fed): greedy tokens after it in one call of
        the runner; returns how many new columns (counted from ``T``) ``seq`` holds then, or ``None``.
        The cache then holds every column but the last filled one."""
        col = state["start"]
        made = runner.greedy(cache, key_mask, seq, col, state["pos"].reshape(-1) + 1, max(0, min_new - (col - T)),
                             eos, pad, done)
        if made is None:
            return None
        state["start"] += made - 1
        state["pos"] = state["pos"] + (made - 1)
        return col - T + made

    step.greedy = greedy
    step.cache = cache
    return step


def _through_hf(model: nn.Module, runner: DecodeRunner | None, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None, settings: dict[str, Any], given: dict[str, Any],
                generator: torch.Generator | int | None, streamer: Any, generation_config: Any,
                hf_args: dict[str, Any], why: list[str]) -> Any:
    """HF's ``generate`` loop over flexspeed's runner, for the options flexspeed's loop does not run."""
    try:
        from flexspeed.inference.hf_generate import hf_generate
    except ImportError as exc:  # pragma: no cover - transformers is a test extra
        raise ValueError(f"generate() options {why} run through transformers' generate loop; install "
                         "transformers (pip install transformers)") from exc
    if isinstance(generator, torch.Generator):
        raise ValueError(f"generator=<torch.Generator> cannot drive transformers' generate loop (needed for {why}); "
                         "pass an int seed, or seed torch.manual_seed(...) before the call")
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be (batch, length), got shape {tuple(input_ids.shape)}")
    T = input_ids.shape[1]
    new = settings.get("max_new_tokens")
    if new is None:
        new = max(0, int(settings["max_length"]) - T) if settings.get("max_length") is not None else 20
    if runner is None or not settings.get("use_cache", True):
        from flexspeed.inference.runners import select_runner

        runner = select_runner(model, use_cache=settings.get("use_cache", True)).runner
    longest = T if attention_mask is None else int(attention_mask.sum(dim=1).max())
    if runner.max_positions is not None and longest + new > runner.max_positions:
        raise ValueError(f"prompt ({longest} tokens) plus {new} new tokens exceeds the model's "
                         f"{runner.max_positions} positions; generate fewer tokens or shorten the prompt")
    kwargs = {**{k: v for k, v in given.items() if k != "use_cache"}, **hf_args}
    if settings.get("max_new_tokens") is None and settings.get("max_length") is None:
        kwargs["max_new_tokens"] = new  # HF's own default (20), stated: the cache is sized for it
    if generation_config is not None:
        kwargs["generation_config"] = generation_config
    if streamer is not None:
        kwargs["streamer"] = streamer
    if isinstance(generator, int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(generator)
            return hf_generate(model, runner, input_ids, attention_mask, T + new, **kwargs)
    return hf_generate(model, runner, input_ids, attention_mask, T + new, **kwargs)
