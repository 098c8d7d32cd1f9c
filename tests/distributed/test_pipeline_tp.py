"""Tensor parallelism inside pipeline stages: pp2 x tp2 (4 ranks) and dp2 x pp2 x tp2 (8 ranks, slow tier).

Each stage module is sharded over its tp group (``apply_tensor_parallel``, the derived plan:
``fc1`` column-, ``fc2`` row-parallel, so what a stage sends to the next is a whole replicated
tensor) and then wrapped by ZeRO over dp (TensorParallelDP at stages 0-1, FSDP2 on the 2-D
DTensors at 2-3). The single-process reference takes the same global batches with DeepSpeed's
WarmupLR schedule and clipping on the global norm. Tolerances: fp32 1e-5 (losses and weights);
bf16 against the reference under bf16 autocast with test_pipeline_zero's (losses 5e-4, weights 3e-2).
Observed at pp2 x tp2 (ZeRO 1 and 3): fp32 1.2e-7 (losses), 3e-8 (weights); bf16 1.6e-4 / 1.6e-4 (the
row-parallel layer rounds each rank's partial product to bf16 before the all-reduce).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from flexspeed.pipe import LayerSpec
from flexspeed.testing import run_ranks
from tests.distributed.test_pipeline import CLIP, GAS, MICRO, SEED, STEPS, config, set_deepspeed_lr

BF16_LOSS, BF16_WEIGHT = 5e-4, 3e-2
OUT = 16  # 16 outputs per sample: the bf16 loss averages 128 values, as test_pipeline_zero's 5e-4 assumes
SLOW = os.environ.get("FLEXSPEED_SLOW") == "1"


class Block(nn.Module):
    """A residual MLP block named as transformer MLPs are (fc1 column-, fc2 row-parallel)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(torch.tanh(self.fc1(x)))


def specs() -> list:
    return [LayerSpec(nn.Linear, 8, 16), LayerSpec(Block, 16), LayerSpec(Block, 16), LayerSpec(nn.Linear, 16, OUT)]


def reference_model() -> nn.Module:
    layers = []
    for i, spec in enumerate(specs()):
        torch.manual_seed(SEED + i)  # what seed_layers=True does on the owning stage
        layers.append(spec.build())
    return nn.Sequential(*layers)


def batch(step: int, dp: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    n = dp * GAS * MICRO
    return torch.randn(n, 8, generator=g), torch.randn(n, OUT, generator=g)


def micro_batches(step: int, dp: int, dp_rank: int) -> list:
    x, y = batch(step, dp)
    return [(x[(dp_rank * GAS + i) * MICRO:(dp_rank * GAS + i + 1) * MICRO],
             y[(dp_rank * GAS + i) * MICRO:(dp_rank * GAS + i + 1) * MICRO]) for i in range(GAS)]


def tp_config(zero: int, precision: str = "fp32", tp: int = 2) -> dict:
    return {**config("1f1b", 1, zero=zero, precision=precision), "tensor_parallel": {"autotp_size": tp}}


# ---- the ranks --------------------------------------------------------------------------------------
def make_engine(zero: int, precision: str = "fp32", tp: int = 2, pp: int = 2):
    import flexspeed
    from flexspeed.pipe import PipelineModule

    model = PipelineModule(specs(), num_stages=pp, loss_fn=F.mse_loss, seed_layers=True)
    engine, *_ = flexspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=tp_config(zero, precision, tp))
    return engine


def train(engine, steps: range) -> list[float]:
    dp = engine.dp_world_size
    return [float(engine.train_batch(iter(micro_batches(s, dp, engine.dp_rank)))) for s in steps]


def case(zero: int, precision: str = "fp32") -> dict:
    engine = make_engine(zero, precision)
    losses = train(engine, range(STEPS))
    params = list(engine.module.parameters())
    return {"losses": losses, "state": engine.module.to_sequential_state_dict(), "norm": engine.get_global_grad_norm(),
            "dims": (engine.parallel_dims.dp, engine.parallel_dims.pp, engine.parallel_dims.tp),
            "dtensors": sum(hasattr(p, "to_local") for p in params), "notes": list(engine._strategy.notes)}


def grid4(rank: int, world: int) -> dict | None:
    from tests.distributed import test_pipeline_tp_features as features

    out = {z: case(z) for z in ((0, 1, 2, 3) if SLOW else (1, 3))}
    out["bf16_1"] = case(1, "bf16")
    # tied embeddings + interleaved schedule + activation checkpointing, and fp16 (same spawn, no extra start-up)
    out["features"] = {name: features.run_case(*args) for name, args in features.CASES.items()}
    return out if rank == 0 else None


def grid8(rank: int, world: int) -> dict | None:
    out = {z: case(z) for z in (1, 3)}
    return out if rank == 0 else None


class OddBlock(Block):
    """fc1 with 33 outputs: tp 2 cannot split it."""

    def __init__(self, width: int) -> None:
        nn.Module.__init__(self)
        self.fc1 = nn.Linear(width, 33)
        self.fc2 = nn.Linear(33, width)


