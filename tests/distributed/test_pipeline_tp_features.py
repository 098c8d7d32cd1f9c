"""Tensor parallelism inside pipeline stages with the pipeline's other features, pp2 x tp2 (4 ranks, gloo).

A tied-embedding language model (``TiedLayerSpec`` embedding at stage 0, the same weight as the
LM head at the last stage) with three MLP blocks (``fc1`` column-, ``fc2`` row-parallel) trains
``STEPS`` steps under

- the plain 1F1B schedule (the tie: the embedding stays replicated over tp and its gradient is
  summed over the two stages holding it, per tp rank),
- the interleaved 1F1B schedule with two virtual stages (two chunks per rank, each sharded),
- ``activation_checkpoint_interval=1`` (every layer recomputed in backward, its tp all-reduce too),
- fp16 with dynamic loss scaling (initial scale 2**8; overflow agreed by every rank),

and each run is compared with one process training the same model on the same seeds and global
batches (DeepSpeed's WarmupLR, clipping on the global norm). Tolerances, against the fp32
reference: fp32 1e-5 on losses and weights (observed 1.9e-6 on losses of ~2.8, 3e-8 on weights:
the row-parallel sum adds the two partial products in another order); fp16 3e-3 on losses and
1e-3 on weights (observed 9.4e-4 / 1.5e-4: fp16 rounding of activations and gradients). The
weights move 6.3e-3 over the run, so every bound is tighter than the training itself.

The default tier runs ``CASES`` (tied + interleaved + checkpointed together, and fp16) inside
test_pipeline_tp's 4-rank group, which is spawned anyway (spawning 4 ranks costs ~15-40 s on a
busy machine); this file's own group, slow tier, runs each feature alone (ZeRO-3 with
checkpointing) and the default cases again.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from flexspeed.pipe import LayerSpec, TiedLayerSpec
from flexspeed.testing import run_ranks
from tests.distributed.test_pipeline import CLIP, GAS, MICRO, STEPS, SEQ, VOCAB, TiedReference, config, \
    lm_head, set_deepspeed_lr, token_ce
from tests.distributed.test_pipeline_tp import Block

HID = 16
TOL = {"fp32": (1e-5, 1e-5), "fp16": (3e-3, 1e-3)}  # (losses, weights)
CASES = {  # name: (schedule, virtual stages, activation_checkpoint_interval, precision, zero stage)
    "interleaved_checkpointed": ("interleaved_1f1b", 2, 1, "fp32", 1),
    "fp16": ("1f1b", 1, 0, "fp16", 1),
}
SLOW_CASES = {
    "tied_1f1b": ("1f1b", 1, 0, "fp32", 1),
    "interleaved": ("interleaved_1f1b", 2, 0, "fp32", 1),
    "checkpointed": ("1f1b", 1, 1, "fp32", 3),
}


def specs() -> list:
    return [TiedLayerSpec("embed", nn.Embedding, VOCAB, HID), LayerSpec(Block, HID), LayerSpec(Block, HID),
            LayerSpec(Block, HID), TiedLayerSpec("embed", nn.Embedding, VOCAB, HID, forward_fn=lm_head)]


def Reference() -> TiedReference:  # noqa: N802 - a model class's stand-in
    """The same model in one process: one embedding used at both ends, layer i seeded with SEED + i."""
    return TiedReference(specs())


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    n = GAS * MICRO
    return torch.randint(0, VOCAB, (n, SEQ), generator=g), torch.randint(0, VOCAB, (n, SEQ), generator=g)


def micro_batches(step: int) -> list:
    x, y = batch(step)
    return [(x[i * MICRO:(i + 1) * MICRO], y[i * MICRO:(i + 1) * MICRO]) for i in range(GAS)]


# ---- the ranks --------------------------------------------------------------------------------------
def run_case(schedule: str, virtual: int, ckpt: int, precision: str, zero: int) -> dict:
    import flexspeed
    from flexspeed.pipe import PipelineModule

    model = PipelineModule(specs(), num_stages=2, loss_fn=token_ce, seed_layers=True, partition_method="uniform",
                           activation_checkpoint_interval=ckpt)
    cfg = {**config(schedule, virtual, zero=zero, precision=precision), "tensor_parallel": {"autotp_size": 2}}
    engine, *_ = flexspeed.initialize(model=model, config=cfg)
    losses = [float(engine.train_batch(iter(micro_batches(s)))) for s in range(STEPS)]
    return {"losses": losses, "state": engine.module.to_sequential_state_dict(),
            "dims": (engine.parallel_dims.dp, engine.parallel_dims.pp, engine.parallel_dims.tp),
            "dtensors": sum(hasattr(p, "to_local") for p in engine.module.parameters()),
            "scale": engine.loss_scale if precision == "fp16" else None,
            "checkpoint_interval": min(sm.checkpoint_interval for sm in engine.module.stage_modules),
            "notes": list(engine._strategy.notes)}


def grid(rank: int, world: int) -> dict | None:
    out = {name: run_case(*args) for name, args in {**CASES, **SLOW_CASES}.items()}
    return out if rank == 0 else None


# ---- the reference ----------------------------------------------------------------------------------
def reference() -> tuple[list[float], dict]:
    from flexspeed.runtime.optimizers import build_optimizer

    model = Reference()
    opt = build_optimizer("Adam", config("1f1b", 1)["optimizer"]["params"], model.parameters())
    losses = []
    for step in range(STEPS):
        x, y = batch(step)
        opt.zero_grad()
        loss = token_ce(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        set_deepspeed_lr(opt, step + 1)
        opt.step()
        losses.append(loss.item())
    return losses, model.sequential_state()


@pytest.fixture(scope="module")
def results() -> dict:
    return run_ranks(grid, world_size=4, timeout=600)[0]


@pytest.mark.slow
@pytest.mark.parametrize("name", [*CASES, *SLOW_CASES])
def test_pp2_tp2_with_pipeline_features_matches_the_single_process_reference(results, name):
    check_case(name, results[name])


def check_case(name: str, got: dict) -> None:
    """``got`` (rank 0's :func:`run_case` result) against the single-process reference, at ``TOL``."""
    losses, state = reference()
    _, virtual, ckpt, precision, _ = {**CASES, **SLOW_CASES}[name]
    loss_tol, weight_tol = TOL[precision]
    assert got["dims"] == (1, 2, 2) and got["dtensors"] > 0, (got["dims"], got["notes"])
    assert sum("tensor parallelism tp=2" in n for n in got["notes"]) == virtual, got["notes"]  # each chunk sharded
    assert got["checkpoint_interval"] == ckpt
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(losses), rtol=0, atol=loss_tol,
                               msg=lambda m: f"{name} losses: {m}")
    assert set(got["state"]) == set(state), name
    for k, v in state.items():
        torch.testing.assert_close(got["state"][k].float(), v, rtol=0, atol=weight_tol,
                                   msg=lambda m, k=k: f"{name} {k}: {m}")
    torch.testing.assert_close(got["state"]["0.weight"], got["state"]["4.weight"], rtol=0, atol=0)  # still tied
    if precision == "fp16":
        assert got["scale"] == 2.0 ** 8  # dynamic loss scaling on, at the config's initial scale (no overflow)


def test_the_reference_moves_the_tied_weight():
    _, state = reference()
    assert (state["0.weight"] - Reference().sequential_state()["0.weight"]).abs().max() > 1e-3
