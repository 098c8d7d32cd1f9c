"""Model families: one table of what flexspeed knows about each decoder-only architecture.

A :class:`Family` says, for one architecture, (1) how its config reads (:class:`Dims`, from a
``config.json`` dict or a config object, with the family's defaults), and (2) where each tensor
lives, *by role*: the decoder blocks, the token/position tables, and inside a block its two
norms, the q/k/v (or fused qkv) projections, the output projection, the MLP's gate/up/down.
Everything that has to know an architecture reads this table:

- kernel injection (:mod:`~flexspeed.inference.kernels`) builds its fused layers from the roles;
- the native decoder (through the fused runner) reads the same modules;
- the offload runner (:mod:`~flexspeed.inference.offload.arch`) turns the roles into checkpoint keys;
- automatic tensor parallelism (:mod:`~flexspeed.inference.tp`) takes head counts from :class:`Dims`.

Families: flexspeed's GPT, HF GPT-2, OPT, Llama, Mistral, Qwen2, Phi-3, Gemma and GPT-NeoX.
Adding one is one :data:`FAMILIES` entry (a parse function and the role paths) plus its tests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from flexspeed.config.errors import ConfigError

__all__ = ["Dims", "Family", "FAMILIES", "family_for_config", "family_for_model", "config_of_model",
           "inv_freq", "SUPPORTED"]


@dataclass(frozen=True)
class Dims:
    """The shapes and constants of one model, read from its config."""

    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn: int
    vocab: int
    max_positions: int | None
    """Positions the model can attend over (learned table, or a sliding window); ``None``: no limit."""
    norm: str = "layer"
    """``"layer"`` (LayerNorm), ``"rms"`` (RMSNorm, ``w * x``), ``"rms1p"`` (Gemma, ``(1 + w) * x`` in fp32)."""
    eps: float = 1e-5
    act: str = "gelu"
    """HF activation name (``hidden_act`` / ``activation_function``)."""
    emb_dim: int = 0
    """Token table width when it differs from ``hidden`` (OPT's ``word_embed_proj_dim``), else 0."""
    norm_bias: bool = True
    norm_affine: bool = True
    pre_norm: bool = True
    parallel_residual: bool = False
    """``x + attn(norm1(x)) + mlp(norm2(x))`` (GPT-NeoX) instead of two sequential residuals."""
    gated: bool = False
    rotary_dim: int = 0
    """Leading dims of each head that rotary embeddings rotate (0: learned positions)."""
    rope: Mapping[str, Any] = field(default_factory=dict)
    qkv_bias: bool = True
    o_bias: bool = True
    mlp_bias: bool = True
    tied: bool = False
    embed_scale: float | None = None
    pos_offset: int = 0
    scale: float = 0.0
    inverse_layer_scale: bool = False
    final_norm: bool = True
    eos_token_id: Any = None
    pad_token_id: Any = None
    windows: tuple[int | None, ...] = ()
    """Per decoder layer, the sliding attention window (a query attends the ``window`` newest keys,
    itself included: HF's ``kv_idx > q_idx - window``), ``None`` for full attention; empty: none."""

    def layer_scale(self, index: int) -> float:
        """Softmax scale of decoder layer ``index``."""
        s = self.scale or self.head_dim ** -0.5
        return s / (index + 1) if self.inverse_layer_scale else s


@dataclass(frozen=True)
class Family:
    """Where one architecture keeps its tensors, by role, and how its config reads."""

    name: str
    model_types: tuple[str, ...]
    parse: Callable[[Any], Dims]
    layers: str
    """Path of the decoder blocks (a ``ModuleList``)."""
    embed: Mapping[str, str]
    """``tok`` (token table), optionally ``pos`` (learned positions) and ``proj_in``: module paths."""
    block: Mapping[str, str]
    """Inside a block: ``norm1``, ``norm2``, ``q``/``k``/``v`` or ``qkv``, ``o``, ``up``/``down``
    (``gate`` + ``up`` or ``gate_up`` when gated), optionally ``act`` (the activation module)."""
    final: Mapping[str, str]
    """``norm`` (final norm) and optionally ``proj_out``."""
    head: str = "lm_head"
    rotary: str | None = None
    """Path of the model's rotary-embedding module (``(x, pos) -> (cos, sin)``), if it has one."""
    qkv_layout: str = "concat"
    """``"concat"``: fused qkv rows are ``[q | k | v]``; ``"heads"``: ``[q_h k_h v_h]`` per head (GPT-NeoX)."""
    conv1d: bool = False
    """Projections are HF ``Conv1D`` (weights stored ``(in, out)``)."""
    stored_names: Mapping[str, str] = field(default_factory=dict)
    """Module path -> the name checkpoint files use for it, where they differ (GPT-NeoX: ``lm_head`` -> ``embed_out``)."""
    host: str = "hf"
    """How the host model calls its blocks: ``"gpt"`` (``block(x)``), ``"hf_gpt2"`` (positional), ``"hf"``."""

    def qkv_path(self) -> str:
        """Block-relative path of the fused q/k/v projection (the family's own, else next to ``q``)."""
        if "qkv" in self.block:
            return self.block["qkv"]
        parent = self.block["q"].rpartition(".")[0]
        return f"{parent}.qkv" if parent else "qkv"

    def up_path(self) -> str:
        """Block-relative path of the (fused gate/up, if gated) up projection."""
        if "gate_up" in self.block:
            return self.block["gate_up"]
        if "gate" in self.block:
            parent = self.block["gate"].rpartition(".")[0]
            return f"{parent}.gate_up" if parent else "gate_up"
        return self.block["up"]

    def native_blocker(self, dims: Dims) -> str | None:
        """Why the native decode kernel cannot compute this family's layers (``None``: it can). The
        kernel turns the leading ``rotary_dim`` dims of each head (GPT-NeoX's ``rotary_pct``, a
        ``partial_rotary_factor``) and runs the parallel residual; an odd rotary width it cannot pair."""
        if dims.rotary_dim % 2 or dims.rotary_dim > dims.head_dim:
            return (f"{self.name} rotates {dims.rotary_dim} of {dims.head_dim} head dims (the kernel turns an even "
                    "number, at most head_dim)")
        return None


# ------------------------------------------------------------------------------ config parsing

def _get(cfg: Any, name: str, default: Any = None) -> Any:
    value = cfg.get(name, default) if isinstance(cfg, Mapping) else getattr(cfg, name, default)
    return default if value is None else value


def _rope_params(cfg: Any) -> dict[str, Any]:
    params = dict(_get(cfg, "rope_parameters", None) or _get(cfg, "rope_scaling", None) or {})
    params.setdefault("rope_theta", _get(cfg, "rope_theta", 10000.0))
    return params


def inv_freq(dims: Dims) -> torch.Tensor:
    """Rotary inverse frequencies ``(rotary_dim / 2,)`` of ``dims`` (default, linear or llama3 scaling).

    Raises:
        NotImplementedError: another ``rope_type``.
    """
    params, rd = dims.rope, dims.rotary_dim
    theta = float(params.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    inv = 1.0 / theta ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd)  # (rd/2,)
    if kind == "linear":
        inv = inv / float(params["factor"])
    elif kind == "llama3":  # long wavelengths slowed by `factor`, short ones kept, a smooth ramp between
        factor, lo, hi = float(params["factor"]), float(params["low_freq_factor"]), float(params["high_freq_factor"])
        old_ctx = float(params["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        ramp = ((old_ctx / wavelen - lo) / (hi - lo)).clamp(0, 1)
        inv = torch.where(wavelen > old_ctx / lo, inv / factor, torch.where(wavelen < old_ctx / hi, inv,
                                                                             (1 - ramp) * inv / factor + ramp * inv))
    elif kind != "default":
        raise NotImplementedError(f"rope_parameters.rope_type={kind!r} is not supported; supported: default, "
                                  "linear, llama3")
    return inv.float()


def _gpt(cfg: Any) -> Dims:
    c, heads = _get(cfg, "n_embd", 768), _get(cfg, "n_head", 12)
    bias = bool(_get(cfg, "bias", True))
    return Dims(n_layers=_get(cfg, "n_layer", 12), hidden=c, n_heads=heads, n_kv_heads=heads, head_dim=c // heads,
                ffn=4 * c, vocab=_get(cfg, "vocab_size", 50257), max_positions=_get(cfg, "block_size", 128),
                act="gelu", norm_bias=bias, qkv_bias=bias, o_bias=bias, mlp_bias=bias,
                tied=bool(_get(cfg, "tie_weights", False)))


def _gpt2(cfg: Any) -> Dims:
    if _get(cfg, "add_cross_attention", False):
        raise ConfigError("GPT-2 with cross-attention (add_cross_attention=True) is not supported by flexspeed's "
                          "fused layers or offload runner; use a decoder-only GPT-2 or set "
                          "replace_with_kernel_inject=False", key="replace_with_kernel_inject")
    c, heads = _get(cfg, "n_embd", 768), _get(cfg, "n_head", 12)
    hd = c // heads
    return Dims(n_layers=_get(cfg, "n_layer", 12), hidden=c, n_heads=heads, n_kv_heads=heads, head_dim=hd,
                ffn=_get(cfg, "n_inner", 4 * c), vocab=_get(cfg, "vocab_size", 50257),
                max_positions=_get(cfg, "n_positions", 1024), eps=float(_get(cfg, "layer_norm_epsilon", 1e-5)),
                act=_get(cfg, "activation_function", "gelu_new"), tied=bool(_get(cfg, "tie_word_embeddings", True)),
                scale=(hd ** -0.5) if _get(cfg, "scale_attn_weights", True) else 1.0,
                inverse_layer_scale=bool(_get(cfg, "scale_attn_by_inverse_layer_idx", False)),
                eos_token_id=_get(cfg, "eos_token_id", 50256), pad_token_id=_get(cfg, "pad_token_id", None))


def _opt(cfg: Any) -> Dims:
    c, heads = _get(cfg, "hidden_size", 768), _get(cfg, "num_attention_heads", 12)
    emb = _get(cfg, "word_embed_proj_dim", c)
    bias, affine = bool(_get(cfg, "enable_bias", True)), bool(_get(cfg, "layer_norm_elementwise_affine", True))
    pre = bool(_get(cfg, "do_layer_norm_before", True))
    return Dims(n_layers=_get(cfg, "num_hidden_layers", 12), hidden=c, n_heads=heads, n_kv_heads=heads,
                head_dim=c // heads, ffn=_get(cfg, "ffn_dim", 3072), vocab=_get(cfg, "vocab_size", 50272),
                max_positions=_get(cfg, "max_position_embeddings", 2048), act=_get(cfg, "activation_function", "relu"),
                emb_dim=emb if emb != c else 0, norm_affine=affine, pre_norm=pre, qkv_bias=bias, o_bias=bias,
                mlp_bias=bias, tied=bool(_get(cfg, "tie_word_embeddings", True)), pos_offset=2,
                final_norm=pre and not _get(cfg, "_remove_final_layer_norm", False),
                eos_token_id=_get(cfg, "eos_token_id", 2), pad_token_id=_get(cfg, "pad_token_id", 1))


def _llama_like(cfg: Any, *, act: str = "silu", qkv_bias: bool | None = None, window: bool = False,
                norm: str = "rms", embed_scale: bool = False, tied: bool = False) -> Dims:
    c, heads = _get(cfg, "hidden_size", 4096), _get(cfg, "num_attention_heads", 32)
    hd = _get(cfg, "head_dim", c // heads)
    abias = bool(_get(cfg, "attention_bias", False)) if qkv_bias is None else qkv_bias
    rope = _rope_params(cfg)
    layers = _get(cfg, "num_hidden_layers", 32)
    windows: tuple[int | None, ...] = ()
    if window and _get(cfg, "sliding_window", None) is not None and _get(cfg, "use_sliding_window", True):
        w = int(_get(cfg, "sliding_window"))
        kinds = _get(cfg, "layer_types", None)  # Qwen2: only layers >= max_window_layers slide
        windows = tuple(w if kinds is None or kinds[i] == "sliding_attention" else None for i in range(layers))
        if all(x is None for x in windows):
            windows = ()
    return Dims(n_layers=layers, hidden=c, n_heads=heads,
                n_kv_heads=_get(cfg, "num_key_value_heads", heads), head_dim=hd,
                ffn=_get(cfg, "intermediate_size", 11008), vocab=_get(cfg, "vocab_size", 32000), max_positions=None,
                norm=norm, eps=float(_get(cfg, "rms_norm_eps", 1e-6)), act=_get(cfg, "hidden_act", act),
                norm_bias=False, gated=True, rotary_dim=int(hd * float(rope.get("partial_rotary_factor", 1.0))),
                rope=rope, qkv_bias=abias, o_bias=bool(_get(cfg, "attention_bias", False)) and qkv_bias is None,
                mlp_bias=bool(_get(cfg, "mlp_bias", False)), tied=bool(_get(cfg, "tie_word_embeddings", tied)),
                embed_scale=float(c ** 0.5) if embed_scale else None, scale=hd ** -0.5,
                eos_token_id=_get(cfg, "eos_token_id", 2), pad_token_id=_get(cfg, "pad_token_id", None),
                windows=windows)


def _gpt_neox(cfg: Any) -> Dims:
    c, heads = _get(cfg, "hidden_size", 6144), _get(cfg, "num_attention_heads", 64)
    hd = c // heads
    rope = _rope_params(cfg)
    rope.setdefault("partial_rotary_factor", _get(cfg, "rotary_pct", 0.25))
    bias = bool(_get(cfg, "attention_bias", True))
    return Dims(n_layers=_get(cfg, "num_hidden_layers", 44), hidden=c, n_heads=heads, n_kv_heads=heads, head_dim=hd,
                ffn=_get(cfg, "intermediate_size", 24576), vocab=_get(cfg, "vocab_size", 50432), max_positions=None,
                eps=float(_get(cfg, "layer_norm_eps", 1e-5)), act=_get(cfg, "hidden_act", "gelu"),
                parallel_residual=bool(_get(cfg, "use_parallel_residual", True)),
                rotary_dim=int(hd * float(rope["partial_rotary_factor"])), rope=rope, qkv_bias=bias, o_bias=bias,
                tied=bool(_get(cfg, "tie_word_embeddings", False)), scale=hd ** -0.5,
                eos_token_id=_get(cfg, "eos_token_id", 0), pad_token_id=_get(cfg, "pad_token_id", None))


# ------------------------------------------------------------------------------ the table

_LLAMA_BLOCK = {"norm1": "input_layernorm", "q": "self_attn.q_proj", "k": "self_attn.k_proj",
                "v": "self_attn.v_proj", "o": "self_attn.o_proj", "norm2": "post_attention_layernorm",
                "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj", "act": "mlp.act_fn"}
_LLAMA = dict(layers="model.layers", embed={"tok": "model.embed_tokens"}, final={"norm": "model.norm"},
              rotary="model.rotary_emb")
_GPT_BLOCK = {"norm1": "ln_1", "qkv": "attn.c_attn", "o": "attn.c_proj", "norm2": "ln_2", "up": "mlp.c_fc",
              "down": "mlp.c_proj"}
_GPT = dict(layers="transformer.h", embed={"tok": "transformer.wte", "pos": "transformer.wpe"},
            final={"norm": "transformer.ln_f"})

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("gpt", ("flexspeed_gpt", "flexspeed-gpt"), _gpt, block=_GPT_BLOCK, host="gpt", **_GPT),
    Family("gpt2", ("gpt2",), _gpt2, block={**_GPT_BLOCK, "act": "mlp.act"}, conv1d=True, host="hf_gpt2", **_GPT),
    Family("opt", ("opt",), _opt, layers="model.decoder.layers",
           embed={"tok": "model.decoder.embed_tokens", "pos": "model.decoder.embed_positions",
                  "proj_in": "model.decoder.project_in"},
           block={"norm1": "self_attn_layer_norm", "q": "self_attn.q_proj", "k": "self_attn.k_proj",
                  "v": "self_attn.v_proj", "o": "self_attn.out_proj", "norm2": "final_layer_norm", "up": "fc1",
                  "down": "fc2", "act": "activation_fn"},
           final={"norm": "model.decoder.final_layer_norm", "proj_out": "model.decoder.project_out"}),
    Family("llama", ("llama",), _llama_like, block=_LLAMA_BLOCK, **_LLAMA),
    Family("mistral", ("mistral",), lambda c: _llama_like(c, window=True), block=_LLAMA_BLOCK, **_LLAMA),
    Family("qwen2", ("qwen2",), lambda c: _llama_like(c, qkv_bias=True, window=True), block=_LLAMA_BLOCK, **_LLAMA),
    Family("phi3", ("phi3",), lambda c: _llama_like(c, window=True),
           block={"norm1": "input_layernorm", "qkv": "self_attn.qkv_proj", "o": "self_attn.o_proj",
                  "norm2": "post_attention_layernorm", "gate_up": "mlp.gate_up_proj", "down": "mlp.down_proj",
                  "act": "mlp.activation_fn"}, **_LLAMA),
    Family("gemma", ("gemma",), lambda c: _llama_like(c, act="gelu_pytorch_tanh", norm="rms1p", embed_scale=True,
                                                      tied=True), block=_LLAMA_BLOCK, **_LLAMA),
    Family("gpt_neox", ("gpt_neox",), _gpt_neox, layers="gpt_neox.layers", embed={"tok": "gpt_neox.embed_in"},
           block={"norm1": "input_layernorm", "qkv": "attention.query_key_value", "o": "attention.dense",
                  "norm2": "post_attention_layernorm", "up": "mlp.dense_h_to_4h", "down": "mlp.dense_4h_to_h",
                  "act": "mlp.act"},
           final={"norm": "gpt_neox.final_layer_norm"}, rotary="gpt_neox.rotary_emb", qkv_layout="heads",
           stored_names={"lm_head": "embed_out"}),
)}
_BY_TYPE = {t: f for f in FAMILIES.values() for t in f.model_types}
SUPPORTED = ("flexspeed GPT and HF " + ", ".join(f"{f.model_types[0]}" for f in FAMILIES.values() if f.name != "gpt")
             + " causal LMs")


def family_for_config(cfg: Any) -> tuple[Family, Dims] | None:
    """The family and dims of a config dict/object (by ``model_type``), or ``None`` if unknown."""
    kind = _get(cfg, "model_type", None)
    if kind is None and all(_get(cfg, k) is not None for k in ("n_layer", "n_head", "n_embd", "block_size")):
        kind = "flexspeed_gpt"  # a flexspeed GPTConfig
    fam = _BY_TYPE.get(kind)
    return None if fam is None else (fam, fam.parse(cfg))


def config_of_model(model: Any) -> Any:
    """The config a family is read from: a flexspeed GPT's ``GPTConfig`` (as a dict) or ``model.config``."""
    from flexspeed.models.gpt import GPT

    if isinstance(model, GPT):
        return {**model.config.to_dict(), "model_type": "flexspeed_gpt"}
    return getattr(model, "config", None)


def family_for_model(model: Any) -> tuple[Family, Dims] | None:
    """The family and dims of a model (flexspeed GPT or an HF causal LM with an ``lm_head``), or ``None``."""
    cfg = config_of_model(model)
    if cfg is None:
        return None
    found = family_for_config(cfg)
    if found is None:
        return None
    fam = found[0]
    try:
        model.get_submodule(fam.layers)
        model.get_submodule(fam.head)
    except AttributeError:  # a base model or another head on the same config
        return None
    return found
