"""DeepSpeed's stage-3 live-parameter knobs reach FSDP2: ``stage3_max_reuse_distance`` and
``stage3_max_live_parameters`` decide which blocks stay gathered from forward to backward
(``reshard_after_forward=False``), and the choice changes only when parameters are gathered,
never the numbers: the final weights of every setting agree exactly (rtol=atol=0) - the same
gathered values enter the same kernels, only the time of the all-gather differs.
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
    """Per block: are its parameters still whole (FSDP2 UNSHARDED) between forward and backward?"""
    out = []
    for block in strategy.blocks:
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
    return {"reshard": list(strategy.reshard), "gathered": gathered, "peak_gathered": peak_gathered,
            "losses": losses, "state": full_state(engine.module), "notes": list(strategy.notes)}


def _all(rank: int, world: int) -> dict:
    blocks, root = _numels(make_model())
    settings = {
        "default": {},  # DeepSpeed's defaults (1e9, 1e9): a tiny model stays gathered into backward
        "no_live": {"stage3_max_live_parameters": 0},
        "no_reuse": {"stage3_max_reuse_distance": 0},
        # block 1 is reused after 2 * root elements, block 0 after 2 * (block 1 + root): keep only block 1
        "last_only": {"stage3_max_reuse_distance": 2 * (blocks[1] + root)},
    }
    out = {name: _run(rank, world, zero, "fp32") for name, zero in settings.items()}
    out["bf16_default"] = _run(rank, world, {}, "bf16")
    out["bf16_no_live"] = _run(rank, world, {"stage3_max_live_parameters": 0}, "bf16")
    out["numels"] = (blocks, root)
    return out


def test_live_and_reuse_knobs_choose_which_blocks_stay_gathered():
    results = run_ranks(_all, world_size=2, timeout=300)
    r = results[0]
    expected = {"default": [False, False], "no_live": [True, True], "no_reuse": [True, True],
                "last_only": [True, False], "bf16_default": [False, False], "bf16_no_live": [True, True]}
    for name, reshard in expected.items():
        for rank_result in results:
            assert rank_result[name]["reshard"] == reshard, (name, rank_result[name]["reshard"])
            # FSDP2 really keeps (or frees) them between forward and backward
            assert rank_result[name]["gathered"] == [not x for x in reshard], (name, rank_result[name]["gathered"])
    assert any("2 of 2 block(s) stay gathered" in n for n in r["default"]["notes"]), r["default"]["notes"]
    # the live budget bounds what is held between forward and backward: nothing extra without one
    blocks, root = r["numels"]
    assert r["default"]["peak_gathered"] >= 4 * sum(blocks)  # fp32 blocks kept whole
    assert r["no_live"]["peak_gathered"] <= 4 * root  # only the root (FSDP2 keeps it into backward)
    assert r["bf16_no_live"]["peak_gathered"] < r["bf16_default"]["peak_gathered"]
    # when parameters are gathered never changes the numbers
    for name in ("no_live", "no_reuse", "last_only"):
        assert r[name]["losses"] == r["default"]["losses"], name
        for k, v in r["default"]["state"].items():
            torch.testing.assert_close(r[name]["state"][k], v, rtol=0, atol=0, msg=f"{name} {k}")
    assert r["bf16_no_live"]["losses"] == r["bf16_default"]["losses"]
