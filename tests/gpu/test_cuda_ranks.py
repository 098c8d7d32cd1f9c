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


def _zero_stages(rank: int, world: int) -> list[dict]:
    """Stages 0-3 in one group (gloo over CUDA tensors on one GPU); per stage the losses and full weights."""
    import flexspeed

    out = []
    for stage in (0, 1, 2, 3):
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
        out.append({"losses": losses, "state": {k: v.float().cpu() for k, v in full_state(engine.module).items()}})
    return out


def test_zero_stages_on_two_ranks_sharing_the_gpu() -> None:
    got = run_ranks(_zero_stages, 2, timeout=300)
    batches = global_batches(make_dataset(), world=2, micro=4, gas=1, steps=STEPS)
    ref_losses, ref_state = reference_run(make_model(), batches, lr=LR, clip=CLIP)
    for stage in range(4):
        mean = [sum(r[stage]["losses"][k] for r in got) / 2 for k in range(STEPS)]
        torch.testing.assert_close(torch.tensor(mean), torch.tensor(ref_losses), rtol=0, atol=1e-5,
                                   msg=lambda m, s=stage: f"stage {s}: {m}")
        for k, v in ref_state.items():
            torch.testing.assert_close(got[0][stage]["state"][k], v, rtol=0, atol=WEIGHT_TOL_FP32,
                                       msg=lambda m, s=stage, k=k: f"stage {s} {k}: {m}")
            assert torch.equal(got[1][stage]["state"][k], got[0][stage]["state"][k])


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
    got = run_ranks(_tp_logits, 2, timeout=300)
    for r in got:
        assert r["diff"] < 1e-4 and r["tp"] == 2 and r["device"] == DEV.type, r
        assert r["local"] < 0.8  # each rank holds part of the split weights
    assert torch.equal(got[0]["tokens"], got[1]["tokens"])
