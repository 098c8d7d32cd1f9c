"""The family registry: one table serves injection, the native decoder, offload and TP for nine
families. For each: the injected model's logits equal the original's (fp32, atol 1e-5), and greedy
tokens equal HF ``generate`` (fp32, left-padded batch) with and without injection."""

from __future__ import annotations

import copy

import pytest
import torch

from flexspeed.inference.families import FAMILIES, family_for_model
from flexspeed.inference.generation import generate
from flexspeed.inference.kernels import FusedDecoderLayer, inject_kernels

from ._families import NINE, build, padded_batch

tf = pytest.importorskip("transformers")
tf.utils.logging.set_verbosity_error()


def _logits(model, ids, mask=None):
    out = model(ids) if mask is None else model(ids, attention_mask=mask)
    return out if isinstance(out, torch.Tensor) else out.logits


def test_every_family_has_one_entry_and_is_recognised() -> None:
    assert set(FAMILIES) == set(NINE)
    for name in NINE:
        fam, dims = family_for_model(build(name))
        assert fam.name == name and dims.n_layers == 2 and dims.hidden == 64


@pytest.mark.parametrize("name", NINE)
def test_injected_logits_equal_the_model(name: str) -> None:
    ref = build(name)
    model = inject_kernels(copy.deepcopy(ref))
    fam, _ = family_for_model(ref)
    assert all(isinstance(b, FusedDecoderLayer) for b in model.get_submodule(fam.layers))
    ids, mask = padded_batch()
    with torch.no_grad():
        if name == "gpt":
            torch.testing.assert_close(_logits(model, ids), _logits(ref, ids), rtol=0, atol=1e-5)
            return
        got, want = _logits(model, ids, mask), _logits(ref, ids, mask)
    valid = mask.bool()
    torch.testing.assert_close(got[valid], want[valid], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", [n for n in NINE if n != "gpt"])
def test_greedy_tokens_equal_hf_generate_with_and_without_injection(name: str) -> None:
    model = build(name)
    ids, mask = padded_batch()
    kw = dict(max_new_tokens=10, pad_token_id=0)
    free = model.generate(ids, attention_mask=mask, do_sample=False, eos_token_id=None, **kw)
    eos = int(free[0, 9 + 2])  # a token row 0 emits: finishing and padding are exercised
    ref = model.generate(ids, attention_mask=mask, do_sample=False, eos_token_id=eos, **kw)
    assert torch.equal(generate(model, ids, mask, eos_token_id=eos, **kw), ref)
    assert torch.equal(generate(inject_kernels(copy.deepcopy(model)), ids, mask, eos_token_id=eos, **kw), ref)


@pytest.mark.parametrize("name", ["phi3", "gpt_neox"])
def test_fused_names_kept_where_tp_and_quantization_look(name: str) -> None:
    model = inject_kernels(build(name))
    fam, dims = family_for_model(model)
    block = model.get_submodule(fam.layers)[0]
    for role in ("o", "down", "norm1", "norm2"):
        assert isinstance(block.get_submodule(fam.block[role]), torch.nn.Module)
    assert block.get_submodule(fam.qkv_path()).out_features == (dims.n_heads + 2 * dims.n_kv_heads) * dims.head_dim


@pytest.mark.parametrize("name", NINE)
def test_offload_greedy_tokens_equal_hf_generate(name: str, tmp_path) -> None:
    """Through the offload runner, half the weights on disk: from the model's own tensors, and
    (HF families) from a ``save_pretrained`` folder into a model built on the meta device."""
    import flexspeed

    model = build(name)
    ids, mask = padded_batch()
    if name == "gpt":
        ref = generate(model, ids, mask, max_new_tokens=8, use_cache=False)
    else:
        ref = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=8, eos_token_id=None,
                             pad_token_id=0)
    policy = {"w_gpu_percent": 50, "cache_gpu_percent": 50, "offload_dir": str(tmp_path / "off")}
    if name != "gpt":
        model.save_pretrained(tmp_path / "ckpt")
        with torch.device("meta"):
            meta = type(model)(model.config)
        engine = flexspeed.init_inference(meta, checkpoint=str(tmp_path / "ckpt"), offload=policy, dtype="fp32")
        got = engine.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=None, pad_token_id=0)
        engine.offload.close()
        assert torch.equal(got, ref)
    engine = flexspeed.init_inference(copy.deepcopy(model), offload=policy, dtype="fp32")
    got = engine.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=None, pad_token_id=0)
    engine.offload.close()
    assert torch.equal(got, ref)


