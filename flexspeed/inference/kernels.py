"""Kernel injection: fused decoder layers over a preallocated KV cache, and the runner that drives them.

``inject_kernels(model)`` swaps every decoder block of a recognised model, in place, for a
:class:`FusedDecoderLayer`: one matmul for q, k and v (OPT's and Llama's three projections are
concatenated; GPT-2's ``Conv1D`` becomes an ``nn.Linear``), one for Llama's gate and up
projections, ``F.scaled_dot_product_attention`` (grouped-query attention included), and the
model's own norms and activations. Recognised: flexspeed's :class:`~flexspeed.models.gpt.GPT`,
HF ``GPT2LMHeadModel``, ``OPTForCausalLM`` and ``LlamaForCausalLM``.

A fused layer has two entry points:

- ``forward(...)`` takes the arguments the host model passes to its blocks (a bare hidden state
  for the GPT; HF's ``attention_mask``/``past_key_values``/``position_embeddings`` keywords),
  so the model's own ``forward`` and even HF's ``generate`` keep working, with the same logits.
- ``step(x, ctx, k_cache, v_cache)`` reads and writes one layer's slice of a :class:`KVCache`:
  static ``(B, H_kv, T_max, head_dim)`` buffers written in place, never concatenated.

The :class:`FusedRunner` (``get_runner(model)``; kept outside the module tree) owns the order
embeddings -> layers -> final norm -> ``lm_head`` and the cache, one layer at a time, so a later
pass can stream weights per layer. ``flexspeed.inference.generation.generate`` uses it.

Names are kept where tensor parallelism and quantization look for them: the row-parallel
projections stay at their original paths (``self_attn.o_proj``, ``mlp.c_proj``, ``fc2``, ...) and
every projection is called as a module, so TP hooks and ``QuantLinear`` swaps apply. Heads per
layer are read from the (possibly sharded) weight shapes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from flexspeed.config.errors import ConfigError
from flexspeed.inference.attention import StepContext, apply_rope, masked_decode_attention, static_attention
from flexspeed.inference.fused import FusedRunner, KVCache, _proj
from flexspeed.inference.packed import PackedLinear, can_pack

__all__ = ["inject_kernels", "get_runner", "build_runner", "supports_injection", "FusedDecoderLayer", "FusedRunner",
           "KVCache", "StepContext"]

_KEY = "replace_with_kernel_inject"
_SUPPORTED = "flexspeed GPT, HF GPT2LMHeadModel, OPTForCausalLM, LlamaForCausalLM"


class FusedDecoderLayer(nn.Module):
    """One decoder block with fused projections; subclasses name the parts as the host does.

    Attributes:
        n_heads, n_kv_heads: query and key/value heads of this rank (from the weight shapes).
        head_dim, scale: attention head size and softmax scale.
        pre_norm: norms before attention/MLP (GPT, Llama, most OPT) or after (OPT-350m).
        gated: MLP is ``down(act(gate) * up)`` with ``[gate | up]`` fused, else ``down(act(up))``.
        host: call convention of ``forward`` (``"gpt"``, ``"hf"``, ``"hf_gpt2"``).
        layer_idx: index of the layer (HF caches are indexed by it).
    """

    def __init__(self, *, head_dim: int, scale: float, act: Callable[[torch.Tensor], torch.Tensor],
                 pre_norm: bool = True, gated: bool = False, host: str = "hf", layer_idx: int = 0) -> None:
        super().__init__()
        self.head_dim, self.scale, self.act = head_dim, scale, act
        self.pre_norm, self.gated, self.host, self.layer_idx = pre_norm, gated, host, layer_idx

    def parts(self) -> tuple[nn.Module, nn.Module, nn.Module, nn.Module, nn.Module, nn.Module]:
        """(norm1, qkv, out, norm2, up, down), looked up on each call (quantization may swap them)."""
        raise NotImplementedError

    # -------------------------------------------------------------------- compute

    def _qkv(self, qkv: nn.Module, h: torch.Tensor, rope: tuple | None) -> tuple[torch.Tensor, ...]:
        B, T, _ = h.shape  # (B, T, C)
        hq, hkv = self.n_heads, self.n_kv_heads
        q, k, v = _proj(qkv, h).split([hq * self.head_dim, hkv * self.head_dim, hkv * self.head_dim], dim=-1)
        q = q.view(B, T, hq, self.head_dim).transpose(1, 2)  # (B, Hq, T, hd)
        k = k.view(B, T, hkv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(B, T, hkv, self.head_dim).transpose(1, 2)
        if rope is not None:
            cos, sin = rope[0].unsqueeze(1), rope[1].unsqueeze(1)  # (B, 1, T, hd)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                is_causal: bool, out: nn.Module, valid: torch.Tensor | None = None) -> torch.Tensor:
        if valid is not None:  # static-shape decode: compiled (Inductor fuses the elementwise form) or a graph
            attend = static_attention if torch.compiler.is_compiling() else masked_decode_attention
            y = attend(q, k, v, valid, self.scale)
        else:  # a cache kept in fp32 for a 16-bit model (see FusedRunner.cache_dtype): attend in fp32
            y = F.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=mask, is_causal=is_causal,
                                               scale=self.scale, enable_gqa=q.shape[1] != k.shape[1])
            y = y.to(q.dtype)  # (B, Hq, T, hd)
        B, _, T, _ = y.shape
        return _proj(out, y.transpose(1, 2).reshape(B, T, -1))  # (B, T, C)

    def _mlp(self, up: nn.Module, down: nn.Module, h: torch.Tensor) -> torch.Tensor:
        if self.gated:
            gate, val = _proj(up, h).chunk(2, dim=-1)  # 2 x (B, T, F)
            return _proj(down, self.act(gate) * val)
        return _proj(down, self.act(_proj(up, h)))

    def _block(self, x: torch.Tensor, attention: Callable[[nn.Module, nn.Module, torch.Tensor], torch.Tensor]
               ) -> torch.Tensor:
        norm1, qkv, out, norm2, up, down = self.parts()
        if self.pre_norm:
            x = x + attention(qkv, out, norm1(x))
            return x + self._mlp(up, down, norm2(x))
        x = norm1(x + attention(qkv, out, x))
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # OPT's post-norm MLP runs on (B*T, C)
        return norm2(x + self._mlp(up, down, x)).view(shape)

    def step(self, x: torch.Tensor, ctx: StepContext, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        """Run the block on new tokens ``x`` (B, T, C), writing their keys/values at ``ctx.start``."""
        end = ctx.start + x.shape[1]

        def attention(qkv: nn.Module, out: nn.Module, h: torch.Tensor) -> torch.Tensor:
            q, k, v = self._qkv(qkv, h, ctx.rope)
            k_cache[:, :, ctx.start:end] = k  # in place: the cache is never reallocated
            v_cache[:, :, ctx.start:end] = v
            return self._attend(q, k_cache[:, :, :end], v_cache[:, :, :end], ctx.mask, ctx.is_causal, out)

        return self._block(x, attention)

    def static_step(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, index: torch.Tensor,
                    valid: torch.Tensor, rope: tuple | None = None) -> torch.Tensor:
        """One new token per row (B, 1, C) with static shapes, for ``torch.compile``.

        The position ``index`` (a (1,) tensor) and the key mask ``valid`` (B, T_max) are tensors, so
        one compiled graph serves every step and every layer of the same shape.
        """
        def attention(qkv: nn.Module, out: nn.Module, h: torch.Tensor) -> torch.Tensor:
            q, k, v = self._qkv(qkv, h, rope)
            k_cache.index_copy_(2, index, k)  # in place
            v_cache.index_copy_(2, index, v)
            return self._attend(q, k_cache, v_cache, None, False, out, valid)

        return self._block(x, attention)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        """The host model's block call (see the class docstring); returns the new hidden state."""
        if self.host == "gpt":
            return self._block(hidden_states, lambda qkv, out, h: self._attend(
                *self._qkv(qkv, h, None), None, h.shape[1] > 1, out))
        if self.host == "hf_gpt2":  # GPT2Model passes these positionally
            kwargs.update(zip(("past_key_values", "attention_mask", "encoder_hidden_states"), args))
        if kwargs.get("encoder_hidden_states") is not None:
            raise ConfigError("cross-attention is not supported by the fused layers; "
                              f"set {_KEY}=False for encoder-decoder use", key=_KEY)
        # transformers 5.24 renamed the blocks' ``past_key_values`` argument ``cache``
        cache = kwargs.get("past_key_values", kwargs.get("cache"))
        mask = kwargs.get("attention_mask")
        rope = kwargs.get("position_embeddings")

        def attention(qkv: nn.Module, out: nn.Module, h: torch.Tensor) -> torch.Tensor:
            q, k, v = self._qkv(qkv, h, rope)
            if cache is not None:
                k, v = cache.update(k, v, self.layer_idx)
            return self._attend(q, k, v, mask, mask is None and q.shape[2] > 1, out)

        return self._block(hidden_states, attention)


