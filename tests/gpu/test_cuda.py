"""The CUDA tier: the same parity checks as the CPU suite, on a GPU with NCCL.

Skipped without CUDA. Run on a machine with one or more GPUs:

    .venv/bin/python -m pytest tests/gpu -v

Tolerances are looser than the CPU suite's 1e-5 where cuBLAS picks different reduction orders
for different batch shapes (TF32 is switched off, so fp32 stays fp32).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

MICRO, STEPS, LR = 4, 3, 1e-3


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _config(stage: int, world: int = 1, **extra) -> dict:
    return {"train_batch_size": MICRO * world, "train_micro_batch_size_per_gpu": MICRO,
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0}},
            "zero_optimization": {"stage": stage}, "steps_per_print": 1000, **extra}


def _train(stage: int, world: int = 1, **extra) -> dict:
    import flexspeed
    from tests.distributed._parity import make_dataset, make_model

    model = make_model()
    engine, _, loader, _ = flexspeed.initialize(model=model, model_parameters=model.parameters(),
                                               training_data=make_dataset(), config=_config(stage, world, **extra))
    assert engine.device.type == "cuda"
    losses, it = [], iter(loader)
    for _ in range(STEPS):
        x, y = (t.to(engine.device) for t in next(it))  # as with DeepSpeed, the script moves its batch
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    state = {k: v.detach().float().cpu() for k, v in engine.module.state_dict().items()}
    return {"losses": losses, "state": state}


def _reference(world: int = 1, autocast_dtype=None) -> dict:
    from tests.distributed._parity import global_batches, make_dataset, make_model

    model = make_model().cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    losses = []
    for xs, ys in global_batches(make_dataset(), world=world, micro=MICRO, gas=1, steps=STEPS):
        with torch.autocast("cuda", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
            loss = model(xs.cuda(), ys.cuda())
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return {"losses": losses, "state": {k: v.detach().float().cpu() for k, v in model.state_dict().items()}}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_single_gpu_stages_match_plain_pytorch(stage: int) -> None:
    got, ref = _train(stage), _reference()
    torch.testing.assert_close(got["losses"], ref["losses"], rtol=1e-4, atol=1e-4)
    for k, v in ref["state"].items():
        torch.testing.assert_close(got["state"][k], v, rtol=1e-4, atol=1e-4, msg=k)


def test_single_gpu_bf16_close_to_autocast_reference() -> None:
    got, ref = _train(2, bf16={"enabled": True}), _reference(autocast_dtype=torch.bfloat16)
    torch.testing.assert_close(got["losses"], ref["losses"], rtol=5e-3, atol=5e-3)


def test_process_group_uses_nccl_for_cuda_tensors() -> None:
    import torch.distributed as dist

    _train(0)
    assert "nccl" in str(dist.get_backend())


def _two_gpu_worker(rank: int, world: int, stage: int) -> dict:
    return _train(stage, world)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("stage", [0, 3])
def test_two_gpus_match_plain_pytorch(stage: int) -> None:
    from flexspeed.testing import run_ranks

    got = run_ranks(_two_gpu_worker, 2, args=(stage,), timeout=300)[0]
    ref = _reference(world=2)
    torch.testing.assert_close(got["losses"], ref["losses"], rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------ inference

def _llama():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=97, initializer_range=0.2)
    return tf.LlamaForCausalLM(cfg).eval()


def _padded():
    ids = torch.randint(3, 97, (3, 10), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    return ids.masked_fill(mask == 0, 1), mask


def test_inference_engine_on_cuda_injected_matches_and_generates_like_hf() -> None:
    import flexspeed

    ref = _llama().cuda()
    ids, mask = (t.cuda() for t in _padded())
    engine = flexspeed.init_inference(copy.deepcopy(ref), dtype="fp32", replace_with_kernel_inject=True)
    assert engine.device.type == "cuda"
    with torch.no_grad():
        want, got = ref(ids, attention_mask=mask).logits, engine(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-4, atol=1e-4)
    hf = ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=1)
    assert torch.equal(engine.generate(ids, attention_mask=mask, max_new_tokens=8).cpu(), hf.cpu())


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_weights_on_cuda(bits: int) -> None:
    import flexspeed

    ref = _llama().cuda()
    ids, mask = (t.cuda() for t in _padded())
    engine = flexspeed.init_inference(copy.deepcopy(ref), dtype="bf16",
                                      quant={"enabled": True, "weight": {"num_bits": bits}})
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits.float()
        got = engine(ids, attention_mask=mask).logits.float()
    rel = ((got - want)[mask.bool()].norm() / want[mask.bool()].norm()).item()
    assert rel < (0.05 if bits == 8 else 0.3), rel


def test_cuda_graph_and_keep_module_on_host_give_the_same_logits() -> None:
    import flexspeed

    ref = _llama().cuda()
    ids = _padded()[0][:1].cuda()
    with torch.no_grad():
        want = ref(ids).logits
        graph = flexspeed.init_inference(copy.deepcopy(ref), dtype="fp32", enable_cuda_graph=True)
        got = graph(ids).logits.clone()
        again = graph(ids).logits.clone()  # replay
        host = flexspeed.init_inference(copy.deepcopy(ref).cpu(), dtype="fp32", keep_module_on_host=True)
        hosted = host(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(again, want, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hosted, want, rtol=1e-4, atol=1e-4)