def test_checkpoint_names_the_family_declares_are_read(tmp_path) -> None:
    """GPT-NeoX files call ``lm_head`` ``embed_out``: init_inference's loader reads it by the registry's name."""
    import flexspeed

    model = build("gpt_neox")
    model.save_pretrained(tmp_path)
    with torch.device("meta"):
        meta = type(model)(model.config)
    engine = flexspeed.init_inference(meta, checkpoint=str(tmp_path), replace_with_kernel_inject=True, dtype="fp32")
    ids, mask = padded_batch()
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    assert torch.equal(engine.generate(ids, attention_mask=mask, max_new_tokens=6), ref)


def _windowed(name: str, window: int, layer_types=None):
    common = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=97, initializer_range=0.2, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0, sliding_window=window)
    torch.manual_seed(0)
    if name == "mistral":
        return tf.MistralForCausalLM(tf.MistralConfig(**common)).eval()
    extra = {"layer_types": layer_types} if layer_types else {}
    return tf.Qwen2ForCausalLM(tf.Qwen2Config(use_sliding_window=True, max_window_layers=0, **extra,
                                              **common)).eval()


@pytest.mark.parametrize("name,layer_types", [("mistral", None), ("qwen2", None),
                                              ("qwen2", ["full_attention", "sliding_attention"])])
def test_sliding_window_generation_past_the_window_equals_hf(name: str, layer_types) -> None:
    """A window of 4 keys and prompts of 9 tokens + 12 new: every step past the window attends
    only its window (fused prefill mask, native or eager single-token steps; one layer full and
    one sliding for Qwen2's ``layer_types``), token for token HF's greedy ``generate``."""
    from flexspeed.inference.runners import select_runner

    model = _windowed(name, 4, layer_types)
    fam, dims = family_for_model(model)
    assert dims.windows == (tuple(4 if t == "sliding_attention" else None for t in layer_types) if layer_types
                            else (4, 4))
    ids, mask = padded_batch()
    kw = dict(max_new_tokens=12, pad_token_id=0, eos_token_id=None)
    ref = model.generate(ids, attention_mask=mask, do_sample=False, **kw)
    full = _windowed(name, 64, layer_types)  # the same weights attending everything: a different answer
    assert not torch.equal(full.generate(ids, attention_mask=mask, do_sample=False, **kw), ref)
    injected = inject_kernels(copy.deepcopy(model))
    assert select_runner(model).runner.max_positions is None  # no cap at the window
    for m in (model, injected):
        assert torch.equal(generate(m, ids, mask, **kw), ref)
        assert torch.equal(generate(m, ids[:1], mask[:1], **kw), ref[:1])  # unpadded: the native greedy path
        torch.manual_seed(3)
        sampled = {**kw, "eos_token_id": 2, "min_new_tokens": 12, "do_sample": True, "top_k": 0}
        want = model.generate(ids, attention_mask=mask, **sampled)
        torch.manual_seed(3)
        assert torch.equal(generate(m, ids, mask, **sampled), want)  # one step at a time, eagerly


def assert_one_step_equals_hf(runner, model, ids: torch.Tensor) -> None:
    """A 9-token prompt of row 0 through ``runner``, then one single-token step: its logits equal
    HF's forward over the 10 tokens (fp32, atol 1e-4)."""
    cache = runner.new_cache(1, 12)
    with torch.no_grad():
        runner.step(ids[:1], torch.arange(9)[None], cache, 0)
        got = runner.step(ids[:1, :1], torch.tensor([[9]]), cache, 9)
        want = model(torch.cat([ids[:1], ids[:1, :1]], 1)).logits[:, -1:]
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