def _container(**children: nn.Module) -> nn.Module:
    box = nn.Module()
    for name, child in children.items():
        box.add_module(name, child)
    return box


class _GPTLayer(FusedDecoderLayer):
    """flexspeed GPT and HF GPT-2: ``ln_1, attn.{c_attn, c_proj}, ln_2, mlp.{c_fc, c_proj}``."""

    def __init__(self, ln_1: nn.Module, c_attn: nn.Module, c_proj: nn.Module, ln_2: nn.Module, c_fc: nn.Module,
                 mlp_proj: nn.Module, **kw) -> None:
        super().__init__(**kw)
        self.ln_1, self.attn, self.ln_2 = ln_1, _container(c_attn=c_attn, c_proj=c_proj), ln_2
        self.mlp = _container(c_fc=c_fc, c_proj=mlp_proj)
        self.n_heads = self.n_kv_heads = _out_in(c_attn)[0] // 3 // self.head_dim

    def parts(self):
        return self.ln_1, self.attn.c_attn, self.attn.c_proj, self.ln_2, self.mlp.c_fc, self.mlp.c_proj


class _OPTLayer(FusedDecoderLayer):
    """OPT: ``self_attn_layer_norm, self_attn.{qkv, out_proj}, final_layer_norm, fc1, fc2``."""

    def __init__(self, norm1: nn.Module, qkv: nn.Module, out_proj: nn.Module, norm2: nn.Module, fc1: nn.Module,
                 fc2: nn.Module, **kw) -> None:
        super().__init__(**kw)
        self.self_attn_layer_norm, self.final_layer_norm = norm1, norm2
        self.self_attn = _container(qkv=qkv, out_proj=out_proj)
        self.fc1, self.fc2 = fc1, fc2
        self.n_heads = self.n_kv_heads = _out_in(qkv)[0] // 3 // self.head_dim

    def parts(self):
        a = self.self_attn
        return self.self_attn_layer_norm, a.qkv, a.out_proj, self.final_layer_norm, self.fc1, self.fc2


