"""Decoder architectures as data plus a functional per-layer forward, for the offload runner.

The fused modules of ``kernels.py`` own their weights (q, k and v concatenated into a new
tensor when they are built). The offload runner instead computes on weights that live in a
store: views of the checkpoint file, read buffers, int4-packed matrices. So each architecture
here is described by (1) the checkpoint tensors of its embedding, of each decoder layer and of
its head, in placement order, and (2) three functions that compute on a dict of those tensors:

- ``embed(w, ids, pos) -> x``            ids, pos: (B, T) -> (B, T, C)
- ``layer(w, x, ctx, attend) -> x``      (B, T, C) -> (B, T, C); ``attend(q, k, v)`` owns the KV cache
- ``head(w, x) -> logits``               (B, T, C) -> (B, T, V)

Supported: HF OPT (pre- and post-norm, ``project_in/out``), Llama (GQA; RoPE default, linear and
llama3 scaling), GPT-2 (``Conv1D`` weights), and flexspeed's :class:`~flexspeed.models.gpt.GPT`.
Configs are read from a dict (``config.json``) or a config object, with each family's defaults.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from flexspeed.config.errors import ConfigError
from flexspeed.inference.attention import StepContext, apply_rope

__all__ = ["TensorSpec", "LayerSpec", "Arch", "arch_from_config", "config_of_module", "SUPPORTED"]

SUPPORTED = "HF OPTForCausalLM, LlamaForCausalLM, GPT2LMHeadModel and flexspeed GPT"
_KEY = "offload"


@dataclass(frozen=True)
class TensorSpec:
    """One checkpoint tensor a layer computes with."""

    name: str
    """Logical name inside the layer (``"q.w"``, ``"ln1.b"``, ``"tok"``)."""
    key: str
    """Checkpoint key (``"model.decoder.layers.0.self_attn.q_proj.weight"``)."""
    shape: tuple[int, ...]
    """Expected shape (checked against the checkpoint)."""
    kind: str = "vector"
    """``"linear"`` (out, in), ``"conv1d"`` (in, out), ``"embedding"`` (rows, C), ``"vector"``."""

    @property
    def matrix(self) -> bool:
        """A weight matrix that int4 compression applies to (position tables are left alone)."""
        return self.kind in ("linear", "conv1d") or (self.kind == "embedding" and self.name == "tok")


@dataclass(frozen=True)
class LayerSpec:
    """A unit of the schedule: the embedding, one decoder layer, or the head."""

    kind: str
    """``"embed"``, ``"decoder"`` or ``"head"``."""
    index: int
    """Decoder layer index (-1 for the embedding, ``n_layers`` for the head)."""
    tensors: tuple[TensorSpec, ...]


def _get(cfg: Any, name: str, default: Any = None) -> Any:
    value = cfg.get(name, default) if isinstance(cfg, Mapping) else getattr(cfg, name, default)
    return default if value is None else value


_ACTS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {  # in place: applied to a product's fresh output
    "relu": torch.relu_, "gelu": torch.ops.aten.gelu_, "silu": lambda x: F.silu(x, inplace=True),
    "swish": lambda x: F.silu(x, inplace=True),
    "gelu_new": lambda x: torch.ops.aten.gelu_(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: torch.ops.aten.gelu_(x, approximate="tanh"),
    "gelu_fast": lambda x: torch.ops.aten.gelu_(x, approximate="tanh"),
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),
}


def _act(name: str, key: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in _ACTS:
        raise NotImplementedError(f"{key}={name!r} is not supported by the offload runner; supported: {sorted(_ACTS)}")
    return _ACTS[name]


@dataclass
class Arch:
    """One decoder family with its shapes; see the module docstring for the three functions."""

    family: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    max_positions: int | None
    layers: list[LayerSpec] = field(default_factory=list)
    """Embedding, decoder layers, head: the order the schedule walks."""
    eos_token_id: Any = None
    pad_token_id: Any = None
    opts: dict[str, Any] = field(default_factory=dict)
    """Family-specific constants (eps, activation, pre_norm, rope frequencies, ...)."""

    # ---------------------------------------------------------------- compute helpers

    def _norm(self, x: torch.Tensor, w: Mapping[str, Any], name: str) -> torch.Tensor:
        weight = w.get(name + ".w")
        if self.opts["norm"] == "rms":  # as HF: statistics in fp32, scale in the input dtype
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.opts["eps"])
            return weight * h.to(x.dtype)
        return F.layer_norm(x, (x.shape[-1],), weight, w.get(name + ".b"), self.opts["eps"])

    def _linear(self, x: torch.Tensor, w: Mapping[str, Any], name: str) -> torch.Tensor:
        weight, bias = w[name + ".w"], w.get(name + ".b")
        if not isinstance(weight, torch.Tensor):  # a compressed matrix (QuantLinear shell)
            y = weight(x)
            return y if bias is None else y + bias
        if name in self.opts.get("conv1d", ()):
            y = x @ weight  # GPT-2 Conv1D: weight (in, out)
            return y if bias is None else y + bias
        return F.linear(x, weight, bias)

    @staticmethod
    def _lookup(table: Any, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if isinstance(table, torch.Tensor):
            return F.embedding(ids, table)
        if hasattr(table, "gather_rows"):  # compressed table, or rows read on demand
            return table.gather_rows(ids.reshape(-1), dtype).view(*ids.shape, -1)
        raise TypeError(f"cannot look up rows in a {type(table).__name__}")

    # ---------------------------------------------------------------- the three functions

    def embed(self, w: Mapping[str, Any], ids: torch.Tensor, pos: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Token (and position) embeddings: ids, pos (B, T) -> (B, T, C)."""
        x = self._lookup(w["tok"], ids, dtype)  # (B, T, C_emb)
        if "proj_in.w" in w:
            x = self._linear(x, w, "proj_in")
        if "pos" in w:
            x = x + self._lookup(w["pos"], pos + self.opts.get("pos_offset", 0), dtype)
        return x.to(dtype)

    def rope(self, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Rotary (cos, sin), each (B, T, head_dim), for position ids (B, T); ``None`` without RoPE."""
        inv = self.opts.get("inv_freq")
        if inv is None:
            return None
        freqs = pos.float()[..., None] * inv.to(pos.device)  # (B, T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, hd)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def layer(self, w: Mapping[str, Any], x: torch.Tensor, ctx: StepContext, index: int,
              attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """One decoder layer on new tokens x (B, T, C); ``attend(q, k, v)`` -> (B, Hq, T, hd)."""
        B, T, _ = x.shape
        hd, hq, hkv = self.head_dim, self.n_heads, self.n_kv_heads

        def attention(h: torch.Tensor) -> torch.Tensor:
            if "qkv.w" in w:  # GPT-2 / flexspeed GPT: one fused projection
                q, k, v = self._linear(h, w, "qkv").split([hq * hd, hkv * hd, hkv * hd], dim=-1)
            else:
                q, k, v = self._linear(h, w, "q"), self._linear(h, w, "k"), self._linear(h, w, "v")
            q = q.view(B, T, hq, hd).transpose(1, 2)  # (B, Hq, T, hd)
            k = k.view(B, T, hkv, hd).transpose(1, 2)  # (B, Hkv, T, hd)
            v = v.view(B, T, hkv, hd).transpose(1, 2)
            if ctx.rope is not None:
                cos, sin = ctx.rope[0].unsqueeze(1), ctx.rope[1].unsqueeze(1)  # (B, 1, T, hd)
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            y = attend(q, k, v)  # (B, Hq, T, hd)
            return self._linear(y.transpose(1, 2).reshape(B, T, hq * hd), w, "o")  # (B, T, C)

        act = self.opts["act"]
        if self.opts.get("gated"):
            mlp = lambda h: self._linear(act(self._linear(h, w, "gate")).mul_(self._linear(h, w, "up")), w, "down")  # noqa: E731
        else:
            mlp = lambda h: self._linear(act(self._linear(h, w, "fc1")), w, "fc2")  # noqa: E731
        if self.opts.get("pre_norm", True):
            x = x + attention(self._norm(x, w, "ln1"))
            return x + mlp(self._norm(x, w, "ln2"))
        x = self._norm(x + attention(x), w, "ln1")  # OPT-350m style post-norm
        return self._norm(x + mlp(x), w, "ln2")

    def head(self, w: Mapping[str, Any], x: torch.Tensor) -> torch.Tensor:
        """Final norm (and projection) then the LM head: (B, T, C) -> (B, T, V)."""
        if "lnf.w" in w or "lnf.b" in w or self.opts.get("final_norm_no_affine"):
            x = self._norm(x, w, "lnf")
        if "proj_out.w" in w:
            x = self._linear(x, w, "proj_out")
        return self._linear(x, w, "lm")

    def scale(self, index: int) -> float:
        """Softmax scale of decoder layer ``index``."""
        s = self.opts.get("scale", 1.0 / math.sqrt(self.head_dim))
        return s / (index + 1) if self.opts.get("inverse_layer_scale") else s

    # ---------------------------------------------------------------- sizes

    def kv_bytes_per_token(self, element_size: int) -> int:
        """KV-cache bytes one token adds over all layers."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * element_size

    def decoder_params(self) -> int:
        """Parameters of one decoder layer."""
        return sum(math.prod(t.shape) for t in self.layers[1].tensors)


# ------------------------------------------------------------------------------ families

def _t(name: str, key: str, shape: tuple[int, ...], kind: str = "vector") -> TensorSpec:
    return TensorSpec(name, key, tuple(int(s) for s in shape), kind)


def _norm_specs(name: str, prefix: str, c: int, bias: bool = True, affine: bool = True) -> list[TensorSpec]:
    if not affine:
        return []
    out = [_t(name + ".w", prefix + ".weight", (c,))]
    return out + ([_t(name + ".b", prefix + ".bias", (c,))] if bias else [])


def _lin(name: str, prefix: str, out_f: int, in_f: int, bias: bool, conv1d: bool = False) -> list[TensorSpec]:
    shape = (in_f, out_f) if conv1d else (out_f, in_f)
    specs = [_t(name + ".w", prefix + ".weight", shape, "conv1d" if conv1d else "linear")]
    return specs + ([_t(name + ".b", prefix + ".bias", (out_f,))] if bias else [])


def _opt(cfg: Any) -> Arch:
    c, L = _get(cfg, "hidden_size", 768), _get(cfg, "num_hidden_layers", 12)
    heads, ffn, vocab = _get(cfg, "num_attention_heads", 12), _get(cfg, "ffn_dim", 3072), _get(cfg, "vocab_size", 50272)
    emb_dim, max_pos = _get(cfg, "word_embed_proj_dim", c), _get(cfg, "max_position_embeddings", 2048)
    bias, affine = bool(_get(cfg, "enable_bias", True)), bool(_get(cfg, "layer_norm_elementwise_affine", True))
    pre = bool(_get(cfg, "do_layer_norm_before", True))
    final_norm = pre and not _get(cfg, "_remove_final_layer_norm", False)
    tied = bool(_get(cfg, "tie_word_embeddings", True))
    d = "model.decoder"
    embed = [_t("tok", f"{d}.embed_tokens.weight", (vocab, emb_dim), "embedding"),
             _t("pos", f"{d}.embed_positions.weight", (max_pos + 2, c), "embedding")]
    if emb_dim != c:
        embed.append(_t("proj_in.w", f"{d}.project_in.weight", (c, emb_dim), "linear"))
    layers = [LayerSpec("embed", -1, tuple(embed))]
    for i in range(L):
        p = f"{d}.layers.{i}"
        specs = _norm_specs("ln1", f"{p}.self_attn_layer_norm", c, True, affine)
        for n, m in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj"), ("o", "out_proj")):
            specs += _lin(n, f"{p}.self_attn.{m}", c, c, bias)
        specs += _norm_specs("ln2", f"{p}.final_layer_norm", c, True, affine)
        specs += _lin("fc1", f"{p}.fc1", ffn, c, bias) + _lin("fc2", f"{p}.fc2", c, ffn, bias)
        layers.append(LayerSpec("decoder", i, tuple(specs)))
    head = _norm_specs("lnf", f"{d}.final_layer_norm", c, True, affine) if final_norm else []
    if emb_dim != c:
        head.append(_t("proj_out.w", f"{d}.project_out.weight", (emb_dim, c), "linear"))
    head.append(_t("lm.w", f"{d}.embed_tokens.weight" if tied else "lm_head.weight", (vocab, emb_dim), "linear"))
    layers.append(LayerSpec("head", L, tuple(head)))
    opts = dict(norm="layer", eps=1e-5, act=_act(_get(cfg, "activation_function", "relu"), "activation_function"),
                pre_norm=pre, pos_offset=2, final_norm_no_affine=final_norm and not affine)
    return Arch("opt", L, c, heads, heads, c // heads, vocab, max_pos, layers, _get(cfg, "eos_token_id", 2),
                _get(cfg, "pad_token_id", 1), opts)


def _inv_freq(cfg: Any, hd: int) -> torch.Tensor:
    params = dict(_get(cfg, "rope_parameters", None) or _get(cfg, "rope_scaling", None) or {})
    theta = float(params.get("rope_theta", _get(cfg, "rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default"))
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)  # (hd/2,)
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
        raise NotImplementedError(f"rope_parameters.rope_type={kind!r} is not supported by the offload runner; "
                                  "supported: default, linear, llama3")
    return inv.float()


def _llama(cfg: Any) -> Arch:
    c, L = _get(cfg, "hidden_size", 4096), _get(cfg, "num_hidden_layers", 32)
    heads = _get(cfg, "num_attention_heads", 32)
    kv, ffn = _get(cfg, "num_key_value_heads", heads), _get(cfg, "intermediate_size", 11008)
    vocab = _get(cfg, "vocab_size", 32000)
    hd = _get(cfg, "head_dim", c // heads)
    abias, mbias = bool(_get(cfg, "attention_bias", False)), bool(_get(cfg, "mlp_bias", False))
    tied = bool(_get(cfg, "tie_word_embeddings", False))
    layers = [LayerSpec("embed", -1, (_t("tok", "model.embed_tokens.weight", (vocab, c), "embedding"),))]
    for i in range(L):
        p = f"model.layers.{i}"
        specs = _norm_specs("ln1", f"{p}.input_layernorm", c, bias=False)
        a = f"{p}.self_attn"
        specs += _lin("q", f"{a}.q_proj", heads * hd, c, abias) + _lin("k", f"{a}.k_proj", kv * hd, c, abias)
        specs += _lin("v", f"{a}.v_proj", kv * hd, c, abias) + _lin("o", f"{a}.o_proj", c, heads * hd, abias)
        specs += _norm_specs("ln2", f"{p}.post_attention_layernorm", c, bias=False)
        specs += _lin("gate", f"{p}.mlp.gate_proj", ffn, c, mbias) + _lin("up", f"{p}.mlp.up_proj", ffn, c, mbias)
        specs += _lin("down", f"{p}.mlp.down_proj", c, ffn, mbias)
        layers.append(LayerSpec("decoder", i, tuple(specs)))
    head = [_t("lnf.w", "model.norm.weight", (c,)),
            _t("lm.w", "model.embed_tokens.weight" if tied else "lm_head.weight", (vocab, c), "linear")]
    layers.append(LayerSpec("head", L, tuple(head)))
    opts = dict(norm="rms", eps=float(_get(cfg, "rms_norm_eps", 1e-6)), gated=True, inv_freq=_inv_freq(cfg, hd),
                act=_act(_get(cfg, "hidden_act", "silu"), "hidden_act"), scale=hd ** -0.5)
    return Arch("llama", L, c, heads, kv, hd, vocab, None, layers, _get(cfg, "eos_token_id", 2),
                _get(cfg, "pad_token_id", None), opts)


def _gpt_like(cfg: Any, family: str) -> Arch:
    hf = family == "gpt2"
    c, L, heads = _get(cfg, "n_embd", 768), _get(cfg, "n_layer", 12), _get(cfg, "n_head", 12)
    vocab = _get(cfg, "vocab_size", 50257)
    max_pos = _get(cfg, "n_positions", 1024) if hf else _get(cfg, "block_size", 128)
    ffn = _get(cfg, "n_inner", 4 * c) if hf else 4 * c
    bias = True if hf else bool(_get(cfg, "bias", True))
    tied = bool(_get(cfg, "tie_word_embeddings", True)) if hf else bool(_get(cfg, "tie_weights", False))
    t = "transformer"
    layers = [LayerSpec("embed", -1, (_t("tok", f"{t}.wte.weight", (vocab, c), "embedding"),
                                      _t("pos", f"{t}.wpe.weight", (max_pos, c), "embedding")))]
    for i in range(L):
        p = f"{t}.h.{i}"
        specs = _norm_specs("ln1", f"{p}.ln_1", c, bias) + _lin("qkv", f"{p}.attn.c_attn", 3 * c, c, bias, hf)
        specs += _lin("o", f"{p}.attn.c_proj", c, c, bias, hf) + _norm_specs("ln2", f"{p}.ln_2", c, bias)
        specs += _lin("fc1", f"{p}.mlp.c_fc", ffn, c, bias, hf) + _lin("fc2", f"{p}.mlp.c_proj", c, ffn, bias, hf)
        layers.append(LayerSpec("decoder", i, tuple(specs)))
    head = _norm_specs("lnf", f"{t}.ln_f", c, bias)
    head.append(_t("lm.w", f"{t}.wte.weight" if tied else "lm_head.weight", (vocab, c), "linear"))
    layers.append(LayerSpec("head", L, tuple(head)))
    hd = c // heads
    if hf:
        if _get(cfg, "add_cross_attention", False):
            raise NotImplementedError("add_cross_attention=True (GPT-2 with cross-attention) is not supported by the "
                                      "offload runner; use a decoder-only GPT-2")
        opts = dict(norm="layer", eps=float(_get(cfg, "layer_norm_epsilon", 1e-5)),
                    act=_act(_get(cfg, "activation_function", "gelu_new"), "activation_function"),
                    conv1d=frozenset({"qkv", "o", "fc1", "fc2"}),
                    scale=(hd ** -0.5) if _get(cfg, "scale_attn_weights", True) else 1.0,
                    inverse_layer_scale=bool(_get(cfg, "scale_attn_by_inverse_layer_idx", False)))
        return Arch("gpt2", L, c, heads, heads, hd, vocab, max_pos, layers, _get(cfg, "eos_token_id", 50256),
                    _get(cfg, "pad_token_id", None), opts)
    opts = dict(norm="layer", eps=1e-5, act=_ACTS["gelu"])
    return Arch("gpt", L, c, heads, heads, hd, vocab, max_pos, layers, None, None, opts)


_FAMILIES: dict[str, Callable[[Any], Arch]] = {
    "opt": _opt, "llama": _llama, "gpt2": lambda c: _gpt_like(c, "gpt2"),
    "flexspeed_gpt": lambda c: _gpt_like(c, "gpt"), "flexspeed-gpt": lambda c: _gpt_like(c, "gpt"),
}


def arch_from_config(cfg: Any) -> Arch:
    """The :class:`Arch` of a config dict/object (``model_type`` opt, llama, gpt2 or flexspeed_gpt).

    Raises:
        ConfigError: the model type is not supported (key ``offload``).
    """
    kind = _get(cfg, "model_type", None)
    if kind is None and all(_get(cfg, k) is not None for k in ("n_layer", "n_head", "n_embd", "block_size")):
        kind = "flexspeed_gpt"  # a flexspeed GPTConfig
    if kind not in _FAMILIES:
        raise ConfigError(f"model_type={kind!r} is not supported by offloaded generation (supported: {SUPPORTED}); "
                          "drop offload=... to run the model in memory", key=_KEY)
    return _FAMILIES[kind](cfg)


def config_of_module(model: Any) -> Any:
    """The config an architecture is read from: a flexspeed GPT's ``GPTConfig`` (as a dict) or ``model.config``.

    Raises:
        ConfigError: the module has no recognisable config.
    """
    from flexspeed.models.gpt import GPT

    if isinstance(model, GPT):
        return {**model.config.to_dict(), "model_type": "flexspeed_gpt"}
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise ConfigError(f"{type(model).__name__} has no .config to read its architecture from; offloaded generation "
                          f"supports {SUPPORTED}", key=_KEY)
    return cfg
