"""Kernel injection: fused layers give the unmodified model's logits (fp32, atol 1e-5) for the
flexspeed GPT, HF GPT-2, OPT (pre- and post-norm) and Llama (GQA, RoPE); the static KV cache
gives the same logits step by step as a full forward; names that TP and quantization rely on are kept.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from flexspeed.config.errors import ConfigError
from flexspeed.inference.kernels import FusedDecoderLayer, get_runner, inject_kernels
from flexspeed.inference.packed import PackedLinear
from flexspeed.models.gpt import GPT

tf = pytest.importorskip("transformers")
tf.utils.logging.set_verbosity_error()

V = 97
NAMES = ("gpt", "gpt2", "opt", "opt_postln", "llama")


def build(name: str) -> nn.Module:
    """A tiny random model; init std 0.2 so logits are far from flat."""
    torch.manual_seed(0)
    if name == "gpt":
        return GPT(n_layer=2, n_embd=64, n_head=4, vocab_size=V, block_size=64).eval()
    if name == "gpt2":
        cfg = tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=V, n_positions=64, bos_token_id=1,
                            eos_token_id=2, initializer_range=0.2)
        return tf.GPT2LMHeadModel(cfg).eval()
    if name in ("opt", "opt_postln"):
        post = name == "opt_postln"
        cfg = tf.OPTConfig(num_hidden_layers=2, hidden_size=64, ffn_dim=128, num_attention_heads=4, vocab_size=V,
                           max_position_embeddings=64, word_embed_proj_dim=32 if post else 64,
                           do_layer_norm_before=not post, init_std=0.2)
        return tf.OPTForCausalLM(cfg).eval()
    cfg = tf.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=V, initializer_range=0.2)
    return tf.LlamaForCausalLM(cfg).eval()


def logits(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    out = model(ids) if mask is None else model(ids, attention_mask=mask)
    return out if isinstance(out, torch.Tensor) else out.logits


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, V, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :1] = 0
    return ids.masked_fill(mask == 0, 1), mask


@pytest.mark.parametrize("name", NAMES)
def test_injected_forward_matches_reference(name: str) -> None:
    ref_model = build(name)
    model = inject_kernels(copy.deepcopy(ref_model))
    layers = model.transformer.h if name.startswith("gpt") else (
        model.model.decoder.layers if name.startswith("opt") else model.model.layers)
    assert all(isinstance(layer, FusedDecoderLayer) for layer in layers)
    ids, mask = padded_batch()
    with torch.no_grad():
        if name == "gpt":  # no mask argument: full rows only
            torch.testing.assert_close(logits(model, ids), logits(ref_model, ids), rtol=0, atol=1e-5)
            return
        got, ref = logits(model, ids, mask), logits(ref_model, ids, mask)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], ref[valid], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_runner_cache_steps_match_full_forward(name: str) -> None:
    """Prefill 6 tokens, then 4 single-token steps on the static cache == one full forward."""
    model = inject_kernels(build(name))
    runner = get_runner(model)
    ids = torch.randint(3, V, (2, 10), generator=torch.Generator().manual_seed(2))
    pos = torch.arange(10).expand(2, 10)
    cache = runner.new_cache(2, 10)
    ptrs = [t.data_ptr() for t in cache.k + cache.v]
    with torch.no_grad():
        full = logits(model, ids)
        steps = [runner(ids[:, :6], pos[:, :6], cache, 0, last_only=False)]
        steps += [runner(ids[:, t:t + 1], pos[:, t:t + 1], cache, t) for t in range(6, 10)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=1e-5)
    assert [t.data_ptr() for t in cache.k + cache.v] == ptrs  # written in place, never reallocated


def test_hf_generate_still_works_after_injection() -> None:
    ref_model = build("llama")
    model = inject_kernels(copy.deepcopy(ref_model))
    ids, mask = padded_batch()
    kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    assert torch.equal(model.generate(ids, **kw), ref_model.generate(ids, **kw))


def test_names_kept_for_tensor_parallel_and_quantization() -> None:
    # native=False: oneDNN packing applies to the torch decode path only (the native kernel reads plain weights)
    opt = inject_kernels(build("opt"), native=False)
    llama = inject_kernels(build("llama"), native=False)
    gpt2 = inject_kernels(build("gpt2"), native=False)
    for model, path in ((opt, "model.decoder.layers.0.self_attn.out_proj"), (opt, "model.decoder.layers.1.fc2"),
                        (llama, "model.layers.0.self_attn.o_proj"), (llama, "model.layers.0.mlp.down_proj"),
                        (gpt2, "transformer.h.0.attn.c_proj"), (gpt2, "transformer.h.0.mlp.c_proj")):
        assert isinstance(model.get_submodule(path), (nn.Linear, PackedLinear)), path
    assert llama.model.layers[0].self_attn.qkv.out_features == 64 + 2 * 32  # q + GQA k, v
    assert llama.model.layers[0].mlp.gate_up.out_features == 2 * 128
    assert isinstance(llama.lm_head, PackedLinear) and llama.lm_head.tied_embedding is None
    assert opt.lm_head.tied_embedding == "model.decoder.embed_tokens"  # a packed copy of OPT's tied head
    kept = inject_kernels(build("opt"), pack_tied_head=False, native=False)
    assert kept.lm_head.weight is kept.model.decoder.embed_tokens.weight


def test_packed_linear_round_trips() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(32, 48).to(torch.bfloat16)
    packed = PackedLinear(lin)
    x = torch.randn(3, 5, 32, dtype=torch.bfloat16)
    torch.testing.assert_close(packed(x), lin(x), rtol=1e-2, atol=1e-2)
    assert torch.equal(packed.weight, lin.weight)
    clone = copy.deepcopy(packed)
    assert clone.packed == packed.packed and torch.equal(clone.weight, lin.weight)
    other = PackedLinear(nn.Linear(32, 48).to(torch.bfloat16))
    other.load_state_dict(packed.state_dict())
    assert torch.equal(other.weight, lin.weight) and set(packed.state_dict()) == {"weight", "bias"}
    as32 = copy.deepcopy(packed).float()
    assert as32.weight.dtype == torch.float32 and as32(x.float()).dtype == torch.float32


def test_unrecognised_model_names_the_setting() -> None:
    with pytest.raises(ConfigError, match="replace_with_kernel_inject") as err:
        inject_kernels(nn.Sequential(nn.Linear(4, 4)))
    assert err.value.key == "replace_with_kernel_inject"
    assert "Sequential" in str(err.value)


def test_return_tuple_false_with_injection_is_a_config_error() -> None:
    import flexspeed

    with pytest.raises(ConfigError, match="return_tuple") as err:
        flexspeed.init_inference(build("gpt"), replace_with_kernel_inject=True, return_tuple=False)
    assert err.value.key == "return_tuple"
    engine = flexspeed.init_inference(build("gpt"), replace_with_kernel_inject=True, return_tuple=True)
    assert get_runner(engine.module) is not None


def test_inject_is_idempotent_and_casts() -> None:
    model = inject_kernels(build("opt"), torch.bfloat16)
    layer = model.model.decoder.layers[0]
    assert inject_kernels(model) is model and model.model.decoder.layers[0] is layer
    assert layer.self_attn.qkv.weight.dtype == torch.bfloat16
    runner = get_runner(model)
    native = runner.native_reason() is None  # the native kernel reads a bf16 cache at full speed
    cache = runner.new_cache(1, 4)
    assert cache.k[0].shape == (1, 4, 4, 16)
    assert cache.k[0].dtype == (torch.bfloat16 if native else torch.float32)
    runner.native_decode = False
    assert runner.new_cache(1, 4).k[0].dtype == torch.float32  # torch's path: fp32 is its faster CPU attention
    runner.cache_dtype = torch.bfloat16
    assert runner.new_cache(1, 4).v[1].dtype == torch.bfloat16


def test_bf16_injected_close_to_bf16_reference() -> None:
    ref_model = build("llama").to(torch.bfloat16)
    model = inject_kernels(copy.deepcopy(ref_model))
    ids, mask = padded_batch()
    with torch.no_grad():
        got, ref = logits(model, ids, mask).float(), logits(ref_model, ids, mask).float()
    valid = mask.bool()
    assert ((got - ref)[valid].norm() / ref[valid].norm()) < 2e-2


def test_compiled_decode_matches_eager() -> None:
    """The static-shape decode step under torch.compile (GQA, RoPE, left padding, rounded cache)."""
    import warnings

    from flexspeed.inference.generation import generate

    model = inject_kernels(build("llama"))
    ids, mask = padded_batch()
    eager = generate(model, ids, mask, max_new_tokens=5, eos_token_id=None)
    runner = get_runner(model)
    runner.compile_decode = True
    with warnings.catch_warnings(record=True) as log:
        warnings.simplefilter("always")
        compiled = generate(model, ids, mask, max_new_tokens=5, eos_token_id=None)
    fallback = [str(w.message) for w in log if "compiled decode failed" in str(w.message)]
    assert runner.compile_decode and not fallback, fallback  # no fallback to eager
    assert torch.equal(compiled, eager)
