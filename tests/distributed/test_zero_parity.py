"""ZeRO stages 0-3 x {fp32, bf16, fp16} x gradient accumulation {1, 2}, clipping on, through
``flexspeed.initialize`` at world sizes 2 and 4, against one plain-PyTorch process on the same
global batches.

Tolerances, and why:
- fp32: per-step losses and every final weight within 1e-5 absolute. Every stage computes the
  same mean gradient; only the order of the cross-rank sums differs (observed <= 2e-6).
- bf16 / fp16: the reference runs the same autocast, so each sample's forward and backward use the
  same kernels on the same values; what differs is that a rank's matmuls see a quarter or half of
  the batch (the CPU kernels block their 16-bit work differently) and the order of the gradient
  sums. Per-step losses (means over 2,048 tokens) agree within 5e-4 (bf16) and 2e-4 (fp16)
  absolute on a loss of ~4.2 (observed <= 6e-5 and 2e-5: 16-bit rounding is 2^-8 and 2^-11
  relative per value, and the mean averages it down). Single weights are not compared: Adam
  turns a flipped rounding in an element whose gradient is ~0 into a whole lr-sized step (the
  observed max is ~2.5 steps). Instead the weight difference, as a fraction of how far the
  reference moved from the initial weights, must stay under 10% (observed 2-4%). Stage 1 must
  track stage 0 within 1e-4 in loss (observed ~1e-6: the same compute). Stages 2-3 all-gather
  16-bit parameters (FSDP2 ``param_dtype``) and compute on them - embeddings and residual sums
  in 16 bits, as DeepSpeed's 16-bit runs do - so they track stage 0 within the reference tolerance
  above (observed <= 2e-4 in bf16).
- fp16 uses a dynamic loss scale starting at 2^8 (exact power-of-two scaling; no overflow here).
"""

from __future__ import annotations

import pytest
import torch

from flexspeed.testing import run_ranks
from tests.compat.ds_reference import deepspeed_warmup_lr
from tests.distributed._parity import global_batches, make_dataset, make_model, reference_run

STEPS, LR, CLIP = 4, 1e-3, 0.5
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# absolute tolerance on per-step losses; 16-bit weights: relative to the reference's update
LOSS_TOL = {"fp32": 1e-5, "bf16": 5e-4, "fp16": 2e-4}
WEIGHT_TOL_FP32, UPDATE_REL_TOL_16BIT, STAGE_LOSS_TOL_16BIT = 1e-5, 0.10, 1e-4


def zero_config(*, stage: int, precision: str, gas: int, micro: int, world: int, **zero: object) -> dict:
    cfg = {
        "train_batch_size": micro * gas * world,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0}},
        "gradient_clipping": CLIP,
        # threshold 100 keeps the LayerNorm weights (32 elements) whole at stage 3: both kinds mix
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 100, **zero},
        "steps_per_print": 1000,
    }
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    if precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8}
    return cfg


