"""ZeRO stages 0-3 x {fp32, bf16, fp16} x gradient accumulation {1, 2}, clipping on, through
``flexspeed.initialize`` at world sizes 2 and 4, against one plain-PyTorch process on the same
global batches.

Tolerances, and why:
- fp32: final weights and per-step losses within 1e-5 absolute. Every stage computes the same
  mean gradient; only the order of the cross-rank sums differs (~1e-7 relative per step).
- bf16 / fp16: the reference runs the same autocast, so each sample's forward and backward are the
  same kernels on the same values; what differs is that a rank's matmuls see half the batch (the
  CPU kernels block a 16-bit accumulation differently) and that the per-rank gradients are summed
  in another order. 16-bit rounding is 2^-8 (bf16) / 2^-11 (fp16) relative, so per-step losses
  agree within 2e-2 (bf16) and 5e-3 (fp16) absolute on a loss of ~4.2, and the weights within
  1e-2 (bf16) and 2e-3 (fp16) absolute (Adam's step is lr=1e-2 per element; a few flipped
  roundings move an element by a fraction of one step). Observed maxima are printed by
  ``tests/distributed/test_zero_parity.py::_report`` when a check fails, and are well inside these.
  fp16 uses a dynamic loss scale of 2^8 (exact power-of-two scaling; no overflow on this model).
"""

from __future__ import annotations

import torch

from flexspeed.testing import run_ranks
from tests.distributed._parity import global_batches, make_dataset, make_model, reference_run

STEPS, LR, CLIP = 4, 1e-3, 0.5
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
# absolute tolerances: (per-step loss, final weights)
TOL = {"fp32": (1e-5, 1e-5), "bf16": (2e-2, 1e-2), "fp16": (5e-3, 2e-3)}


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
    return f"max |loss diff| {dl:.2e}, max |weight diff| {dw:.2e}"


def _check(results: list[list[dict]], cases: list[dict], world: int) -> None:
    ds = make_dataset()
    refs: dict[tuple, tuple] = {}
    for i, case in enumerate(cases):
        key = (case["precision"], case["gas"])
        if key not in refs:
            batches = global_batches(ds, world=world, micro=case["micro"], gas=case["gas"], steps=STEPS)
            refs[key] = reference_run(make_model(), batches, lr=LR, clip=CLIP,
                                      autocast_dtype=DTYPES[case["precision"]])
        ref_losses, ref_state = refs[key]
        tol_loss, tol_w = TOL[case["precision"]]
        # the global loss is the mean over ranks of their (accumulation-averaged) losses
        got = [sum(r[i]["losses"][k] for r in results) / world for k in range(STEPS)]
        state = results[0][i]["state"]
        msg = f"world={world} {case}: {_report(got, ref_losses, state, ref_state)}"
        torch.testing.assert_close(torch.tensor(got), torch.tensor(ref_losses), rtol=0, atol=tol_loss, msg=msg)
        for k, v in ref_state.items():
            for r in results:  # every rank ends with the same full weights
                torch.testing.assert_close(r[i]["state"][k], v, rtol=0, atol=tol_w, msg=f"{msg} ({k})")
        assert all(r[i]["norm"] == results[0][i]["norm"] for r in results), msg


def test_zero_stages_world2_match_single_process():
    cases = _cases((0, 1, 2, 3), micro=4)
    cases.append({"stage": 3, "precision": "fp32", "gas": 2, "micro": 4,
                  "zero": {"stage3_param_persistence_threshold": 0}})  # everything sharded
    results = run_ranks(_grid, world_size=2, args=(cases,), timeout=240)
    _check(results, cases, world=2)


def test_zero3_world4_matches_single_process():
    cases = _cases((3,), micro=2)
    results = run_ranks(_grid, world_size=4, args=(cases,), timeout=240)
    _check(results, cases, world=4)
