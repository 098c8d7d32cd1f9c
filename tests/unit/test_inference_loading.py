"""Checkpoint loading: single and sharded safetensors, DeepSpeed json, per-rank slices, meta models."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

import flexspeed
from flexspeed.config.errors import ConfigError
from flexspeed.inference.loading import checkpoint_files, load_checkpoint
from flexspeed.inference.tp import plan_tensor_parallel, shard_module, take
from flexspeed.models.gpt import GPT

safetensors_torch = pytest.importorskip("safetensors.torch")

SHAPE = dict(n_layer=2, n_embd=32, n_head=4, vocab_size=64, block_size=32)


def gpt(seed: int = 0, meta: bool = False) -> GPT:
    torch.manual_seed(seed)
    if meta:
        with torch.device("meta"):
            return GPT(**SHAPE).eval()
    return GPT(**SHAPE).eval()


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def assert_same(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=0, atol=0, msg=k)


@pytest.fixture()
def src_model():
    return gpt(seed=1)


def test_single_safetensors(tmp_path, src_model):
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(state(src_model), str(path))
    model = gpt(seed=2)
    report = load_checkpoint(model, str(path))
    assert_same(model, src_model)
    assert report.files == [str(path)] and not report.unexpected
    assert report.bytes_read == sum(t.nbytes for t in src_model.state_dict().values())
    # a directory holding it works too
    assert checkpoint_files(str(tmp_path)) == [str(path)]


def test_sharded_safetensors_index(tmp_path, src_model):
    sd = state(src_model)
    keys = sorted(sd)
    halves = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    weight_map = {}
    for fname, ks in halves.items():
        safetensors_torch.save_file({k: sd[k] for k in ks}, str(tmp_path / fname))
        weight_map.update({k: fname for k in ks})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model = gpt(seed=2)
    report = load_checkpoint(model, str(tmp_path))
    assert_same(model, src_model)
    assert sorted(report.files) == sorted(str(tmp_path / f) for f in halves)


def test_deepspeed_json_with_base_dir(tmp_path, src_model):
    sd = state(src_model)
    keys = sorted(sd)
    (tmp_path / "w").mkdir()
    torch.save({k: sd[k] for k in keys[:5]}, tmp_path / "w" / "part0.pt")
    torch.save({"module": {k: sd[k] for k in keys[5:]}}, tmp_path / "w" / "part1.pt")
    desc = {"type": "ds_model", "checkpoints": ["part0.pt", "part1.pt"], "version": 1.0}
    (tmp_path / "ckpt.json").write_text(json.dumps(desc))
    model = gpt(seed=2)
    load_checkpoint(model, str(tmp_path / "ckpt.json"), base_dir=str(tmp_path / "w"))
    assert_same(model, src_model)
    model = gpt(seed=3)
    load_checkpoint(model, desc, base_dir=str(tmp_path / "w"))  # the description as a dict
    assert_same(model, src_model)
    with pytest.raises(ConfigError, match=r"\[base_dir\].*do not exist"):
        load_checkpoint(gpt(), str(tmp_path / "ckpt.json"))


def test_torch_files_load_weights_only(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.bin"
    torch.save({"x": Evil()}, path)
    with pytest.raises(pickle.UnpicklingError, match="[Ww]eights only"):
        load_checkpoint(gpt(), str(path))


def test_ds_json_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"\[checkpoint.type\].*Megatron"):
        load_checkpoint(gpt(), {"type": "Megatron", "checkpoints": ["a.pt"]})
    with pytest.raises(ConfigError, match=r"already split for tensor parallelism"):
        load_checkpoint(gpt(), {"type": "ds_model", "checkpoints": {"tp": ["a"], "non_tp": ["b"]}})
    with pytest.raises(ConfigError, match=r"\[checkpoint\].*does not exist"):
        load_checkpoint(gpt(), str(tmp_path / "nope.safetensors"))
    with pytest.raises(ConfigError, match=r"holds none of"):
        load_checkpoint(gpt(), str(tmp_path))


def test_missing_and_mismatched_keys(tmp_path, src_model):
    sd = state(src_model)
    sd.pop("lm_head.weight")
    safetensors_torch.save_file(sd, str(tmp_path / "a.safetensors"))
    with pytest.raises(ConfigError, match=r"\[checkpoint\].*not in the checkpoint.*lm_head.weight"):
        load_checkpoint(gpt(), str(tmp_path / "a.safetensors"))
    torch.manual_seed(0)
    other = GPT(**{**SHAPE, "n_embd": 16})
    safetensors_torch.save_file(state(other), str(tmp_path / "b.safetensors"))
    with pytest.raises(ConfigError, match=r"shape"):
        load_checkpoint(gpt(), str(tmp_path / "b.safetensors"))


def test_meta_model_materialised_in_dtype(tmp_path, src_model):
    safetensors_torch.save_file(state(src_model), str(tmp_path / "model.safetensors"))
    model = gpt(meta=True)
    load_checkpoint(model, str(tmp_path / "model.safetensors"), dtype=torch.bfloat16)
    assert all(p.dtype is torch.bfloat16 and not p.is_meta for p in model.parameters())
    torch.testing.assert_close(model.lm_head.weight.float(), src_model.lm_head.weight.bfloat16().float())


@pytest.mark.parametrize("rank", [0, 1])
def test_each_rank_reads_only_its_slice(tmp_path, src_model, rank):
    path = tmp_path / "model.safetensors"
    safetensors_torch.save_file(state(src_model), str(path))
    model = gpt(meta=True)
    plan = plan_tensor_parallel(model, 2)
    shard_module(model, plan, rank)
    report = load_checkpoint(model, str(path), plan=plan, rank=rank)
    full = src_model.state_dict()
    C = SHAPE["n_embd"]
    # the fused qkv: this rank's heads of q, of k and of v, re-chunked
    rows = torch.cat([torch.arange(p * C + rank * C // 2, p * C + (rank + 1) * C // 2) for p in range(3)])
    got = model.transformer.h[0].attn.c_attn.weight
    assert got.shape == (3 * C // 2, C)
    torch.testing.assert_close(got, full["transformer.h.0.attn.c_attn.weight"][rows], rtol=0, atol=0)
    # row-parallel: input columns split; its bias counted once (on rank 0)
    w = model.transformer.h[1].mlp.c_proj
    torch.testing.assert_close(w.weight, full["transformer.h.1.mlp.c_proj.weight"][:, rank * 2 * C:(rank + 1) * 2 * C])
    assert torch.count_nonzero(w.bias) == 0 if rank else torch.equal(w.bias, full["transformer.h.1.mlp.c_proj.bias"])
    for name, placement in plan.params.items():
        torch.testing.assert_close(model.get_parameter(name), take(full[name], placement, rank, 2), rtol=0, atol=0)
    # bytes: the replicated tensors whole, the split ones halved (row biases only on rank 0)
    split = sum(full[n].nbytes for n, p in plan.params.items() if p.kind == "shard") // 2
    biases = sum(full[n].nbytes for n, p in plan.params.items() if p.kind == "rank0")
    replicated = sum(t.nbytes for n, t in full.items() if n not in plan.params)
    assert report.bytes_read == replicated + split + (biases if rank == 0 else 0)
    assert report.bytes_read < 0.75 * sum(t.nbytes for t in full.values())


def test_hf_conv1d_slices_and_prefix(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=64, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    src = transformers.GPT2LMHeadModel(cfg).eval()
    # the Hub's gpt2 stores the base model without the "transformer." prefix and no lm_head (tied)
    safetensors_torch.save_file(state(src.transformer), str(tmp_path / "model.safetensors"))
    with torch.device("meta"):
        model = transformers.GPT2LMHeadModel(cfg).eval()
    plan = plan_tensor_parallel(model, 2)
    shard_module(model, plan, 1)
    load_checkpoint(model, str(tmp_path), plan=plan, rank=1)
    w = model.transformer.h[0].attn.c_attn.weight  # Conv1D: (in, out), split along dim 1
    cols = torch.cat([torch.arange(p * 32 + 16, p * 32 + 32) for p in range(3)])
    torch.testing.assert_close(w, src.transformer.h[0].attn.c_attn.weight[:, cols], rtol=0, atol=0)
    assert model.transformer.h[0].attn.c_attn.nf == 48 and model.lm_head.weight is model.transformer.wte.weight


def test_init_inference_meta_llama_with_checkpoint(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                                   num_hidden_layers=1, vocab_size=64)
    torch.manual_seed(0)
    src = transformers.LlamaForCausalLM(cfg).eval()
    safetensors_torch.save_file(state(src), str(tmp_path / "model.safetensors"))
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(cfg)
    ckpt = {"type": "ds_model", "checkpoints": ["model.safetensors"], "version": 1.0}
    engine = flexspeed.init_inference(model, checkpoint=ckpt, base_dir=str(tmp_path))
    x = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(engine(x).logits, src(x).logits, rtol=0, atol=1e-6)
    assert engine.load_report is not None and not engine.load_report.unexpected


def test_legacy_torch_file(tmp_path, src_model):
    torch.save(state(src_model), tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    model = gpt(seed=2)
    load_checkpoint(model, str(tmp_path))
    assert_same(model, src_model)
