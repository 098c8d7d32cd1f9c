"""The decode runner: ``select_runner`` makes every path decision in one place and says why; the
engine holds the runner it chose and passes it to ``generate``; nothing is written onto the user's
model (injection, offload, tensor-parallel sharding keep ``vars(model)`` as it was)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import flexspeed
from flexspeed.inference.fused import FusedRunner
from flexspeed.inference.generation import generate
from flexspeed.inference.kernels import inject_kernels
from flexspeed.inference.native import library
from flexspeed.inference.runners import DecodeRunner, HFCacheRunner, RecomputeRunner, select_runner
from flexspeed.models.gpt import GPT

tf = pytest.importorskip("transformers")
tf.utils.logging.set_verbosity_error()
V = 97


def opt() -> nn.Module:
    torch.manual_seed(0)
    cfg = tf.OPTConfig(num_hidden_layers=2, hidden_size=64, ffn_dim=128, num_attention_heads=4, vocab_size=V,
                       max_position_embeddings=64, word_embed_proj_dim=64, init_std=0.2)
    return tf.OPTForCausalLM(cfg).eval()


def attrs(model: nn.Module) -> set[str]:
    return {k for m in model.modules() for k in vars(m) if k != "_modules"} | set(vars(model))


def test_injection_writes_nothing_onto_the_model_and_the_runner_is_found_again() -> None:
    model = opt()
    before = set(vars(model))
    inject_kernels(model)
    assert set(vars(model)) == before
    choice = select_runner(model)
    assert isinstance(choice.runner, FusedRunner) and "injection" in choice.why
    assert isinstance(choice.runner, DecodeRunner)
    # a copy of an injected model has no recorded runner: one is built from its fused blocks
    twin = copy.deepcopy(model)
    again = select_runner(twin)
    assert isinstance(again.runner, FusedRunner) and again.runner.root is twin and "fused layers" in again.why
    ids = torch.randint(3, V, (2, 6), generator=torch.Generator().manual_seed(0))
    assert torch.equal(generate(twin, ids, max_new_tokens=5), generate(model, ids, max_new_tokens=5))


def test_every_path_is_chosen_in_one_place_with_a_reason() -> None:
    model = opt()
    plain = select_runner(model)
    if library() is not None:  # a shadow runner over the model's own modules (nothing copied)
        assert isinstance(plain.runner, FusedRunner) and "un-injected" in plain.why
        assert "shadow" in plain.runner.describe()
    else:
        assert isinstance(plain.runner, HFCacheRunner) and "not available" in plain.why
    nocache = select_runner(model, use_cache=False)
    assert isinstance(nocache.runner, HFCacheRunner) and not nocache.runner.use_cache

    class Bigram(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Embedding(V, V)

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return self.table(idx)

    bigram = select_runner(Bigram())
    assert isinstance(bigram.runner, RecomputeRunner) and "no cache API" in bigram.why
    gpt = select_runner(GPT(n_layer=1, n_embd=32, n_head=2, vocab_size=V, block_size=16))
    assert isinstance(gpt.runner, FusedRunner)


@pytest.mark.parametrize("runner_kind", ["hf", "shadow", "injected", "recompute"])
def test_every_runner_gives_the_same_greedy_tokens(runner_kind: str) -> None:
    model = opt()
    ids = torch.randint(3, V, (3, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ref = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=8, eos_token_id=None,
                         pad_token_id=0)
    if runner_kind == "hf":
        runner = HFCacheRunner(model)
    elif runner_kind == "recompute":
        runner = RecomputeRunner(lambda x: model(x).logits)  # type: ignore[arg-type]
        runner.model = type("M", (nn.Module,), {"forward": lambda self, x: model(x).logits})()
    elif runner_kind == "shadow":
        if library() is None:
            pytest.skip("no native kernel: no shadow runner")
        runner = select_runner(model).runner
    else:
        runner = select_runner(inject_kernels(copy.deepcopy(model))).runner
    got = generate(model, ids, mask, max_new_tokens=8, eos_token_id=None, pad_token_id=0, runner=runner)
    assert torch.equal(got, ref)


def test_engine_holds_its_runner_and_says_why() -> None:
    model = opt()
    before = attrs(model)
    engine = flexspeed.init_inference(model, dtype=torch.float32, replace_with_kernel_inject=True)
    assert isinstance(engine.runner, FusedRunner)
    assert "decode: fused runner (opt), single-token steps:" in engine.describe()
    assert not {a for a in attrs(engine.module) - before if "flexspeed" in a}
    ids = torch.randint(3, V, (1, 5))
    assert torch.equal(engine.generate(ids, max_new_tokens=4), generate(engine.module, ids, max_new_tokens=4))


def test_offload_engine_runner_is_not_stored_on_the_model() -> None:
    torch.manual_seed(0)
    model = GPT(n_layer=2, n_embd=32, n_head=2, vocab_size=V, block_size=32).eval()
    ids = torch.randint(0, V, (2, 5))
    ref = generate(model, ids, max_new_tokens=4)
    before = set(vars(model))
    engine = flexspeed.init_inference(model, offload={"w_gpu_percent": 50})
    assert set(vars(model)) == before
    assert engine.runner is engine.offload and "offload runner" in engine.describe()
    assert torch.equal(engine.generate(ids, max_new_tokens=4), ref)
    engine.offload.close()


def test_engine_chooses_again_when_its_module_changes_after_init() -> None:
    """Kernels injected (or weights quantized) into engine.module after init_inference: the held
    shadow runner no longer computes what the model does, so the engine picks again."""
    if library() is None:
        pytest.skip("no native kernel: no shadow runner")
    model = opt()
    engine = flexspeed.init_inference(model, dtype=torch.float32)
    first = engine.runner
    assert "shadow" in first.describe() and first.current()
    inject_kernels(engine.module, native=False)
    assert not first.current()
    again = engine.runner
    assert again is not first and "fused runner" in again.describe() and "native_decode is off" in again.describe()
    ids = torch.randint(3, V, (1, 5))
    ref = opt().generate(ids, do_sample=False, max_new_tokens=4)
    assert torch.equal(engine.generate(ids, max_new_tokens=4), ref)
