"""Inference on the GPU: injected kernels with decode steps replayed from CUDA graphs, int8/int4
weights, ``enable_cuda_graph``, ``keep_module_on_host``, and the offload runner's device tier
(pinned host copies on a side stream, ``cpu_cache_compute``), each against HF or the in-memory
engine on the same device.

fp32 throughout unless stated (TF32 off): logits within 1e-4, greedy tokens equal (the tiny models'
init std 0.2 keeps logits far apart).
"""

from __future__ import annotations

import copy

import pytest
import torch

from tests.gpu.conftest import DEV
from tests.unit.test_offload import POLICIES, build as build_family, padded_batch as offload_batch

tf = pytest.importorskip("transformers")
tf.utils.logging.set_verbosity_error()

def _llama():
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=97, initializer_range=0.2)
    return tf.LlamaForCausalLM(cfg).eval()


def _padded():
    ids = torch.randint(3, 97, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    return ids.masked_fill(mask == 0, 1), mask


def test_injected_engine_matches_hf_logits_and_tokens() -> None:
    import flexspeed

    ref = _llama().to(DEV)
    ids, mask = (t.to(DEV) for t in _padded())
    engine = flexspeed.init_inference(copy.deepcopy(ref), dtype="fp32", replace_with_kernel_inject=True)
    assert engine.device.type == DEV.type
    with torch.no_grad():
        want, got = ref(ids, attention_mask=mask).logits, engine(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-4, atol=1e-4)
    hf = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=1)
    assert torch.equal(engine.generate(ids, attention_mask=mask, max_new_tokens=8).cpu(), hf.cpu())


@pytest.mark.cuda_only
@pytest.mark.parametrize("family", ["gpt2", "opt", "llama"])
def test_graph_decode_gives_hf_tokens_and_is_reused(family: str) -> None:
    """Decode steps replay a captured graph: tokens equal HF ``generate`` on the same GPU (padded batch,
    an eos that one row emits: finished rows are padded), equal the graphs-off engine, and a second
    generation of nearby length reuses the graph (no new capture)."""
    import flexspeed
    from flexspeed.inference.kernels import get_runner
    from tests.unit.test_generation import build, padded_batch

    model = build(family).to(DEV)
    ids, mask = (t.to(DEV) for t in padded_batch())
    kw = dict(max_new_tokens=12, pad_token_id=0)
    free = model.generate(ids, attention_mask=mask, do_sample=False, eos_token_id=None, **kw)
    eos = int(free[0, 9 + 2])
    want = model.generate(ids, attention_mask=mask, do_sample=False, eos_token_id=eos, **kw)
    engine = flexspeed.init_inference(copy.deepcopy(model), dtype="fp32", replace_with_kernel_inject=True)
    runner = get_runner(engine.module)
    got = engine.generate(ids, attention_mask=mask, eos_token_id=eos, **kw)
    graphs = runner._graphs
    assert graphs is not None and graphs.failed is None and graphs.captures == 1, graphs and graphs.failed
    assert torch.equal(got, want)
    longer = engine.generate(ids, attention_mask=mask, max_new_tokens=14, pad_token_id=0)  # the model's own eos
    assert graphs.captures == 1  # 9 + 14 tokens: the same 64-token cache bucket, the same graph
    n = min(longer.shape[1], free.shape[1])
    assert torch.equal(longer[:, :n], free[:, :n])  # HF's eos_token_id=None falls back to the model's too
    runner.cuda_graphs = False
    assert torch.equal(engine.generate(ids, attention_mask=mask, eos_token_id=eos, **kw), want)


def test_graph_decode_of_flexspeed_gpt_matches_recompute() -> None:
    """flexspeed's own GPT (no mask): cached decode (graphs on CUDA) equals full recomputation."""
    import flexspeed
    from flexspeed.inference.generation import generate

    model = build_family("gpt").to(DEV)
    ids = offload_batch()[0].to(DEV)
    want = generate(model, ids, max_new_tokens=8, use_cache=False, eos_token_id=None)
    engine = flexspeed.init_inference(copy.deepcopy(model), dtype="fp32", replace_with_kernel_inject=True)
    assert torch.equal(engine.generate(ids, max_new_tokens=8, eos_token_id=None), want)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("inject", [False, True])
