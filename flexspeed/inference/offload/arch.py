"""Decoder architectures as data plus a functional per-layer forward, for the offload runner.

The fused modules of ``kernels.py`` own their weights (q, k and v concatenated into a new
tensor when they are built). The offload runner instead computes on weights that live in a
store: views of the checkpoint file, read buffers, int4-packed matrices. So each architecture
here is described by (1) the checkpoint tensors of its embedding, of each decoder layer and of
its head, in placement order, and (2) three functions that compute on a dict of those tensors:

- ``embed(w, ids, pos) -> x``            ids, pos: (B, T) -> (B, T, C)
- ``layer(w, x, ctx, attend) -> x``      (B, T, C) -> (B, T, C); ``attend(q, k, v)`` owns the KV cache
- ``head(w, x) -> logits``               (B, T, C) -> (B, T, V)

Supported: every family of :mod:`flexspeed.inference.families` (flexspeed GPT, HF GPT-2 with
``Conv1D`` weights, OPT pre- and post-norm with ``project_in/out``, Llama, Mistral, Qwen2, Phi-3,
Gemma, GPT-NeoX; GQA, RoPE default/linear/llama3 scaling, partial rotary, parallel residual).
The registry reads the config (a ``config.json`` dict or a config object, with each family's
defaults) and names the tensors by role; this module turns the roles into checkpoint keys.
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
from flexspeed.inference.families import SUPPORTED, Dims, Family, config_of_model, family_for_config, inv_freq

__all__ = ["TensorSpec", "LayerSpec", "Arch", "arch_from_config", "config_of_module", "SUPPORTED"]

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
    stored_as: tuple[str, ...] = ()
    """Other keys the tensor has in checkpoint files (GPT-NeoX saves ``lm_head`` as ``embed_out``)."""

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
        if self.opts["norm"] == "rms1p":  # Gemma: (1 + w) * x, all in fp32
            h = x.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.opts["eps"])
            return (h * (1.0 + weight.float())).to(x.dtype)
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
        if self.opts.get("embed_scale") is not None:  # Gemma: sqrt(hidden), rounded to the table's dtype
            x = x * torch.tensor(self.opts["embed_scale"], dtype=x.dtype)
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
        freqs = pos.float()[..., None] * inv.to(pos.device)  # (B, T, rotary_dim/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (B, T, rotary_dim)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def layer(self, w: Mapping[str, Any], x: torch.Tensor, ctx: StepContext, index: int,
              attend: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """One decoder layer on new tokens x (B, T, C); ``attend(q, k, v)`` -> (B, Hq, T, hd)."""
        B, T, _ = x.shape
        hd, hq, hkv = self.head_dim, self.n_heads, self.n_kv_heads

        def attention(h: torch.Tensor) -> torch.Tensor:
            if self.opts.get("qkv_heads"):  # GPT-NeoX: rows [q_h k_h v_h] per head
                q, k, v = self._linear(h, w, "qkv").view(B, T, hq, 3 * hd).chunk(3, dim=-1)
            elif "qkv.w" in w:  # GPT-2 / flexspeed GPT / Phi-3: one fused projection [q | k | v]
                q, k, v = self._linear(h, w, "qkv").split([hq * hd, hkv * hd, hkv * hd], dim=-1)
            else:
                q, k, v = self._linear(h, w, "q"), self._linear(h, w, "k"), self._linear(h, w, "v")
            q = q.reshape(B, T, hq, hd).transpose(1, 2)  # (B, Hq, T, hd)
            k = k.reshape(B, T, hkv, hd).transpose(1, 2)  # (B, Hkv, T, hd)
            v = v.reshape(B, T, hkv, hd).transpose(1, 2)
            if ctx.rope is not None:
                cos, sin = ctx.rope[0].unsqueeze(1), ctx.rope[1].unsqueeze(1)  # (B, 1, T, rotary_dim)
                rd = cos.shape[-1]
                if rd == hd:
                    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
                else:  # partial rotary: the leading rd dims of each head
                    q = torch.cat((apply_rope(q[..., :rd], cos, sin), q[..., rd:]), dim=-1)
                    k = torch.cat((apply_rope(k[..., :rd], cos, sin), k[..., rd:]), dim=-1)
            y = attend(q, k, v)  # (B, Hq, T, hd)
            return self._linear(y.transpose(1, 2).reshape(B, T, hq * hd), w, "o")  # (B, T, C)

        act = self.opts["act"]
        if "gate_up.w" in w:  # Phi-3: one [gate | up] projection
            def mlp(h: torch.Tensor) -> torch.Tensor:
                gate, up = self._linear(h, w, "gate_up").chunk(2, dim=-1)
                return self._linear(act(gate.contiguous()).mul_(up), w, "down")
        elif self.opts.get("gated"):
            mlp = lambda h: self._linear(act(self._linear(h, w, "gate")).mul_(self._linear(h, w, "up")), w, "down")  # noqa: E731
        else:
            mlp = lambda h: self._linear(act(self._linear(h, w, "fc1")), w, "fc2")  # noqa: E731
        if self.opts.get("parallel"):  # GPT-NeoX: both branches read the layer's input
            return x + attention(self._norm(x, w, "ln1")) + mlp(self._norm(x, w, "ln2"))
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


def _arch(fam: Family, dims: Dims) -> Arch:
    """The offload form of a registry family: its tensors by role, as checkpoint keys, in placement order."""
    c, L, hd, hq, hkv = dims.hidden, dims.n_layers, dims.head_dim, dims.n_heads, dims.n_kv_heads
    emb, conv = dims.emb_dim or c, fam.conv1d
    roles = fam.block
    embed = [_t("tok", f"{fam.embed['tok']}.weight", (dims.vocab, emb), "embedding")]
    if "pos" in fam.embed:
        embed.append(_t("pos", f"{fam.embed['pos']}.weight", (dims.max_positions + dims.pos_offset, c), "embedding"))
    if dims.emb_dim:
        embed.append(_t("proj_in.w", f"{fam.embed['proj_in']}.weight", (c, emb), "linear"))
    layers = [LayerSpec("embed", -1, tuple(embed))]
    for i in range(L):
        p = f"{fam.layers}.{i}"
        specs = _norm_specs("ln1", f"{p}.{roles['norm1']}", c, dims.norm_bias, dims.norm_affine)
        if "qkv" in roles:
            specs += _lin("qkv", f"{p}.{roles['qkv']}", (hq + 2 * hkv) * hd, c, dims.qkv_bias, conv)
        else:
            specs += _lin("q", f"{p}.{roles['q']}", hq * hd, c, dims.qkv_bias)
            specs += _lin("k", f"{p}.{roles['k']}", hkv * hd, c, dims.qkv_bias)
            specs += _lin("v", f"{p}.{roles['v']}", hkv * hd, c, dims.qkv_bias)
        specs += _lin("o", f"{p}.{roles['o']}", c, hq * hd, dims.o_bias, conv)
        specs += _norm_specs("ln2", f"{p}.{roles['norm2']}", c, dims.norm_bias, dims.norm_affine)
        if "gate_up" in roles:
            specs += _lin("gate_up", f"{p}.{roles['gate_up']}", 2 * dims.ffn, c, dims.mlp_bias)
        elif dims.gated:
            specs += _lin("gate", f"{p}.{roles['gate']}", dims.ffn, c, dims.mlp_bias)
            specs += _lin("up", f"{p}.{roles['up']}", dims.ffn, c, dims.mlp_bias)
        else:
            specs += _lin("fc1", f"{p}.{roles['up']}", dims.ffn, c, dims.mlp_bias, conv)
        specs += _lin("fc2" if not dims.gated else "down", f"{p}.{roles['down']}", c, dims.ffn, dims.mlp_bias, conv)
        layers.append(LayerSpec("decoder", i, tuple(specs)))
    head = []
    if dims.final_norm:
        head += _norm_specs("lnf", f"{fam.final['norm']}", c, dims.norm_bias, dims.norm_affine)
    if dims.emb_dim:
        head.append(_t("proj_out.w", f"{fam.final['proj_out']}.weight", (emb, c), "linear"))
    lm = f"{fam.embed['tok']}.weight" if dims.tied else f"{fam.head}.weight"
    alias = fam.stored_names.get(lm.rpartition(".")[0])
    head.append(TensorSpec("lm.w", lm, (dims.vocab, emb), "linear", (f"{alias}.weight",) if alias else ()))
    layers.append(LayerSpec("head", L, tuple(head)))
    opts: dict[str, Any] = dict(norm=dims.norm, eps=dims.eps, act=_act(dims.act, "hidden_act"), pre_norm=dims.pre_norm,
                                pos_offset=dims.pos_offset, gated=dims.gated, parallel=dims.parallel_residual,
                                scale=dims.scale or hd ** -0.5, inverse_layer_scale=dims.inverse_layer_scale,
                                final_norm_no_affine=dims.final_norm and not dims.norm_affine,
                                qkv_heads=fam.qkv_layout == "heads", embed_scale=dims.embed_scale)
    if conv:
        opts["conv1d"] = frozenset({"qkv", "o", "fc1", "fc2"})
    if dims.rotary_dim:
        opts["inv_freq"] = inv_freq(dims)
    # the offload runner attends over every cached key: a sliding-window model is capped at its window
    limit = min((w for w in dims.windows if w is not None), default=dims.max_positions)
    return Arch(fam.name, L, c, hq, hkv, hd, dims.vocab, limit, layers, dims.eos_token_id,
                dims.pad_token_id, opts)


def arch_from_config(cfg: Any) -> Arch:
    """The :class:`Arch` of a config dict/object (any ``model_type`` of :mod:`flexspeed.inference.families`).

    Raises:
        ConfigError: the model type is not supported (key ``offload``).
    """
    found = family_for_config(cfg)
    if found is None:
        raise ConfigError(f"model_type={_get(cfg, 'model_type', None)!r} is not supported by offloaded generation "
                          f"(supported: {SUPPORTED}); drop offload=... to run the model in memory", key=_KEY)
    return _arch(*found)


def config_of_module(model: Any) -> Any:
    """The config an architecture is read from: a flexspeed GPT's ``GPTConfig`` (as a dict) or ``model.config``.

    Raises:
        ConfigError: the module has no recognisable config.
    """
    cfg = config_of_model(model)
    if cfg is None:
        raise ConfigError(f"{type(model).__name__} has no .config to read its architecture from; offloaded generation "
                          f"supports {SUPPORTED}", key=_KEY)
    return cfg