def full_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The module's state dict with DTensor shards gathered (a collective: every rank calls it)."""
    out = {}
    for k, v in module.state_dict().items():
        out[k] = (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
    return out


def train(case: dict, rank: int, world: int) -> dict:
    import flexspeed

    gas, micro = case["gas"], case["micro"]
    model = make_model()
    cfg = zero_config(stage=case["stage"], precision=case["precision"], gas=gas, micro=micro, world=world,
                      **case.get("zero", {}))
    engine, _, loader, _ = flexspeed.initialize(model=model, model_parameters=model.parameters(),
                                               training_data=make_dataset(), config=cfg)
    losses, acc = [], 0.0
    it = iter(loader)
    for _ in range(STEPS * gas):
        x, y = next(it)
        loss = engine(x, y)
        engine.backward(loss)
        acc += loss.item() / gas
        engine.step()
        if engine.micro_steps % gas == 0:
            losses.append(acc)
            acc = 0.0
    assert engine.global_steps == STEPS and engine.skipped_steps == 0, (engine.global_steps, engine.skipped_steps)
    return {"losses": losses, "state": full_state(engine.module), "norm": engine.get_global_grad_norm()}


def _grid(rank: int, world: int, cases: list[dict]) -> list[dict]:
    return [train(case, rank, world) for case in cases]


def _cases(stages: tuple[int, ...], micro: int) -> list[dict]:
    return [{"stage": s, "precision": p, "gas": g, "micro": micro}
            for s in stages for p in DTYPES for g in (1, 2)]


def _report(got: list[float], ref: list[float], state: dict, ref_state: dict) -> str:
    dl = max(abs(a - b) for a, b in zip(got, ref))
    dw = max(float((state[k] - v).abs().max()) for k, v in ref_state.items())
    return f"max |loss diff| {dl:.2e}, max |weight diff| {dw:.2e}, update-relative {_update_rel(state, ref_state):.3f}"


def _update_rel(state: dict, ref_state: dict) -> float:
    """|w - w_ref| / |w_ref - w_initial| over all weights as one vector."""
    w0 = make_model().state_dict()
    num = sum(float((state[k] - v).double().norm() ** 2) for k, v in ref_state.items())
    den = sum(float((v - w0[k]).double().norm() ** 2) for k, v in ref_state.items())
    return (num / den) ** 0.5


def _check(results: list[list[dict]], cases: list[dict], world: int) -> None:
    ds = make_dataset()
    refs: dict[tuple, tuple] = {}
    stage0: dict[tuple, list[float]] = {}
    for i, case in enumerate(cases):
        key = (case["precision"], case["gas"])
        if key not in refs:
            batches = global_batches(ds, world=world, micro=case["micro"], gas=case["gas"], steps=STEPS)
            refs[key] = reference_run(make_model(), batches, lr=LR, clip=CLIP,
                                      autocast_dtype=DTYPES[case["precision"]])
        ref_losses, ref_state = refs[key]
        # the global loss is the mean over ranks of their (accumulation-averaged) losses
        got = [sum(r[i]["losses"][k] for r in results) / world for k in range(STEPS)]
        state = results[0][i]["state"]
        msg = f"world={world} {case}: {_report(got, ref_losses, state, ref_state)}"
        torch.testing.assert_close(torch.tensor(got), torch.tensor(ref_losses), rtol=0,
                                   atol=LOSS_TOL[case["precision"]], msg=msg)
        for r in results[1:]:  # every rank ends with the same full weights and the same norm
            for k, v in state.items():
                torch.testing.assert_close(r[i]["state"][k], v, rtol=0, atol=0, msg=f"{msg} ({k})")
            assert r[i]["norm"] == results[0][i]["norm"], msg
        if case["precision"] == "fp32":
            for k, v in ref_state.items():
                torch.testing.assert_close(state[k], v, rtol=0, atol=WEIGHT_TOL_FP32, msg=f"{msg} ({k})")
            continue
        assert _update_rel(state, ref_state) < UPDATE_REL_TOL_16BIT, msg
        if case["stage"] == 0:
            stage0[key] = got
        elif key in stage0:
            # stages 2-3 compute on the 16-bit parameters FSDP2 gathers (embeddings and residuals in 16 bits,
            # as DeepSpeed's 16-bit runs): they track stage 0's autocast within the reference tolerance
            tol = STAGE_LOSS_TOL_16BIT if case["stage"] == 1 else LOSS_TOL[case["precision"]]
            torch.testing.assert_close(torch.tensor(got), torch.tensor(stage0[key]), rtol=0, atol=tol,
                                       msg=f"{msg} vs stage 0")


# ---- features checked in the same world-size-2 group -------------------------------------------
OVERFLOW_WARMUP = {"warmup_min_lr": LR / 10, "warmup_max_lr": LR, "warmup_num_steps": 10, "warmup_type": "linear"}


def overflow_run(stage: int, rank: int, world: int) -> list[dict]:
    """fp16 with an injected overflow at steps 2 and 3; a record per step (all ranks)."""
    import flexspeed

    model = make_model()
    cfg = zero_config(stage=stage, precision="fp16", gas=1, micro=4, world=world)
    cfg["fp16"].update(hysteresis=1)
    cfg["scheduler"] = {"type": "WarmupLR", "params": OVERFLOW_WARMUP}
    engine, _, loader, sched = flexspeed.initialize(model=model, model_parameters=model.parameters(),
                                                   training_data=make_dataset(), config=cfg)
    records = []
    it = iter(loader)
    for step in range(4):
        x, y = next(it)
        before = full_state(engine.module)
        loss = engine(x, y)
        if step == 1 and rank == 1:  # a real overflow on one rank; the reduction spreads it
            loss = loss * float("inf")
        engine.backward(loss)
        if step == 2 and rank == 1 and stage >= 2:  # only rank 1's shard: the flag must be max-reduced
            # (stage 2: the gradients rank 1 owns; stage 3: rank 1's DTensor shard)
            g = next(p.grad for p in engine.module.parameters() if p.grad is not None and
                     (stage == 2 or hasattr(p.grad, "to_local") and p.grad.to_local().numel()))
            (g.to_local() if hasattr(g, "to_local") else g).view(-1)[0] = float("inf")
        scale, lr, it_before = engine.loss_scale, engine.get_lr(), sched.last_batch_iteration
        engine.step()
        after = full_state(engine.module)
        records.append({
            "unchanged": all(torch.equal(before[k], after[k]) for k in before),
            "finite": all(bool(torch.isfinite(v).all()) for v in after.values()),
            "skipped": engine.skipped_steps, "global_steps": engine.global_steps,
            "scale_before": scale, "scale_after": engine.loss_scale,
            "lr_before": lr, "lr_after": engine.get_lr(),
            "sched_stepped": sched.last_batch_iteration != it_before,
        })
    return records


def client_optimizer_run(stage: int, rank: int, world: int) -> dict:
    """A client AdamW made on the unsharded parameters, two param groups, plus a client LambdaLR."""
    import flexspeed

    model = make_model()
    small = [p for p in model.parameters() if p.dim() < 2]
    big = [p for p in model.parameters() if p.dim() >= 2]
    opt = torch.optim.AdamW([{"params": big}, {"params": small, "lr": LR / 2}], lr=LR, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: 1.0)
    cfg = zero_config(stage=stage, precision="fp32", gas=2, micro=4, world=world)
    del cfg["optimizer"]
    engine, got_opt, loader, got_sched = flexspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched,
                                                              training_data=make_dataset(), config=cfg)
    it = iter(loader)
    for _ in range(STEPS * 2):
        x, y = next(it)
        engine.backward(engine(x, y))
        engine.step()
    n_params = [len(g["params"]) for g in got_opt.param_groups]
    return {"same_object": got_opt is opt and got_sched is sched, "groups": n_params,
            "lrs": [g["lr"] for g in got_opt.param_groups], "state": full_state(engine.module),
            "memory": engine.memory_breakdown()}


