"""Kernel injection: fused decoder layers over a preallocated KV cache, and the runner that drives them.

``inject_kernels(model)`` swaps every decoder block of a recognised model, in place, for a
:class:`FusedDecoderLayer`: one matmul for q, k and v (separate projections are concatenated;
GPT-2's ``Conv1D`` becomes an ``nn.Linear``; GPT-NeoX's per-head rows are reordered), one for a
gated MLP's gate and up projections, ``F.scaled_dot_product_attention`` (grouped-query attention
included), and the model's own norms and activations. Recognised: every family of
:mod:`flexspeed.inference.families` (flexspeed's GPT, HF GPT-2, OPT, Llama, Mistral, Qwen2,
Phi-3, Gemma, GPT-NeoX); the registry says where each part lives, :class:`ModelArch` builds the
fused block from it.

A fused layer has two entry points:

- ``forward(...)`` takes the arguments the host model passes to its blocks (a bare hidden state
  for the GPT; HF's ``attention_mask``/``past_key_values``/``position_embeddings`` keywords),
  so the model's own ``forward`` and even HF's ``generate`` keep working, with the same logits.
- ``step(x, ctx, k_cache, v_cache)`` reads and writes one layer's slice of a :class:`KVCache`:
  static ``(B, H_kv, T_max, head_dim)`` buffers written in place, never concatenated.

The :class:`FusedRunner` (``get_runner(model)``; never stored on the model) owns the order
embeddings -> layers -> final norm -> ``lm_head`` and the cache, one layer at a time, so a later
pass can stream weights per layer. ``flexspeed.inference.generation.generate`` uses it.

Names are kept where tensor parallelism and quantization look for them: the row-parallel
projections stay at their original paths (``self_attn.o_proj``, ``mlp.c_proj``, ``fc2``, ...) and
every projection is called as a module, so TP hooks and ``QuantLinear`` swaps apply. Heads per
layer are read from the (possibly sharded) weight shapes.
"""

from __future__ import annotations

from collections.abc import Callable
import functools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from flexspeed.config.errors import ConfigError
from flexspeed.inference.attention import StepContext, apply_rope, decode_attention, static_attention
from flexspeed.inference.families import SUPPORTED as _FAMILIES_SUPPORTED
from flexspeed.inference.families import Dims, Family, family_for_model
from flexspeed.inference.fused import FusedRunner, KVCache
from flexspeed.inference.fused import project as _proj
from flexspeed.inference.packed import PackedLinear, can_pack

__all__ = ["inject_kernels", "get_runner", "build_runner", "supports_injection", "FusedDecoderLayer", "FusedRunner",
           "KVCache", "StepContext"]

_KEY = "replace_with_kernel_inject"
_SUPPORTED = _FAMILIES_SUPPORTED


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
        self.parallel = False

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
            cos, sin = rope[0].unsqueeze(1), rope[1].unsqueeze(1)  # (B, 1, T, rotary_dim)
            rd = cos.shape[-1]
            if rd == self.head_dim:
                q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            else:  # partial rotary (GPT-NeoX, some Phi-3): the leading rd dims of each head turn
                q = torch.cat((apply_rope(q[..., :rd], cos, sin), q[..., rd:]), dim=-1)
                k = torch.cat((apply_rope(k[..., :rd], cos, sin), k[..., rd:]), dim=-1)
        return q, k, v

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                is_causal: bool, out: nn.Module, valid: torch.Tensor | None = None) -> torch.Tensor:
        if valid is not None:  # static-shape decode: compiled (Inductor fuses the elementwise form) or a graph
            attend = static_attention if torch.compiler.is_compiling() else decode_attention
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
        if self.parallel:  # GPT-NeoX: both branches read the block's input
            return x + attention(qkv, out, norm1(x)) + self._mlp(up, down, norm2(x))
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
        cache = kwargs.get("past_key_values", kwargs.get("cache", kwargs.get("layer_past")))
        mask = kwargs.get("attention_mask")
        rope = kwargs.get("position_embeddings")

        def attention(qkv: nn.Module, out: nn.Module, h: torch.Tensor) -> torch.Tensor:
            q, k, v = self._qkv(qkv, h, rope)
            if cache is not None:
                k, v = cache.update(k, v, self.layer_idx)
            return self._attend(q, k, v, mask, mask is None and q.shape[2] > 1, out)

        return self._block(hidden_states, attention)


def _place(root: nn.Module, path: str, module: nn.Module) -> tuple[nn.Module, str]:
    """Put ``module`` at ``path`` under ``root`` (plain containers made on the way); (its parent, its name)."""
    parent = root
    *heads, leaf = path.split(".")
    for part in heads:
        if part not in parent._modules:
            parent.add_module(part, nn.Module())
        parent = parent._modules[part]
    parent.add_module(leaf, module)
    return parent, leaf


