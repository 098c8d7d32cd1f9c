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
