"""A pipeline's stages get the data-parallel engine's ZeRO: dp2 x pp2 with ZeRO stages 1, 2 and 3.

One spawned group of 4 ranks (2 pipeline stages x 2 data-parallel replicas) trains the MLP and the
tied-embedding model of ``test_pipeline`` at each stage (each stage module wrapped by
``apply_zero(..., group=dp)``: DDP + sharded optimizer at 1, FSDP2 at 2 and 3), plus stage 3 with
the interleaved schedule and in bf16. The single-process reference takes the same global batches
with DeepSpeed's WarmupLR schedule. Tolerances: fp32 1e-5 (losses and weights); bf16 against the
same reference under bf16 autocast, losses 5e-4 as in test_zero_parity and weights 3e-2 as in
test_pipeline's bf16 case.
"""

from __future__ import annotations

import pytest
import torch

from flexspeed.testing import run_ranks
from tests.distributed.test_pipeline import (
    CLIP,
    KINDS,
    STEPS,
    assert_matches,
    config,
    global_batch,
    make_engine,
    ref_state,
    reference,
    reference_model,
    set_deepspeed_lr,
    train,
)

BF16_LOSS, BF16_WEIGHT = 5e-4, 3e-2


def _case(kind: str, schedule: str, virtual: int, zero: int, precision: str = "fp32") -> dict:
    engine, _ = make_engine(kind, schedule, virtual, 2, zero=zero, precision=precision)
    losses = train(engine, kind, range(STEPS), 2)
    params = list(engine.module.parameters())
    return {"losses": losses, "state": engine.module.to_sequential_state_dict(),
            "sharded": sum(hasattr(p, "to_local") for p in params), "params": len(params),
            "opt_states": len(engine.optimizer.state), "stage": engine.zero_optimization_stage(),
            "norm": engine.get_global_grad_norm(), "dp": engine.dp_world_size, "wrapped": engine.zero_strategy.describe(),
            "memory": engine.memory_breakdown()}


def zero_grid(rank: int, world: int) -> dict | None:
    out = {}
    for zero in (1, 2, 3):
        for kind in ("mlp", "tied"):
            out[(kind, zero)] = _case(kind, "1f1b", 1, zero)
    out["interleaved3"] = _case("mlp", "interleaved_1f1b", 2, 3)
    out["bf16_3"] = _case("mlp", "1f1b", 1, 3, precision="bf16")
    out["bf16_1"] = _case("mlp", "1f1b", 1, 1, precision="bf16")
    return out if rank == 0 else None


def reference_bf16(kind: str) -> tuple[list[float], dict]:
    """``reference`` under bf16 autocast (forward and loss), fp32 weights and optimizer."""
    from flexspeed.runtime.optimizers import build_optimizer

    model = reference_model(kind)
    opt = build_optimizer("Adam", config("1f1b", 1)["optimizer"]["params"], model.parameters())
    loss_fn = KINDS[kind][1]
    losses = []
    for step in range(STEPS):
        x, y = global_batch(kind, step, 2)
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = loss_fn(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        set_deepspeed_lr(opt, step + 1)
        opt.step()
        losses.append(loss.item())
    return losses, ref_state(kind, model)


@pytest.fixture(scope="module")
def grid() -> dict:
    return run_ranks(zero_grid, world_size=4, timeout=600)[0]


def test_dp2_pp2_zero_stages_match_the_single_process_reference(grid):
    for kind in ("mlp", "tied"):
        losses, states = reference(kind, [2] * STEPS)
        for zero in (1, 2, 3):
            got = grid[(kind, zero)]
            assert got["stage"] == zero and got["dp"] == 2, got["wrapped"]
            assert_matches(got, losses, states[-1], what=f"{kind} ZeRO-{zero} dp2 x pp2")
            assert got["norm"] > CLIP  # clipping was active, on the global norm over stages and shards
    losses, states = reference("mlp", [2] * STEPS)
    assert_matches(grid["interleaved3"], losses, states[-1], what="interleaved ZeRO-3")


def test_each_zero_stage_holds_what_it_should(grid):
    z1, z2, z3 = (grid[("mlp", s)] for s in (1, 2, 3))
    assert 0 < z1["opt_states"] < z1["params"] and z1["sharded"] == 0  # stage 1: optimizer state for its share
    assert z2["sharded"] == z2["params"] and "FullyShardedDP" in z2["wrapped"]  # stages 2-3: FSDP2 shards
    assert z3["sharded"] == z3["params"]
    # per-rank bytes (engine.memory_breakdown, the data-parallel engine's): stage 3 holds about half of
    # stage 1's parameters over 2 replicas, and stages 1-3 about half of the optimizer state
    m1, m3 = z1["memory"], z3["memory"]
    assert m3["parameters"] < 0.6 * m1["parameters"], (m1, m3)
    assert m3["optimizer_states"] < 0.6 * 2 * m1["parameters"], (m1, m3)


def test_bf16_zero_stages_match_the_autocast_reference(grid):
    losses, state = reference_bf16("mlp")
    for key in ("bf16_1", "bf16_3"):
        got = grid[key]
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(losses), rtol=0, atol=BF16_LOSS,
                                   msg=lambda m, key=key: f"{key} losses: {m}")
        for k, v in state.items():
            torch.testing.assert_close(got["state"][k], v, rtol=0, atol=BF16_WEIGHT,
                                       msg=lambda m, k=k: f"{key} {k}: {m}")


def test_training_moved_the_weights():
    # the comparisons above would pass vacuously if training did nothing
    start = ref_state("mlp", reference_model("mlp"))
    _, states = reference("mlp", [2] * STEPS)
    assert any((states[-1][k] - v).abs().max() > 1e-3 for k, v in start.items())