def refused(model) -> dict:
    import flexspeed
    from flexspeed.config.errors import ConfigError

    try:
        flexspeed.initialize(model=model, config=tp_config(1))
    except ConfigError as err:
        return {"key": err.key, "msg": str(err), "layers": sorted(model._modules),
                "sharded": any(hasattr(p, "to_local") for p in model.parameters())}
    return {"key": None, "msg": "initialized", "layers": [], "sharded": None}


def bad_plan(rank: int, world: int) -> dict:
    from flexspeed.pipe import PipelineModule

    odd = PipelineModule([LayerSpec(nn.Linear, 8, 16), LayerSpec(Block, 16), LayerSpec(OddBlock, 16)],
                         num_stages=2, loss_fn=F.mse_loss, partition_method="uniform")
    plain = PipelineModule([LayerSpec(nn.Linear, 8, 16), LayerSpec(nn.Tanh), LayerSpec(nn.Linear, 16, 16)],
                           num_stages=2, loss_fn=F.mse_loss, partition_method="uniform")
    return {"odd": refused(odd), "nothing": refused(plain)}


def test_a_stage_tp_cannot_split_stops_every_rank_before_anything_is_sharded():
    res = run_ranks(bad_plan, world_size=4, timeout=300)
    odd = [r for r, got in enumerate(res) if "2" in got["odd"]["layers"]]
    assert odd and len(odd) < 4, res
    for rank, both in enumerate(res):
        got = both["odd"]
        assert got["key"] == "tensor_parallel.autotp_size" and got["sharded"] is False, (rank, got)
        if rank in odd:  # names the layer and the numbers
            assert "fc1" in got["msg"] and "33" in got["msg"], got["msg"]
        else:  # the others name the ranks that failed
            assert f"rank(s) {odd}" in got["msg"], got["msg"]
        # a pipeline with no layer to split anywhere: refused on every rank, not silently replicated
        got = both["nothing"]
        assert got["key"] == "tensor_parallel.autotp_size" and got["sharded"] is False, (rank, got)
        assert "autotp_size=2" in got["msg"] and "no pipeline stage has a layer" in got["msg"], got["msg"]
        assert "Fix: set tensor_parallel.autotp_size to 1" in got["msg"], got["msg"]


# ---- the reference --------------------------------------------------------------------------------
def reference(dp: int, autocast: bool = False) -> tuple[list[float], dict]:
    from flexspeed.runtime.optimizers import build_optimizer

    model = reference_model()
    opt = build_optimizer("Adam", config("1f1b", 1)["optimizer"]["params"], model.parameters())
    losses = []
    for step in range(STEPS):
        x, y = batch(step, dp)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = F.mse_loss(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        set_deepspeed_lr(opt, step + 1)
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_matches(got: dict, losses: list[float], state: dict, what: str, loss_tol=1e-5, weight_tol=1e-5) -> None:
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(losses), rtol=0, atol=loss_tol,
                               msg=lambda m: f"{what} losses: {m}")
    assert set(got["state"]) == set(state), what
    for k, v in state.items():
        torch.testing.assert_close(got["state"][k], v, rtol=0, atol=weight_tol, msg=lambda m, k=k: f"{what} {k}: {m}")


@pytest.fixture(scope="module")
def grid4_results() -> dict:
    return run_ranks(grid4, world_size=4, timeout=600)[0]


def test_pp2_tp2_matches_the_single_process_reference(grid4_results):
    res = grid4_results
    losses, state = reference(1)
    for zero in (0, 1, 2, 3) if SLOW else (1, 3):
        got = res[zero]
        assert got["dims"] == (1, 2, 2), got["dims"]
        assert got["dtensors"] > 0, got["notes"]  # the stage's block layers are tensor-parallel
        assert any("ColwiseParallel" in n or "Colwise" in n for n in got["notes"]), got["notes"]
        assert_matches(got, losses, state, what=f"pp2 x tp2 ZeRO-{zero}")
        assert got["norm"] > CLIP  # clipping was active, on the norm over stages and tp shards
    losses, state = reference(1, autocast=True)
    assert_matches(res["bf16_1"], losses, state, what="pp2 x tp2 bf16", loss_tol=BF16_LOSS, weight_tol=BF16_WEIGHT)


@pytest.mark.parametrize("name", ["interleaved_checkpointed", "fp16"])
def test_pp2_tp2_with_tied_embeddings_interleaving_checkpointing_and_fp16(grid4_results, name):
    from tests.distributed.test_pipeline_tp_features import check_case

    check_case(name, grid4_results["features"][name])


@pytest.mark.skipif(not SLOW, reason="8 ranks: set FLEXSPEED_SLOW=1")
def test_dp2_pp2_tp2_matches_the_single_process_reference():
    res = run_ranks(grid8, world_size=8, timeout=900)[0]
    losses, state = reference(2)
    for zero in (1, 3):
        assert res[zero]["dims"] == (2, 2, 2)
        assert_matches(res[zero], losses, state, what=f"dp2 x pp2 x tp2 ZeRO-{zero}")


def test_training_moved_the_weights():
    start = {k: v.detach().clone() for k, v in reference_model().state_dict().items()}
    _, state = reference(1)
    assert any((state[k] - v).abs().max() > 1e-3 for k, v in start.items())