class _LlamaLayer(FusedDecoderLayer):
    """Llama: ``input_layernorm, self_attn.{qkv, o_proj}, post_attention_layernorm, mlp.{gate_up, down_proj}``."""

    def __init__(self, norm1: nn.Module, qkv: nn.Module, o_proj: nn.Module, norm2: nn.Module, gate_up: nn.Module,
                 down: nn.Module, n_heads: int, n_kv_heads: int, **kw) -> None:
        super().__init__(gated=True, **kw)
        self.input_layernorm, self.post_attention_layernorm = norm1, norm2
        self.self_attn = _container(qkv=qkv, o_proj=o_proj)
        self.mlp = _container(gate_up=gate_up, down_proj=down)
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads

    def parts(self):
        a, m = self.self_attn, self.mlp
        return self.input_layernorm, a.qkv, a.o_proj, self.post_attention_layernorm, m.gate_up, m.down_proj


# ------------------------------------------------------------------------------ weight fusion

def _as_linear(module: nn.Module) -> nn.Linear:
    """``nn.Linear`` as is; HF ``Conv1D`` (weight ``(in, out)``) converted to one."""
    if isinstance(module, nn.Linear):
        return module
    if type(module).__name__ == "Conv1D":
        w = module.weight.detach()  # (in, out)
        lin = nn.Linear(w.shape[0], w.shape[1], bias=module.bias is not None, dtype=w.dtype, device=w.device)
        with torch.no_grad():
            lin.weight.copy_(w.t())
            if module.bias is not None:
                lin.bias.copy_(module.bias.detach())
        lin.requires_grad_(module.weight.requires_grad)
        return lin
    raise ConfigError(f"found a {type(module).__name__} where an nn.Linear projection was expected; inject "
                      "kernels before quantizing (init_inference does) or set "
                      f"{_KEY}=False", key=_KEY)