def comm_dtype_run(stage: int, rank: int, world: int, key: str) -> dict:
    """fp32 compute with bf16 communication or bf16 gradient accumulation (gas 2)."""
    import flexspeed

    model = make_model()
    cfg = zero_config(stage=stage, precision="fp32", gas=2, micro=4, world=world)
    if key == "communication_data_type":
        cfg["communication_data_type"] = "bf16"
    else:
        cfg["data_types"] = {"grad_accum_dtype": "bf16"}
    engine, _, loader, _ = flexspeed.initialize(model=model, model_parameters=model.parameters(),
                                               training_data=make_dataset(), config=cfg)
    it = iter(loader)
    representable = True
    for micro in range(STEPS * 2):
        x, y = next(it)
        engine.backward(engine(x, y))
        if key == "grad_accum_dtype":
            for p in engine.module.parameters():  # (stage 2: only on the boundary, only the owner's)
                if p.grad is None:
                    continue
                g = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                representable &= bool(torch.equal(g, g.to(torch.bfloat16).float()))
        engine.step()
    return {"state": full_state(engine.module), "representable": representable}


def knobs_run(rank: int, world: int) -> dict:
    """Stage 3 with the bucket knobs set: prefetch is mapped, reduce_bucket_size groups blocks into units."""
    import warnings

    import flexspeed

    model = make_model()
    cfg = zero_config(stage=3, precision="fp32", gas=1, micro=4, world=world,
                      stage3_prefetch_bucket_size=10**9, reduce_bucket_size=1000)
    cfg["memory_breakdown"] = True
    cfg["steps_per_print"] = 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine, _, loader, _ = flexspeed.initialize(model=model, model_parameters=model.parameters(),
                                                   training_data=make_dataset(), config=cfg)
    x, y = next(iter(loader))
    engine.backward(engine(x, y))
    engine.step()
    strategy = engine._strategy
    blocks = strategy.blocks
    return {"prefetch": getattr(strategy, "prefetch_blocks", None), "n_blocks": len(blocks),
            "warned": [str(w.message) for w in caught if "reduce_bucket_size" in str(w.message)],
            "notes": list(strategy.notes), "report": strategy.memory_report(engine.optimizer)}


