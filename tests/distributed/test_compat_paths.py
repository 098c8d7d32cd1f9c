"""On 2 gloo ranks: ``flexspeed.utils.safe_get_full_*`` at ZeRO stages 1-3 (optimizer state owned by
one rank at stages 1-2, the gradient too at stage 2, DTensor shards at 3) equal a one-process reference, and
``flexspeed.checkpointing`` with ``partition_activations`` keeps half of each checkpointed input
per model-parallel rank with gradients equal to the plain run. One spawned group runs every case."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from flexspeed.testing import run_ranks

WORLD = 2


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 4))


def _batch(rank: int) -> torch.Tensor:
    return torch.randn(4, 8, generator=torch.Generator().manual_seed(10 + rank))


def _reference() -> dict:
    """One process over both ranks' batches: gradients and Adam state after one step."""
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, eps=1e-3, weight_decay=0.0)
    x = torch.cat([_batch(r) for r in range(WORLD)])
    model(x).pow(2).mean().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    opt.step()
    return {"grads": grads, "params": [p.detach().clone() for p in model.parameters()],
            "exp_avg_sq": [opt.state[p]["exp_avg_sq"].clone() for p in model.parameters()]}


def _safe_get_case(rank: int, stage: int) -> dict:
    import torch.distributed as dist

    import flexspeed
    from flexspeed.utils import (safe_get_full_fp32_param, safe_get_full_grad, safe_get_full_optimizer_state,
                                 safe_get_local_fp32_param, safe_set_full_fp32_param)

    cfg = {"train_micro_batch_size_per_gpu": 4, "steps_per_print": 1000,
           "optimizer": {"type": "AdamW", "params": {"lr": 0.01, "eps": 1e-3}},
           "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}
    engine, opt, *_ = flexspeed.initialize(model=_model(), config=cfg)
    params = list(engine.module.parameters())
    engine.backward(engine(_batch(rank)).pow(2).mean())
    grads = [safe_get_full_grad(p) for p in params]
    engine.step()
    held = sum(1 for p in params if opt.state.get(p))
    out = {"grads": grads, "params": [safe_get_full_fp32_param(p) for p in params], "kinds": [type(p).__name__ for p in params],
           "exp_avg_sq": [safe_get_full_optimizer_state(p, "exp_avg_sq") for p in params],
           "held": held, "local": [safe_get_local_fp32_param(p).numel() for p in params]}
    safe_set_full_fp32_param(params[0], torch.full(tuple(params[0].shape), float(stage)))
    out["after_set"] = safe_get_full_fp32_param(params[0])
    dist.barrier()
    return out


class _WorldAsModelParallel:
    """A Megatron-style mpu whose model-parallel group is the whole world."""

    def get_model_parallel_rank(self) -> int:
        import torch.distributed as dist

        return dist.get_rank()

    def get_model_parallel_world_size(self) -> int:
        import torch.distributed as dist

        return dist.get_world_size()

    def get_model_parallel_group(self):  # noqa: ANN201 - a ProcessGroup
        import torch.distributed as dist

        return dist.group.WORLD


def _partition_case(rank: int) -> dict:
    import flexspeed

    ck = flexspeed.checkpointing
    torch.manual_seed(0)
    blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16)) for _ in range(3))
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))  # 80 elements: 40 per rank

    def run(use: bool) -> list[torch.Tensor]:
        blocks.zero_grad()
        h = x * 1.0
        for b in blocks:
            h = ck.checkpoint(b, h) if use else b(h)
        h.pow(2).mean().backward()
        return [p.grad.clone() for p in blocks.parameters()]

    plain = run(False)
    ck.configure(_WorldAsModelParallel(), partition_activations=True)
    kept = ck._KeptInputs(ck.settings())  # what a checkpoint keeps of its input x, and gets back
    packed = kept._pack(x * 1.0)
    restored = kept._unpack(packed)
    parted = run(True)
    return {"equal": all(torch.equal(a, b) for a, b in zip(plain, parted)), "kept": packed[3].numel(),
            "restored": torch.equal(restored, x), "partitions": ck.settings().partitions}


def _all_cases(rank: int, world_size: int) -> dict:
    out = {"partition": _partition_case(rank)}
    for stage in (1, 2, 3):  # initialize() joins the harness's process group each time
        out[stage] = _safe_get_case(rank, stage)
    return out


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_ranks(_all_cases, world_size=WORLD, timeout=300)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_safe_get_full_matches_one_process(results, stage):
    ref = _reference()
    # tolerance: 2 ranks reduce the two half-batch gradients in a different order than one process
    # sums the whole batch (fp32 rounding only); eps=1e-3 keeps Adam's first update smooth in the
    # gradient (with eps=1e-8 it is lr * sign(g), which rounding can flip where g is ~0)
    tol = dict(rtol=1e-5, atol=1e-6)
    for rank in range(WORLD):
        got = results[rank][stage]
        for name in ("grads", "params", "exp_avg_sq"):
            for a, b in zip(got[name], ref[name]):
                assert a is not None, f"rank {rank} stage {stage}: {name} missing"
                torch.testing.assert_close(a, b, **tol, msg=lambda m: f"rank {rank} stage {stage} {name}: {m}")
        assert torch.equal(got["after_set"], torch.full_like(got["after_set"], float(stage)))
    total = sum(p.numel() for p in _model().parameters())
    if stage in (1, 2):  # each parameter's Adam state (stage 2: gradient too) on one rank only, yet every rank got it
        assert results[0][stage]["held"] + results[1][stage]["held"] == len(ref["grads"])
        assert 0 < results[0][stage]["held"] < len(ref["grads"])
        assert results[0][stage]["local"] == [p.numel() for p in _model().parameters()]  # whole parameters
    else:  # shards: each rank holds half of every parameter
        assert sum(results[0][stage]["local"]) + sum(results[1][stage]["local"]) == total
        assert sum(results[0][stage]["local"]) < total


def test_partitioned_activations(results):
    for rank in range(WORLD):
        part = results[rank]["partition"]
        assert part["partitions"] and part["equal"], "gradients equal the plain run (bitwise: same kernels)"
        assert part["kept"] == 40, "each rank keeps half of an 80-element block input"
        assert part["restored"], "backward all-gathers the whole input back"