class ConcatLinear(nn.Module):
    """Projections computed side by side over the *original* modules (no weight copy): the fused
    q/k/v (or gate/up) of a runner that shadows an un-injected model. The native decode kernel
    runs the parts as one product; torch's path concatenates their outputs."""

    def __init__(self, *parts: nn.Module) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)
        self.in_features = _out_in(parts[0])[1]
        self.out_features = sum(_out_in(m)[0] for m in parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([_proj(m, x) for m in self.parts], dim=-1)


def _out_in(mod: nn.Module) -> tuple[int, int]:
    """(out, in) features of a Linear-like module (HF ``Conv1D`` stores its weight (in, out))."""
    if type(mod).__name__ == "Conv1D":
        return mod.weight.shape[1], mod.weight.shape[0]
    if hasattr(mod, "out_features"):
        return mod.out_features, mod.in_features
    return mod.weight.shape[0], mod.weight.shape[1]


def _cat_linears(*mods: nn.Module) -> nn.Linear:
    """One ``nn.Linear`` computing the given projections side by side (outputs concatenated)."""
    lins = [_as_linear(m) for m in mods]
    w0 = lins[0].weight
    has_bias = any(m.bias is not None for m in lins)
    fused = nn.Linear(w0.shape[1], sum(m.weight.shape[0] for m in lins), bias=has_bias, dtype=w0.dtype,
                      device=w0.device)
    with torch.no_grad():
        torch.cat([m.weight for m in lins], out=fused.weight)
        if has_bias:
            torch.cat([m.bias if m.bias is not None else torch.zeros(m.weight.shape[0], dtype=w0.dtype,
                                                                     device=w0.device) for m in lins], out=fused.bias)
    fused.requires_grad_(w0.requires_grad)
    return fused


# ------------------------------------------------------------------------------ architectures

@dataclass
class _Arch:
    name: str
    layers_path: str
    embed: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
    final_paths: tuple[str, ...]
    build: Callable[[nn.Module, nn.Module, int], FusedDecoderLayer]
    rope: Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple] | None = None
    max_positions: int | None = None
    head_path: str = "lm_head"
    copies: bool = True
    """Building the fused layers copies weights (else they share the block's modules)."""
    tables: Callable[[nn.Module], tuple[nn.Module, nn.Module | None, int]] | None = None
    """(token table, learned position table or ``None``, position offset): what ``embed``
    computes, as lookups the native greedy loop repeats; ``None`` if it cannot."""


def _gpt_layer(model: nn.Module, block: nn.Module, idx: int) -> FusedDecoderLayer:
    hd = model.config.n_embd // model.config.n_head
    return _GPTLayer(block.ln_1, block.attn.c_attn, block.attn.c_proj, block.ln_2, block.mlp.c_fc,
                     block.mlp.c_proj, head_dim=hd, scale=1 / math.sqrt(hd), act=F.gelu, host="gpt", layer_idx=idx)