def _features(rank: int, world: int) -> dict:
    return {
        "knobs": knobs_run(rank, world),
        "overflow": [overflow_run(s, rank, world) for s in (0, 1, 2, 3)],
        "client": [client_optimizer_run(s, rank, world) for s in (1, 2, 3)],
        "comm": [comm_dtype_run(s, rank, world, k) for s in (0, 1, 2, 3)
                 for k in ("communication_data_type", "grad_accum_dtype")],
    }


GRID_W2 = _cases((0, 1, 2, 3), micro=4) + [  # stage 3 with nothing whole, and with everything whole
    {"stage": 3, "precision": "fp32", "gas": 2, "micro": 4, "zero": {"stage3_param_persistence_threshold": 0}},
    {"stage": 3, "precision": "fp32", "gas": 2, "micro": 4, "zero": {"stage3_param_persistence_threshold": 10**9}}]


def _world2(rank: int, world: int) -> dict:
    return {"grid": _grid(rank, world, GRID_W2), **_features(rank, world)}


@pytest.fixture(scope="module")
def world2() -> list[dict]:
    return run_ranks(_world2, world_size=2, timeout=300)


def test_zero_stages_world2_match_single_process(world2):
    _check([r["grid"] for r in world2], GRID_W2, world=2)


def test_zero3_world4_matches_single_process():
    cases = _cases((3,), micro=2)
    results = run_ranks(_grid, world_size=4, args=(cases,), timeout=240)
    _check(results, cases, world=4)


def test_fp16_overflow_skips_step_lowers_scale_and_holds_schedule(world2):
    for stage, (r0, r1) in enumerate(zip(world2[0]["overflow"], world2[1]["overflow"])):
        assert r0 == r1, f"stage {stage}: ranks disagree"
        overflow_steps = {1, 2} if stage >= 2 else {1}
        applied = 0  # DeepSpeed's schedule counts applied optimizer steps only
        for step, rec in enumerate(r0):
            where = f"stage {stage} step {step}: {rec}"
            assert rec["finite"] and rec["global_steps"] == step + 1, where
            if step in overflow_steps:
                assert rec["unchanged"] and not rec["sched_stepped"], where
                assert rec["lr_after"] == rec["lr_before"], where
                assert rec["scale_after"] == rec["scale_before"] / 2, where
            else:
                applied += 1
                assert not rec["unchanged"] and rec["sched_stepped"], where
                assert rec["lr_before"] == [pytest.approx(deepspeed_warmup_lr(applied, **OVERFLOW_WARMUP))], where
                assert rec["scale_after"] == rec["scale_before"], where
        assert r0[-1]["skipped"] == len(overflow_steps), stage


