"""DeepSpeed's stage-3 bucket and live-parameter knobs reach FSDP2.

``reduce_bucket_size`` / ``stage3_prefetch_bucket_size`` / ``stage3_max_live_parameters`` group the
blocks into FSDP2 units (one all-gather and one reduce-scatter each); ``stage3_max_reuse_distance``
and ``stage3_max_live_parameters`` decide which units stay gathered from forward to backward
(``reshard_after_forward=False``). Neither changes the numbers: the final weights of every setting
agree exactly (rtol=atol=0) - FSDP2 shards each parameter on its own whatever the grouping, the
same gathered values enter the same kernels and each gradient element is the same two-rank sum;
only the time and size of the collectives differ.
"""

from __future__ import annotations

import torch

from flexspeed.testing import run_ranks
from tests.distributed._parity import make_dataset, make_model
from tests.distributed.test_zero_parity import full_state, zero_config

THRESHOLD = 100  # zero_config's stage3_param_persistence_threshold: LayerNorm weights stay whole


def _numels(model) -> tuple[list[int], int]:
    """Sharded elements per block and of the root's own parameters (what reshard_plan is given)."""
    blocks = [sum(p.numel() for p in b.parameters() if p.numel() >= THRESHOLD) for b in model.transformer.h]
    total = sum(p.numel() for p in model.parameters() if p.numel() >= THRESHOLD)
    return blocks, total - sum(blocks)


def _gathered_after_forward(strategy) -> list[bool]:
    """Per unit: are its parameters still whole (FSDP2 UNSHARDED) between forward and backward?"""
    out = []
    for block in strategy.units:
        group = block._get_fsdp_state()._fsdp_param_group
        out.append(all(fp.sharded_state.name == "UNSHARDED" for fp in group.fsdp_params))
    return out


def _run(rank: int, world: int, zero: dict, precision: str) -> dict:
    import flexspeed

    model = make_model()
    cfg = zero_config(stage=3, precision=precision, gas=2, micro=4, world=world, **zero)
    engine, _, loader, _ = flexspeed.initialize(model=model, model_parameters=model.parameters(),
                                               training_data=make_dataset(), config=cfg)
    strategy = engine._strategy
    gathered, peak_gathered, losses = None, 0, []
    for x, y in loader:
        loss = engine(x, y)
        gathered = _gathered_after_forward(strategy)
        peak_gathered = max(peak_gathered, strategy.memory_breakdown(engine.optimizer)["gathered_parameters"])
        engine.backward(loss)
        engine.step()
        losses.append(float(loss))
        if len(losses) == 6:
            break
    return {"reshard": list(strategy.reshard), "gathered": gathered, "units": len(strategy.units),
            "fused": [(g["fused"], g["foreach"]) for g in engine.optimizer.param_groups], "peak_gathered": peak_gathered,
            "losses": losses, "state": full_state(engine.module), "notes": list(strategy.notes)}


def _all(rank: int, world: int) -> dict:
    blocks, root = _numels(make_model())
    per_block = {"reduce_bucket_size": 1}  # a bucket smaller than a block: every block its own unit
    settings = {
        "default": per_block,  # DeepSpeed's budgets (1e9, 1e9): a tiny model stays gathered into backward
        "no_live": {**per_block, "stage3_max_live_parameters": 0},
        "no_reuse": {**per_block, "stage3_max_reuse_distance": 0},
        # block 1 is reused after 2 * root elements, block 0 after 2 * (block 1 + root): keep only block 1
        "last_only": {**per_block, "stage3_max_reuse_distance": 2 * (blocks[1] + root)},
        "pair": {"reduce_bucket_size": sum(blocks)},  # both blocks one unit, the root's parameters apart
        "one_unit": {},  # DeepSpeed's bucket sizes (5e8, 5e7): the whole model is the root's unit
        "nothing_whole": {"stage3_param_persistence_threshold": 0},  # only DTensor shards in the group
    }
    out = {name: _run(rank, world, zero, "fp32") for name, zero in settings.items()}
    out["bf16_default"] = _run(rank, world, per_block, "bf16")
    out["bf16_no_live"] = _run(rank, world, {"stage3_max_live_parameters": 0}, "bf16")
    out["bf16_one_unit"] = _run(rank, world, {}, "bf16")
    out["numels"] = (blocks, root)
    return out


def test_bucket_and_live_knobs_choose_units_and_which_stay_gathered():
    results = run_ranks(_all, world_size=2, timeout=300)
    r = results[0]
    expected = {"default": [False, False], "no_live": [True, True], "no_reuse": [True, True],
                "last_only": [True, False], "pair": [False], "one_unit": [], "bf16_default": [False, False],
                "bf16_no_live": [True, True], "bf16_one_unit": []}
    for name, reshard in expected.items():
        for rank_result in results:
            assert rank_result[name]["reshard"] == reshard, (name, rank_result[name]["reshard"])
            assert rank_result[name]["units"] == len(reshard), (name, rank_result[name]["units"])
            # FSDP2 really keeps (or frees) them between forward and backward
            assert rank_result[name]["gathered"] == [not x for x in reshard], (name, rank_result[name]["gathered"])
    assert any("2 of 2 unit(s) stay gathered" in n for n in r["default"]["notes"]), r["default"]["notes"]
    assert any("2 block(s) in 1 unit(s)" in n for n in r["pair"]["notes"]), r["pair"]["notes"]
    assert any("2 block(s) in 0 unit(s) (all in the root's)" in n for n in r["one_unit"]["notes"]), \
        r["one_unit"]["notes"]
    # the live budget bounds what is held between forward and backward: nothing extra without one
    blocks, root = r["numels"]
    assert r["default"]["peak_gathered"] >= 4 * sum(blocks)  # fp32 blocks kept whole
    assert r["no_live"]["peak_gathered"] <= 4 * root  # only the root (FSDP2 keeps it into backward)
    assert r["bf16_no_live"]["peak_gathered"] < r["bf16_default"]["peak_gathered"]
    # AdamW over DTensor shards only runs torch's fused kernel; a group mixing whole parameters keeps
    # the per-tensor path (foreach refuses mixed lists); both are the same update
    assert r["nothing_whole"]["fused"] == [(True, False)], r["nothing_whole"]["fused"]
    assert r["default"]["fused"] == [(None, False)], r["default"]["fused"]
    torch.testing.assert_close(r["nothing_whole"]["losses"], r["default"]["losses"], rtol=1e-5, atol=1e-6)
    # neither the grouping nor when parameters are gathered changes the numbers
    for ref, names in (("default", ("no_live", "no_reuse", "last_only", "pair", "one_unit")),
                       ("bf16_default", ("bf16_no_live", "bf16_one_unit"))):
        for name in names:
            assert r[name]["losses"] == r[ref]["losses"], name
            for k, v in r[ref]["state"].items():
                torch.testing.assert_close(r[name]["state"][k], v, rtol=0, atol=0, msg=f"{name} {k}")