def _gpt2_layer(model: nn.Module, block: nn.Module, idx: int, shadow: bool = False) -> FusedDecoderLayer:
    if hasattr(block, "crossattention"):
        raise ConfigError("GPT-2 with cross-attention (add_cross_attention=True) is not supported by the "
                          f"fused layers; set {_KEY}=False", key=_KEY)
    cfg, attn = model.config, block.attn
    hd = cfg.n_embd // cfg.n_head
    scale = getattr(attn, "scaling", (1 / math.sqrt(hd) if cfg.scale_attn_weights else 1.0))
    lin = (lambda m: m) if shadow else _as_linear  # a shadow keeps the Conv1D modules (read transposed)
    return _GPTLayer(block.ln_1, lin(attn.c_attn), lin(attn.c_proj), block.ln_2,
                     lin(block.mlp.c_fc), lin(block.mlp.c_proj), head_dim=hd, scale=scale,
                     act=block.mlp.act, host="hf_gpt2", layer_idx=idx)


def _opt_layer(model: nn.Module, block: nn.Module, idx: int, shadow: bool = False) -> FusedDecoderLayer:
    a = block.self_attn
    hd = model.config.hidden_size // model.config.num_attention_heads
    cat = ConcatLinear if shadow else _cat_linears
    return _OPTLayer(block.self_attn_layer_norm, cat(a.q_proj, a.k_proj, a.v_proj), a.out_proj,
                     block.final_layer_norm, block.fc1, block.fc2, head_dim=hd, scale=a.scaling,
                     act=block.activation_fn, pre_norm=block.do_layer_norm_before, layer_idx=idx)


def _llama_layer(model: nn.Module, block: nn.Module, idx: int, shadow: bool = False) -> FusedDecoderLayer:
    a, m = block.self_attn, block.mlp
    hd = a.head_dim
    cat = ConcatLinear if shadow else _cat_linears
    return _LlamaLayer(block.input_layernorm, cat(a.q_proj, a.k_proj, a.v_proj), a.o_proj,
                       block.post_attention_layernorm, cat(m.gate_proj, m.up_proj), m.down_proj,
                       n_heads=a.q_proj.weight.shape[0] // hd, n_kv_heads=a.k_proj.weight.shape[0] // hd,
                       head_dim=hd, scale=a.scaling, act=m.act_fn, layer_idx=idx)