def test_client_optimizer_is_repointed_in_place_with_its_groups(world2):
    ds = make_dataset()
    batches = global_batches(ds, world=2, micro=4, gas=2, steps=STEPS)
    model = make_model()
    small = [p for p in model.parameters() if p.dim() < 2]
    big = [p for p in model.parameters() if p.dim() >= 2]
    ref_opt = torch.optim.AdamW([{"params": big}, {"params": small, "lr": LR / 2}], lr=LR, weight_decay=0.0)
    for xs, ys in batches:
        loss = model(xs, ys)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        ref_opt.step()
        ref_opt.zero_grad()
    ref_state = model.state_dict()
    for stage, result in zip((1, 2, 3), world2[0]["client"]):
        assert result["same_object"], stage
        assert result["groups"] == [len(big), len(small)] and result["lrs"] == [LR, LR / 2], stage
        for k, v in ref_state.items():
            torch.testing.assert_close(result["state"][k], v, rtol=0, atol=WEIGHT_TOL_FP32, msg=f"stage {stage} {k}")


def test_memory_breakdown_shards_what_each_stage_says(world2):
    full = sum(p.numel() * 4 for p in make_model().parameters())
    mem = {stage: r["memory"] for stage, r in zip((1, 2, 3), world2[0]["client"])}
    # after the last step: gradients are freed (zero_grad), AdamW holds 2 fp32 moments per element
    assert mem[1]["parameters"] == full and mem[1]["optimizer_states"] < 0.75 * 2 * full
    total_opt = sum(r["client"][0]["memory"]["optimizer_states"] for r in world2)
    assert total_opt == 2 * full  # the two ranks' partitions cover every parameter exactly once
    # stage 2 keeps full parameters (DeepSpeed's); optimizer state partitioned as at stage 1
    assert mem[2]["parameters"] == full and mem[2]["optimizer_states"] < 0.75 * 2 * full
    assert sum(r["client"][1]["memory"]["optimizer_states"] for r in world2) == 2 * full
    assert mem[3]["optimizer_states"] == 2 * mem[3]["parameters"]
    assert full // 2 < mem[3]["parameters"] < 0.6 * full  # LayerNorm weights stay whole


def test_communication_and_accumulation_dtypes_are_applied(world2):
    ds = make_dataset()
    _, ref_state = reference_run(make_model(), global_batches(ds, world=2, micro=4, gas=2, steps=STEPS),
                                 lr=LR, clip=CLIP)
    keys = [(s, k) for s in (0, 1, 2, 3) for k in ("communication_data_type", "grad_accum_dtype")]
    for (stage, key), r0, r1 in zip(keys, world2[0]["comm"], world2[1]["comm"]):
        rel = _update_rel(r0["state"], ref_state)
        # bf16 rounding changes the result (so it was applied), by about bf16's 2^-8 relative
        assert 1e-6 < rel < UPDATE_REL_TOL_16BIT, (stage, key, rel)
        for k, v in r0["state"].items():
            torch.testing.assert_close(r1["state"][k], v, rtol=0, atol=0)
        if key == "grad_accum_dtype":
            assert r0["representable"] and r1["representable"], stage


def test_zero_stages_world1_match_single_process():
    cases = [{"stage": s, "precision": "fp32", "gas": 2, "micro": 4} for s in (1, 2, 3)]
    results = run_ranks(_grid, world_size=1, args=(cases,), timeout=240)
    _check(results, cases, world=1)


def test_bucket_knobs_map_to_fsdp2_prefetch_and_units(world2):
    knobs = world2[0]["knobs"]
    assert knobs["n_blocks"] == 2 and knobs["prefetch"] == 1, knobs
    assert any("prefetching 1 unit" in n for n in knobs["notes"]), knobs["notes"]
    # a 1000-element bucket is smaller than a block: one FSDP2 unit (one reduce-scatter) per block, no warning
    assert any("2 block(s) in 2 unit(s)" in n for n in knobs["notes"]), knobs["notes"]
    assert not knobs["warned"], knobs["warned"]
    assert "ZeRO-3 model states: parameters=" in knobs["report"], knobs["report"]