class FamilyLayer(FusedDecoderLayer):
    """A fused block of any :mod:`~flexspeed.inference.families` family, its parts kept at the host's names.

    Row-parallel projections (``self_attn.o_proj``, ``mlp.c_proj``, ``fc2``, ``attention.dense``,
    ...) stay at their original paths, so tensor parallelism and quantization find them; the
    fused q/k/v sits next to where ``q_proj`` was (``self_attn.qkv``) or at the family's own fused
    name (``attn.c_attn``, ``self_attn.qkv_proj``), the fused gate/up at ``mlp.gate_up``.
    """

    def __init__(self, parts: dict[str, tuple[str, nn.Module]], *, n_heads: int, n_kv_heads: int,
                 parallel: bool = False, **kw) -> None:
        super().__init__(**kw)
        self.n_heads, self.n_kv_heads, self.parallel = n_heads, n_kv_heads, parallel
        self._slots = [_place(self, *parts[role]) for role in ("norm1", "qkv", "out", "norm2", "up", "down")]

    def parts(self):
        return tuple(parent._modules[name] for parent, name in self._slots)


def _blank_linear(in_features: int, out_features: int, bias: bool, like: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` whose weights the caller fills: not initialised, so building it neither
    spends time nor draws from the user's global RNG (a seeded ``generate`` after injection must
    sample what it would have sampled without it)."""
    return nn.utils.skip_init(nn.Linear, in_features, out_features, bias=bias, dtype=like.dtype, device=like.device)


def _as_linear(module: nn.Module) -> nn.Linear:
    """``nn.Linear`` as is; HF ``Conv1D`` (weight ``(in, out)``) converted to one."""
    if isinstance(module, nn.Linear):
        return module
    if type(module).__name__ == "Conv1D":
        w = module.weight.detach()  # (in, out)
        lin = _blank_linear(w.shape[0], w.shape[1], module.bias is not None, w)
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
    fused = _blank_linear(w0.shape[1], sum(m.weight.shape[0] for m in lins), has_bias, w0)
    with torch.no_grad():
        torch.cat([m.weight for m in lins], out=fused.weight)
        if has_bias:
            torch.cat([m.bias if m.bias is not None else torch.zeros(m.weight.shape[0], dtype=w0.dtype,
                                                                     device=w0.device) for m in lins], out=fused.bias)
    fused.requires_grad_(w0.requires_grad)
    return fused


# ------------------------------------------------------------------------------ architectures

def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        return functools.partial(F.gelu, approximate="tanh")
    table = {"gelu": F.gelu, "relu": F.relu, "silu": F.silu, "swish": F.silu}
    if name not in table:
        raise ConfigError(f"activation {name!r} has no fused form; set {_KEY}=False", key=_KEY)
    return table[name]


def _attr_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _heads_first_qkv(lin: nn.Linear, heads: int) -> nn.Linear:
    """A fused projection whose rows are ``[q_h k_h v_h]`` per head (GPT-NeoX) reordered to ``[q | k | v]``."""
    w = lin.weight.detach()
    out = _blank_linear(w.shape[1], w.shape[0], lin.bias is not None, w)
    with torch.no_grad():
        out.weight.copy_(w.view(heads, 3, -1, w.shape[1]).transpose(0, 1).reshape(w.shape))
        if lin.bias is not None:
            out.bias.copy_(lin.bias.detach().view(heads, 3, -1).transpose(0, 1).reshape(-1))
    out.requires_grad_(lin.weight.requires_grad)
    return out


@dataclass
class ModelArch:
    """A :class:`~flexspeed.inference.families.Family` bound to the fused runner: where the runner
    finds the blocks, embeddings, final norm and head, and how it builds a fused block.

    ``rope`` and ``tables`` are ``None`` where the family has no rotary table, or where its
    embedding is not a plain lookup the native greedy loop can repeat.
    """

    family: Family
    dims: Dims
    rope: Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple] | None = field(default=None, init=False)
    tables: Callable[[nn.Module], tuple[nn.Module, nn.Module | None, int]] | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.family.rotary is not None:
            self.rope = self._rope
        if self.dims.embed_scale is None:
            self.tables = self._tables

    @property
    def name(self) -> str:
        return self.family.name

    @property
    def layers_path(self) -> str:
        return self.family.layers

    @property
    def head_path(self) -> str:
        return self.family.head

    @property
    def final_paths(self) -> tuple[str, ...]:
        return tuple(self.family.final[r] for r in ("norm", "proj_out") if r in self.family.final)

    @property
    def max_positions(self) -> int | None:
        return self.dims.max_positions

    @property
    def copies(self) -> bool:
        """Building the fused layers copies weights (flexspeed's GPT: its fused layers share the block's)."""
        return self.family.host != "gpt"

    def native_blocker(self) -> str | None:
        return self.family.native_blocker(self.dims)

    def _optional(self, root: nn.Module, role: str) -> nn.Module | None:
        path = self.family.embed.get(role)
        if path is None:
            return None
        try:
            return root.get_submodule(path)
        except AttributeError:  # declared by the family, absent (None) in this model
            return None

    def embed(self, root: nn.Module, ids: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Token (and learned position) embeddings (B, T) -> (B, T, C), as the host model computes them."""
        x = root.get_submodule(self.family.embed["tok"])(ids)  # (B, T, C_emb)
        proj_in = self._optional(root, "proj_in")
        if proj_in is not None:
            x = proj_in(x)
        table = self._optional(root, "pos")
        if table is not None:
            x = x + F.embedding(pos + self.dims.pos_offset, table.weight)
        return x  # (B, T, C)

    def _rope(self, root: nn.Module, x: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return root.get_submodule(self.family.rotary)(x, pos)  # 2 x (B, T, rotary_dim)

    def _tables(self, root: nn.Module) -> tuple[nn.Module, nn.Module | None, int]:
        from flexspeed.inference.native import Unsupported

        if self._optional(root, "proj_in") is not None:
            raise Unsupported(f"{self.name}'s project_in follows the token lookup")
        return root.get_submodule(self.family.embed["tok"]), self._optional(root, "pos"), self.dims.pos_offset

    def build(self, root: nn.Module, block: nn.Module, idx: int, shadow: bool = False) -> FusedDecoderLayer:
        """The fused form of decoder block ``idx``: weights copied into fused projections, or with
        ``shadow`` the block's own modules read side by side (nothing copied, nothing changed)."""
        fam, dims, roles = self.family, self.dims, self.family.block
        mod = block.get_submodule
        hd = dims.head_dim
        if shadow or not self.copies:
            lin, cat = (lambda m: m), ConcatLinear
        else:
            lin, cat = _as_linear, _cat_linears
        if "qkv" in roles:
            qkv = lin(mod(roles["qkv"]))
            if fam.qkv_layout == "heads":
                if shadow:
                    raise ConfigError(f"{fam.name}'s per-head q/k/v rows cannot be read without reordering them; "
                                      f"inject kernels ({_KEY}=True)", key=_KEY)
                qkv = _heads_first_qkv(qkv, _out_in(qkv)[0] // (3 * hd))
            per_kv = _out_in(qkv)[0] // hd // (dims.n_heads // dims.n_kv_heads + 2)  # (g + 2) rows of heads per kv head
            hq, hkv = per_kv * dims.n_heads // dims.n_kv_heads, per_kv
        else:
            q, k, v = (mod(roles[r]) for r in ("q", "k", "v"))
            hq, hkv = _out_in(q)[0] // hd, _out_in(k)[0] // hd
            qkv = cat(q, k, v)
        if "gate_up" in roles:
            up = lin(mod(roles["gate_up"]))
        elif "gate" in roles:
            up = cat(mod(roles["gate"]), mod(roles["up"]))
        else:
            up = lin(mod(roles["up"]))
        act = _attr_path(block, roles["act"]) if "act" in roles else _activation(dims.act)
        parts = {"norm1": (roles["norm1"], mod(roles["norm1"])), "qkv": (fam.qkv_path(), qkv),
                 "out": (roles["o"], lin(mod(roles["o"]))), "norm2": (roles["norm2"], mod(roles["norm2"])),
                 "up": (fam.up_path(), up), "down": (roles["down"], lin(mod(roles["down"])))}
        return FamilyLayer(parts, n_heads=hq, n_kv_heads=hkv, parallel=dims.parallel_residual, head_dim=hd,
                           scale=dims.layer_scale(idx), act=act, pre_norm=dims.pre_norm, gated=dims.gated,
                           host=fam.host, layer_idx=idx)


def _detect(model: nn.Module) -> ModelArch | None:
    try:
        found = family_for_model(model)
    except ConfigError:  # a recognised family in a form flexspeed does not fuse (inject_kernels says which)
        return None
    if found is None:
        return None
    return ModelArch(*found)


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
    """``inject_kernels`` recognises ``model``'s family (see :mod:`flexspeed.inference.families`)."""
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
        runner = FusedRunner(model, arch, [arch.build(model, b, i) for i, b in enumerate(blocks)])
        runner.shadow()
        return runner, ""
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
    runner.shadow()
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
        native: let single-token steps run on the native C kernel when it is available (see
            :mod:`flexspeed.inference.native`); its weights stay plain, and the runner measures both
            paths and runs the faster (``decode_path="auto"``). ``False`` pins decoding to torch's
            kernels, with oneDNN-packed weights.
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
        family_for_model(module)  # raises the family's own reason, if it has one
        raise ConfigError(f"replace_with_kernel_inject=True but {type(module).__name__} is not a recognised "
                          f"architecture (supported: {_SUPPORTED}); set replace_with_kernel_inject=False to run "
                          "the model's own blocks", key=_KEY)
    current = next((p.dtype for p in module.parameters() if p.is_floating_point()), None)
    if dtype is not None and current is not None and current != dtype:
        module.to(dtype)
    blocks = module.get_submodule(arch.layers_path)
    runner = FusedRunner(module, arch, None, dtype, compile_decode, decode_path="auto" if native else "torch")
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
