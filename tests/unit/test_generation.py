"""generate(): greedy output equals HF ``generate`` token for token (GPT-2, OPT, Llama with GQA;
left-padded batches; un-injected through HF's cache API and kernel-injected through the static
cache), sampling filters, eos/pad/min_new_tokens/max_length handling, argument errors, the
recompute path, the end-to-end ``init_inference`` route and the benchmark's ``--quick`` run.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from flexspeed.inference.generation import generate
from flexspeed.inference.kernels import inject_kernels
from flexspeed.models.gpt import GPT

tf = pytest.importorskip("transformers")
tf.utils.logging.set_verbosity_error()

V = 97


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name == "gpt2":
        cfg = tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=V, n_positions=64, bos_token_id=1,
                            eos_token_id=2, initializer_range=0.2)
        return tf.GPT2LMHeadModel(cfg).eval()
    if name == "opt":
        cfg = tf.OPTConfig(num_hidden_layers=2, hidden_size=64, ffn_dim=128, num_attention_heads=4, vocab_size=V,
                           max_position_embeddings=64, word_embed_proj_dim=64, init_std=0.2)
        return tf.OPTForCausalLM(cfg).eval()
    cfg = tf.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=V, initializer_range=0.2)
    return tf.LlamaForCausalLM(cfg).eval()


def padded_batch(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, V, (3, 9), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    mask[2, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


def gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(n_layer=2, n_embd=64, n_head=4, vocab_size=V, block_size=64).eval()


@pytest.mark.parametrize("name", ["gpt2", "opt", "llama"])
def test_greedy_equals_hf_generate(name: str) -> None:
    model = build(name)
    injected = inject_kernels(copy.deepcopy(model))
    ids, mask = padded_batch()
    # an eos id that some row actually emits, so finishing and padding are exercised
    kw = dict(max_new_tokens=12, pad_token_id=0)
    free = model.generate(ids, attention_mask=mask, do_sample=False, eos_token_id=None, **kw)
    eos = int(free[0, 9 + 2])
    ref = model.generate(ids, attention_mask=mask, do_sample=False, eos_token_id=eos, **kw)
    assert torch.equal(generate(model, ids, mask, eos_token_id=eos, **kw), ref)
    assert torch.equal(generate(injected, ids, mask, eos_token_id=eos, **kw), ref)
    assert (ref[0, 9 + 3:] == 0).all()  # row 0 finished and was padded
    # the HF-side defaults (eos/pad from generation_config) are read the same way
    assert torch.equal(generate(injected, ids, mask, max_new_tokens=8),
                       model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=8))


def test_repetition_penalty_and_min_new_tokens_match_hf() -> None:
    model = build("opt")
    ids, mask = padded_batch(2)
    free = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=10, eos_token_id=None,
                          pad_token_id=0)
    eos = int(free[1, 9 + 1])
    kw = dict(max_new_tokens=10, eos_token_id=eos, pad_token_id=0, repetition_penalty=1.5, min_new_tokens=5)
    ref = model.generate(ids, attention_mask=mask, do_sample=False, **kw)
    assert torch.equal(generate(inject_kernels(copy.deepcopy(model)), ids, mask, **kw), ref)
    assert not (ref[:, 9:14] == eos).any()


def test_flexspeed_gpt_cache_paths_agree_with_recompute() -> None:
    model = gpt()
    ids = torch.randint(0, V, (2, 7), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    slow = generate(model, ids, mask, max_new_tokens=8, use_cache=False)  # per-row recompute
    assert torch.equal(generate(model, ids, mask, max_new_tokens=8), slow)  # runner over the model's modules
    assert torch.equal(generate(inject_kernels(copy.deepcopy(model)), ids, mask, max_new_tokens=8), slow)
    unpadded = generate(model, ids[1:], max_new_tokens=8, use_cache=False)
    assert torch.equal(slow[1:], unpadded)


def test_plain_module_recompute_path() -> None:
    class Bigram(nn.Module):  # no cache API: generate recomputes
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Embedding(V, V)

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return self.table(idx)

    torch.manual_seed(0)
    model = Bigram()
    ids = torch.tensor([[5, 6]])
    out = generate(model, ids, max_new_tokens=4)
    for t in range(2, 6):
        assert out[0, t] == model.table.weight[out[0, t - 1]].argmax()


def test_sampling_filters_and_seeding() -> None:
    model = inject_kernels(build("llama"))
    ids, mask = padded_batch()
    greedy = generate(model, ids, mask, max_new_tokens=6, eos_token_id=None)
    a = generate(model, ids, mask, max_new_tokens=6, do_sample=True, generator=7, eos_token_id=None)
    b = generate(model, ids, mask, max_new_tokens=6, do_sample=True, generator=7, eos_token_id=None)
    assert torch.equal(a, b)
    assert torch.equal(generate(model, ids, mask, max_new_tokens=6, do_sample=True, top_k=1, generator=0,
                                eos_token_id=None), greedy)
    assert torch.equal(generate(model, ids, mask, max_new_tokens=6, do_sample=True, top_p=1e-6, generator=0,
                                eos_token_id=None), greedy)
    hot = generate(model, ids, mask, max_new_tokens=6, do_sample=True, temperature=1e-4, generator=0,
                   eos_token_id=None)
    assert torch.equal(hot, greedy)
    many = generate(model, ids, mask, max_new_tokens=4, do_sample=True, num_return_sequences=2, generator=1)
    assert many.shape == (6, 13) and torch.equal(many[0::2, :9], ids)


def test_lengths_and_argument_errors() -> None:
    model = gpt()
    ids = torch.randint(0, V, (2, 5))
    assert generate(model, ids, max_length=9).shape == (2, 9)
    assert generate(model, ids, max_new_tokens=0).shape == (2, 5)
    assert generate(model, ids).shape == (2, 25)  # default: 20 new tokens
    with pytest.raises(ValueError, match="right padding"):
        generate(model, ids, torch.tensor([[1, 1, 1, 0, 0], [1] * 5]))
    with pytest.raises(ValueError, match="all zeros"):
        generate(model, ids, torch.tensor([[0] * 5, [1] * 5]))
    with pytest.raises(ValueError, match="temperature=0"):
        generate(model, ids, do_sample=True, temperature=0)
    with pytest.raises(ValueError, match="top_p=1.5"):
        generate(model, ids, do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="num_return_sequences=2 needs do_sample"):
        generate(model, ids, num_return_sequences=2)
    with pytest.raises(ValueError, match="max_length=3 is shorter"):
        generate(model, ids, max_length=3)
    with pytest.raises(ValueError, match="int seed"):  # HF's loop (beams) draws from torch's global generator
        generate(model, ids, num_beams=4, generator=torch.Generator())
    with pytest.raises(ValueError, match="64 positions"):
        generate(model, ids, max_new_tokens=60)


def test_end_to_end_through_init_inference() -> None:
    import flexspeed

    model = build("opt")
    ids, mask = padded_batch()
    ref = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=6, eos_token_id=None,
                         pad_token_id=0)
    engine = flexspeed.init_inference(copy.deepcopy(model), dtype="fp32", replace_with_kernel_inject=True)
    out = engine.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None, pad_token_id=0)
    assert torch.equal(out, ref)
    engine8 = flexspeed.init_inference(copy.deepcopy(model), dtype="bf16", replace_with_kernel_inject=True,
                                       quant={"enabled": True, "weight": {"num_bits": 8}})
    out8 = engine8.generate(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=None, pad_token_id=0)
    assert out8.shape == ref.shape and (out8[:, 9] == ref[:, 9]).float().mean() >= 2 / 3


def test_benchmark_quick_smoke(capsys: pytest.CaptureFixture) -> None:
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "generate.py"
    spec = importlib.util.spec_from_file_location("bench_generate", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--quick", "--models", "opt", "--batches", "1", "--new", "3", "--prompt", "4",
                       "--threads", str(torch.get_num_threads())])
    assert {r["config"] for r in rows} >= {"HF bf16", "inject bf16", "inject bf16 int8", "inject bf16 int4"}
    assert all(r["tok_s"] > 0 for r in rows)
    assert "x floor" in capsys.readouterr().out
