"""Two ranks on one GPU.

NCCL refuses two ranks of one communicator on the same GPU ("Duplicate GPU detected"); the first
test checks what this machine's NCCL does (and is skipped, saying so, where it refuses). On one GPU
the two-rank paths run on gloo over CUDA tensors instead (gloo copies through host memory): ZeRO
stages 0-3 against one plain-PyTorch process on the same global batches (fp32, 1e-5, as the CPU
tier), and tensor-parallel inference (logits of tp_size 2 equal the unsharded model's, 1e-4).
With two or more GPUs the NCCL rows run for real.
"""

from __future__ import annotations

import copy

import pytest
import torch

from flexspeed.testing import RanksFailed, run_ranks
from tests.distributed._parity import global_batches, make_dataset, make_model, reference_run
from tests.distributed.test_zero_parity import WEIGHT_TOL_FP32, full_state, zero_config
from tests.gpu.conftest import DEV

STEPS, LR, CLIP = 3, 1e-3, 0.5


def _nccl_probe(rank: int, world: int) -> str:
    import torch.distributed as dist

    import flexspeed

    flexspeed.init_distributed()
    t = torch.ones(4, device=f"cuda:{rank % torch.cuda.device_count()}") * (rank + 1)
    dist.all_reduce(t)
    torch.cuda.synchronize()
    return f"{dist.get_backend()} {t.tolist()}"


@pytest.mark.cuda_only
def test_nccl_two_ranks() -> None:
    try:
        out = run_ranks(_nccl_probe, 2, init_process_group=False, timeout=120)
    except RanksFailed as err:
        if torch.cuda.device_count() < 2 and "uplicate GPU" in str(err):
            pytest.skip("NCCL refuses two ranks on one GPU (Duplicate GPU detected): the two-rank tests run "
                        "on gloo over CUDA tensors")
        raise
    assert all("nccl" in o and "3.0" in o for o in out), out


# Both ranks compute on cuda:0. torch's DeviceMesh sets the current device to LOCAL_RANK, an invalid
# ordinal for rank 1 on a one-GPU machine, so the ranks say LOCAL_RANK=0 (two processes, one GPU).
ONE_GPU = {"LOCAL_RANK": "0"}


def _collective(rank: int, world: int, name: str) -> list[float]:
    """One gloo collective on CUDA tensors (what the two-rank tests below rely on)."""
    import torch.distributed as dist

    dev = torch.device("cuda", 0)
    x = torch.arange(4, dtype=torch.float32, device=dev) + 10 * rank
    if name == "all_reduce":
        dist.all_reduce(x)
        out = x
    elif name == "broadcast":
        dist.broadcast(x, src=0)
        out = x
    elif name == "all_gather_into_tensor":
        out = torch.empty(8, device=dev)
        dist.all_gather_into_tensor(out, x)
    elif name == "reduce_scatter_tensor":
        out = torch.empty(2, device=dev)
        dist.reduce_scatter_tensor(out, x)
    else:  # send/recv, as the pipeline's stages exchange activations
        if rank == 0:
            dist.send(x, dst=1)
            out = x
        else:
            out = torch.empty_like(x)
            dist.recv(out, src=0)
    torch.cuda.synchronize()
    return out.cpu().tolist()


COLLECTIVES = {"all_reduce": [[10.0, 12.0, 14.0, 16.0]] * 2, "broadcast": [[0.0, 1.0, 2.0, 3.0]] * 2,
               "all_gather_into_tensor": [[0.0, 1.0, 2.0, 3.0, 10.0, 11.0, 12.0, 13.0]] * 2,
               "reduce_scatter_tensor": [[10.0, 12.0], [14.0, 16.0]], "send_recv": [[0.0, 1.0, 2.0, 3.0]] * 2}


@pytest.mark.cuda_only
@pytest.mark.parametrize("name", list(COLLECTIVES))
def test_gloo_collectives_on_cuda_tensors(name: str) -> None:
    assert run_ranks(_collective, 2, args=(name,), env=ONE_GPU, timeout=120) == COLLECTIVES[name]


def _zero_stage(rank: int, world: int, stage: int) -> dict:
    """One ZeRO stage on 2 ranks (gloo over CUDA tensors on one GPU): losses and full weights."""
    import flexspeed

    model = make_model()
    cfg = zero_config(stage=stage, precision="fp32", gas=1, micro=4, world=world)
    engine, _, loader, _ = flexspeed.initialize(model=model, model_parameters=model.parameters(),
                                               training_data=make_dataset(), config=cfg)
    assert engine.device.type == DEV.type
    losses, it = [], iter(loader)
    for _ in range(STEPS):
        x, y = (t.to(engine.device) for t in next(it))
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return {"losses": losses, "state": {k: v.float().cpu() for k, v in full_state(engine.module).items()}}


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_zero_stage_on_two_ranks_sharing_the_gpu(stage: int) -> None:
    got = run_ranks(_zero_stage, 2, args=(stage,), env=ONE_GPU, timeout=180)
    batches = global_batches(make_dataset(), world=2, micro=4, gas=1, steps=STEPS)
    ref_losses, ref_state = reference_run(make_model(), batches, lr=LR, clip=CLIP)
    mean = [sum(r["losses"][k] for r in got) / 2 for k in range(STEPS)]
    torch.testing.assert_close(torch.tensor(mean), torch.tensor(ref_losses), rtol=0, atol=1e-5)
    for k, v in ref_state.items():
        torch.testing.assert_close(got[0]["state"][k], v, rtol=0, atol=WEIGHT_TOL_FP32, msg=lambda m, k=k: f"{k}: {m}")
        assert torch.equal(got[1]["state"][k], got[0]["state"][k])


def _tp_logits(rank: int, world: int) -> dict:
    import flexspeed
    from tests.gpu.test_cuda_inference import _llama, _padded

    model = _llama()
    ids = _padded()[0]
    with torch.no_grad():
        want = model(ids).logits
        engine = flexspeed.init_inference(copy.deepcopy(model), dtype="fp32", tensor_parallel={"tp_size": 2})
        got = engine(ids).logits.float().cpu()
        out = engine.generate(ids, max_new_tokens=5, min_new_tokens=5)
    return {"diff": (got - want).abs().max().item(), "device": engine.device.type,
            "tp": engine.tp_size, "tokens": out.cpu(),
            "local": sum(p.numel() for p in engine.module.parameters()) / sum(p.numel() for p in model.parameters())}


def test_tensor_parallel_inference_on_two_ranks_sharing_the_gpu() -> None:
    got = run_ranks(_tp_logits, 2, env=ONE_GPU, timeout=300)
    for r in got:
        assert r["diff"] < 1e-4 and r["tp"] == 2 and r["device"] == DEV.type, r
        assert r["local"] < 0.8  # each rank holds part of the split weights
    assert torch.equal(got[0]["tokens"], got[1]["tokens"])