# module-level (not lambdas) so that an injected model still pickles
def _learned_pos_embed(model: nn.Module, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return model.transformer.wte(ids) + model.transformer.wpe(pos)  # (B, T, C)


def _learned_pos_tables(model: nn.Module) -> tuple[nn.Module, nn.Module, int]:
    return model.transformer.wte, model.transformer.wpe, 0


def _opt_tables(model: nn.Module) -> tuple[nn.Module, nn.Module, int]:
    from flexspeed.inference.native import Unsupported

    dec = model.model.decoder
    if dec.project_in is not None:
        raise Unsupported("OPT's project_in follows the token lookup")
    return dec.embed_tokens, dec.embed_positions, getattr(dec.embed_positions, "offset", 2)


def _llama_embed(model: nn.Module, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return model.model.embed_tokens(ids)  # (B, T, C)


def _llama_rope(model: nn.Module, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return model.model.rotary_emb(x, pos)  # 2 x (B, T, hd)


def _opt_embed(model: nn.Module, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    dec = model.model.decoder
    x = dec.embed_tokens(ids)  # (B, T, C_emb)
    if dec.project_in is not None:
        x = dec.project_in(x)
    table = dec.embed_positions
    return x + F.embedding(pos + getattr(table, "offset", 2), table.weight)  # (B, T, C)


def _detect(model: nn.Module) -> _Arch | None:
    from flexspeed.models.gpt import GPT

    if isinstance(model, GPT):
        return _Arch("gpt", "transformer.h", _learned_pos_embed,
                     ("transformer.ln_f",), _gpt_layer, max_positions=model.config.block_size, copies=False,
                     tables=_learned_pos_tables)
    kind = getattr(getattr(model, "config", None), "model_type", None)
    if not hasattr(model, "lm_head"):
        return None
    if kind == "gpt2":
        return _Arch("gpt2", "transformer.h", _learned_pos_embed,
                     ("transformer.ln_f",), _gpt2_layer, max_positions=model.config.n_positions,
                     tables=_learned_pos_tables)
    if kind == "opt":
        return _Arch("opt", "model.decoder.layers", _opt_embed,
                     ("model.decoder.final_layer_norm", "model.decoder.project_out"), _opt_layer,
                     max_positions=model.config.max_position_embeddings, tables=_opt_tables)
    if kind == "llama":
        return _Arch("llama", "model.layers", _llama_embed, ("model.norm",), _llama_layer, rope=_llama_rope,
                     tables=lambda m: (m.model.embed_tokens, None, 0))
    return None


def _set_child(root: nn.Module, path: str, new: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, name, new)


def _pack_head(model: nn.Module, path: str, pack_tied: bool) -> None:
    """Pack ``lm_head``; a head tied to an embedding gets its own packed copy only if ``pack_tied``.

    The packed layout cannot serve embedding lookups, so packing a tied head costs one more
    vocab x hidden matrix; ``quantize_linears`` re-ties them (see ``PackedLinear.tied_embedding``).
    """
    head = model.get_submodule(path)
    if type(head) is not nn.Linear or not can_pack(head.weight):
        return
    tied = next((n for n, m in model.named_modules() if isinstance(m, nn.Embedding) and m.weight is head.weight), None)
    if tied is not None and not pack_tied:
        return
    packed = PackedLinear(head)
    packed.tied_embedding = tied
    _set_child(model, path, packed)


def _pack_linears(layer: nn.Module) -> None:
    """Swap the plain ``nn.Linear`` projections of a fused layer for oneDNN-packed ones (CPU)."""
    for name, mod in list(layer.named_modules()):
        if type(mod) is nn.Linear and can_pack(mod.weight):
            _set_child(layer, name, PackedLinear(mod))


def supports_injection(model: nn.Module) -> bool:
    """``inject_kernels`` recognises ``model``'s architecture (flexspeed GPT, HF GPT-2, OPT, Llama)."""
    return _detect(model) is not None


def get_runner(model: nn.Module) -> FusedRunner | None:
    """The fused runner of a kernel-injected model (found, or built once from its fused blocks), or ``None``."""
    from flexspeed.inference.runners import remember, remembered

    runner = remembered(model)
    if isinstance(runner, FusedRunner):
        return runner
    runner = injected_runner(model)
    if runner is not None:
        remember(model, runner)
    return runner


def injected_runner(model: nn.Module) -> FusedRunner | None:
    """A new runner over ``model``'s blocks if they are fused layers (an injected model), else ``None``."""
    arch = _detect(model)
    if arch is None:
        return None
    blocks = model.get_submodule(arch.layers_path)
    if not len(blocks) or not all(isinstance(b, FusedDecoderLayer) for b in blocks):
        return None
    return FusedRunner(model, arch, None, None)


def shadow_runner(model: nn.Module) -> tuple[FusedRunner | None, str]:
    """A runner for an un-injected model over the model's own modules (nothing is copied), or
    ``(None, why not)``.

    flexspeed's GPT always gets one. HF GPT-2, OPT and Llama get a *shadow* runner when the native
    decode kernel is built and the model is on the CPU: q/k/v (and gate/up) stay separate
    modules read side by side (:class:`ConcatLinear`), GPT-2's ``Conv1D`` weights are read
    transposed, and single-token steps run natively; the model is not modified.
    """
    arch = _detect(model)
    if arch is None:
        return None, f"{type(model).__name__} is not a recognised family ({_SUPPORTED})"
    blocks = model.get_submodule(arch.layers_path)
    if not arch.copies:
        return FusedRunner(model, arch, [arch.build(model, b, i) for i, b in enumerate(blocks)]), ""
    from flexspeed.inference.native import library

    ref = next(iter(model.parameters()), None)
    if library() is None:
        return None, "the native decode kernel is not available"
    if ref is None or ref.device.type != "cpu" or not ref.is_floating_point():
        return None, "a shadow runner needs floating-point weights on the CPU"
    try:
        layers = [arch.build(model, b, i, shadow=True) for i, b in enumerate(blocks)]
    except (ConfigError, AttributeError, TypeError) as exc:
        return None, f"its blocks cannot be wrapped ({exc})"
    runner = FusedRunner(model, arch, layers, ref.dtype)
    reason = runner.native_reason()
    return (runner, "") if reason is None else (None, f"the native kernel cannot run it ({reason})")


def build_runner(model: nn.Module) -> FusedRunner | None:
    """:func:`shadow_runner` without the reason (``None`` when there is none)."""
    return shadow_runner(model)[0]


def inject_kernels(module: nn.Module, dtype: torch.dtype | None = None, *, compile_decode: bool = False,
                   pack_tied_head: bool = True, native: bool = True) -> nn.Module:
    """Swap the decoder blocks of ``module`` for fused ones, in place, and attach a runner.

    Args:
        module: flexspeed ``GPT``, HF ``GPT2LMHeadModel``, ``OPTForCausalLM`` or ``LlamaForCausalLM``
            (possibly tensor-parallel sharded; not yet quantized). Injecting twice is a no-op.
        dtype: compute dtype; the model is cast to it if its weights differ.
        compile_decode: run single-token steps through ``torch.compile`` (off by default: the first
            step compiles for a few seconds to a minute; also settable as
            ``get_runner(model).compile_decode``).
        pack_tied_head: give an ``lm_head`` tied to the input embedding (GPT-2, OPT) its own
            oneDNN-packed copy: the head's product runs 1.6-1.7x faster (bf16, 1 and 16 rows) for one
            more vocab x hidden matrix in memory (77 MB for OPT-125M in bf16), which weight
            quantization gives back by re-tying them. Only when the native kernel is off.
        native: run single-token steps through the native C kernel when it is available (see
            :mod:`flexspeed.inference.native`); its weights stay plain. ``False`` keeps decoding on
            torch's kernels, with oneDNN-packed weights.
    Returns:
        ``module``, whose ``forward`` gives the same logits as before and whose
        :func:`get_runner` drives the preallocated KV cache.
    Raises:
        ConfigError: the architecture is not recognised (key ``replace_with_kernel_inject``).
    """
    if get_runner(module) is not None:
        return module
    arch = _detect(module)
    if arch is None:
        raise ConfigError(f"replace_with_kernel_inject=True but {type(module).__name__} is not a recognised "
                          f"architecture (supported: {_SUPPORTED}); set replace_with_kernel_inject=False to run "
                          "the model's own blocks", key=_KEY)
    current = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    if dtype is not None and current is not None and current != dtype:
        module.to(dtype)
    blocks = module.get_submodule(arch.layers_path)
    runner = FusedRunner(module, arch, None, dtype, compile_decode, native_decode=native)
    # the native kernel reads plain weights; oneDNN packing serves the torch path only
    pack = not (native and runner.native_available())
    with torch.no_grad():
        for i in range(len(blocks)):
            fused = arch.build(module, blocks[i], i)
            fused.train(blocks[i].training)
            if pack:
                _pack_linears(fused)
            blocks[i] = fused  # the old block (and its unfused weights) is released here
        if pack:
            _pack_head(module, arch.head_path, pack_tied_head)
    from flexspeed.inference.runners import remember

    remember(module, runner)  # flexspeed's weak table: nothing is written onto the model
    return module