def test_gemma_runs_on_the_native_kernel_with_and_without_injection() -> None:
    """Gemma's (1 + w) RMSNorm (an fp32 copy of 1 + w) and scaled embedding on the native step:
    the un-injected model gets a shadow runner; one native step's logits equal HF's (fp32)."""
    from flexspeed.inference.native import library
    from flexspeed.inference.runners import select_runner

    if library() is None:
        pytest.skip("the native decode kernel is not built")
    model = build("gemma")
    ids, _ = padded_batch()
    for m in (model, inject_kernels(copy.deepcopy(model))):
        runner = select_runner(m).runner
        assert "native C kernel" in runner.describe(), runner.describe()
        assert_one_step_equals_hf(runner, model, ids)


@pytest.mark.parametrize("rotary_pct", [0.25, 1.0])
@pytest.mark.parametrize("parallel", [True, False])
def test_gpt_neox_runs_on_the_native_kernel(rotary_pct: float, parallel: bool) -> None:
    """GPT-NeoX's partial rotary (the leading ``rotary_pct * head_dim`` dims of each head turn, the
    rest pass through) and parallel residual (``x + attn(ln1(x)) + mlp(ln2(x))``) in the C step:
    through init_inference with kernel injection the runner's single-token steps are native, one
    native step's logits equal HF's (fp32, atol 1e-4), and greedy tokens equal HF ``generate`` for a
    left-padded batch (one native step per token) and an unpadded row (the native greedy loop)."""
    import flexspeed
    from flexspeed.inference.native import library

    if library() is None:
        pytest.skip("the native decode kernel is not built")
    model = build("gpt_neox", rotary_pct=rotary_pct, use_parallel_residual=parallel)
    _, dims = family_for_model(model)
    assert (dims.rotary_dim, dims.parallel_residual) == (int(16 * rotary_pct), parallel)
    engine = flexspeed.init_inference(copy.deepcopy(model), replace_with_kernel_inject=True, dtype="fp32",
                                      decode_path="native")  # the kernel itself, not the run-time choice
    runner = engine.runner
    assert runner.native_reason() is None, runner.native_reason()
    assert "single-token steps: native C kernel" in runner.describe(), runner.describe()
    ids, mask = padded_batch()
    assert_one_step_equals_hf(runner, model, ids)
    kw = dict(max_new_tokens=12, pad_token_id=0, eos_token_id=None)
    ref = model.generate(ids, attention_mask=mask, do_sample=False, **kw)
    assert torch.equal(engine.generate(ids, attention_mask=mask, **kw), ref)
    assert torch.equal(engine.generate(ids[:1], attention_mask=mask[:1], **kw), ref[:1])


def test_phi3_partial_rotary_runs_on_the_native_kernel() -> None:
    """A Phi-3 with ``partial_rotary_factor`` 0.5 (as Phi-4-mini's 0.75): the native step turns the
    leading half of each head; greedy tokens equal HF ``generate`` (padded batch and one row)."""
    import flexspeed
    from flexspeed.inference.native import library

    if library() is None:
        pytest.skip("the native decode kernel is not built")
    model = build("phi3", partial_rotary_factor=0.5)
    assert family_for_model(model)[1].rotary_dim == 8
    engine = flexspeed.init_inference(copy.deepcopy(model), replace_with_kernel_inject=True, dtype="fp32",
                                      decode_path="native")  # the kernel itself, not the run-time choice
    assert engine.runner.native_reason() is None, engine.runner.native_reason()
    assert "single-token steps: native C kernel" in engine.runner.describe(), engine.runner.describe()
    ids, mask = padded_batch()
    kw = dict(max_new_tokens=12, pad_token_id=0, eos_token_id=None)
    ref = model.generate(ids, attention_mask=mask, do_sample=False, **kw)
    assert torch.equal(engine.generate(ids, attention_mask=mask, **kw), ref)
    assert torch.equal(engine.generate(ids[:1], attention_mask=mask[:1], **kw), ref[:1])