def test_quantized_weights(bits: int, inject: bool) -> None:
    """int8 / int4 weights on the device (dequantized per call off the CPU) give the logits of the same
    quantization computed on the CPU (bf16 rounding apart), and generation runs (through the decode
    graphs when injected). The bound against the unquantized fp32 model is loose for int4: this tiny
    random model (init std 0.2, groups of 64) is a worst case; tests/unit/test_quant.py bounds real-like
    models."""
    import flexspeed
    from flexspeed.inference.kernels import inject_kernels
    from flexspeed.inference.quant import quantize_linears

    ref = _llama()
    ids, mask = _padded()
    on_cpu = copy.deepcopy(ref).to(torch.bfloat16)
    on_cpu = quantize_linears(inject_kernels(on_cpu, native=False) if inject else on_cpu, bits, group_size=64,
                              int4_layout="plain")
    engine = flexspeed.init_inference(copy.deepcopy(ref).to(DEV), dtype="bf16", replace_with_kernel_inject=inject,
                                      quant={"enabled": True, "weight": {"num_bits": bits}})
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits.float()
        cpu = on_cpu(ids, attention_mask=mask).logits.float()
        got = engine(ids.to(DEV), attention_mask=mask.to(DEV)).logits.float().cpu()
    keep = mask.bool()
    rel = ((got - want)[keep].norm() / want[keep].norm()).item()
    assert rel < (0.05 if bits == 8 else 0.4), rel
    rel_cpu = ((got - cpu)[keep].norm() / cpu[keep].norm()).item()
    assert rel_cpu < 0.03, rel_cpu
    out = engine.generate(ids.to(DEV), attention_mask=mask.to(DEV), max_new_tokens=6)
    assert out.shape == (3, 16) and out.device.type == DEV.type


@pytest.mark.cuda_only
def test_cuda_graph_and_keep_module_on_host_give_the_same_logits() -> None:
    import flexspeed

    ref = _llama().to(DEV)
    ids = _padded()[0][:1].to(DEV)
    with torch.no_grad():
        want = ref(ids).logits
        graph = flexspeed.init_inference(copy.deepcopy(ref), dtype="fp32", enable_cuda_graph=True)
        got = graph(ids).logits.clone()
        again = graph(ids).logits.clone()  # replay
        host = flexspeed.init_inference(copy.deepcopy(ref).cpu(), dtype="fp32", keep_module_on_host=True)
        hosted = host(ids).logits
        assert all(p.device.type == "cpu" for p in host.module.parameters())  # weights stayed on the host
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hosted, want, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ offload on the GPU

DEVICE_POLICIES = {
    **POLICIES,
    "cpu_cache_compute": {"w_gpu_percent": 50, "w_cpu_percent": 50, "cache_gpu_percent": 0, "cache_cpu_percent": 100,
                          "cpu_cache_compute": True},
    "pinned host weights": {"w_gpu_percent": 0, "w_cpu_percent": 100, "pin_weight": True, "gpu_batch_size": 2,
                            "num_gpu_batches": 2},
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict:
    import json
    import os

    from safetensors.torch import save_file

    out = {}
    for name in ("opt", "llama"):
        model = build_family(name)
        folder = str(tmp_path_factory.mktemp(name))
        model.save_pretrained(folder)
        out[name] = (model, folder)
    gpt = build_family("gpt")
    folder = str(tmp_path_factory.mktemp("gpt"))
    save_file({k: v.contiguous() for k, v in gpt.state_dict().items()}, os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**gpt.config.to_dict(), "model_type": "flexspeed_gpt"}, f)
    out["gpt"] = (gpt, folder)
    return out


@pytest.mark.parametrize("name", ["opt", "llama", "gpt"])
def test_offload_device_tier_gives_the_in_memory_tokens(saved, name: str) -> None:
    """Every policy (device / pinned host / disk tiers, cache on the host with cpu_cache_compute) gives the
    in-memory engine's greedy tokens on this device."""
    import flexspeed
    from flexspeed.inference.offload import OffloadedLM

    model, folder = saved[name]
    ids, mask = offload_batch()
    ids, mask = ids.to(DEV), mask.to(DEV)
    want = flexspeed.init_inference(copy.deepcopy(model), dtype="fp32").generate(
        ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5)
    for label, policy in DEVICE_POLICIES.items():
        engine = flexspeed.init_inference(OffloadedLM.from_pretrained(folder), checkpoint=folder, dtype="fp32",
                                          offload=policy)
        got = engine.generate(ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5)
        summary = engine.offload.summary()
        engine.offload.close()
        assert torch.equal(got.cpu(), want.cpu()), f"{name} / {label}"
        assert got.device.type == DEV.type, label
        assert summary is not None
