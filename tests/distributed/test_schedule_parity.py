"""The DeepSpeed-style script check, small: flexspeed with the config's AdamW, WarmupLR and
gradient clipping ends where a plain PyTorch loop written to DeepSpeed's schedule ends.

World size 2, micro-batch 4, gradient accumulation 2, ZeRO stages 0-3 in fp32, one spawned
group. The reference takes each step's lr from ``tests/compat/ds_reference.py`` (DeepSpeed's
WarmupLR, itself checked against DeepSpeed's recorded engine run), never from flexspeed's
scheduler. Tolerance: 1e-5 absolute on every per-step loss and final weight, as in
test_zero_parity.py (only the order of cross-rank sums differs). The full-size run of the same
check is ``benchmarks/deepspeed_script_loss.py``.
"""

from __future__ import annotations

import torch

from flexspeed.testing import run_ranks
from tests.compat.ds_reference import deepspeed_warmup_lr
from tests.distributed._parity import global_batches, make_dataset, make_model, reference_run
from tests.distributed.test_zero_parity import full_state

STEPS, LR, MICRO, GAS, WEIGHT_DECAY = 6, 1e-2, 4, 2, 0.01
WARMUP = {"warmup_min_lr": 1e-3, "warmup_max_lr": LR, "warmup_num_steps": 4, "warmup_type": "linear"}
STAGES = (0, 1, 2, 3)
N_SAMPLES = 2 * STEPS * GAS * MICRO  # one epoch covers the run on each of the 2 ranks
CLIP = 0.3  # below this model's gradient norms (~0.5), so clipping acts at every step


def _config(stage: int) -> dict:
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": GAS,
            "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WEIGHT_DECAY}},
            "scheduler": {"type": "WarmupLR", "params": dict(WARMUP)}, "gradient_clipping": CLIP,
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 100},
            "steps_per_print": 1000}


def _train(stage: int) -> dict:
    import flexspeed

    model = make_model()
    engine, _, loader, _ = flexspeed.initialize(model=model, model_parameters=model.parameters(),
                                               training_data=make_dataset(N_SAMPLES), config=_config(stage))
    losses, norms, acc = [], [], 0.0
    it = iter(loader)
    for _ in range(STEPS * GAS):
        x, y = next(it)
        loss = engine(x, y)
        engine.backward(loss)
        acc += loss.item() / GAS
        engine.step()
        if engine.micro_steps % GAS == 0:
            losses.append(acc)
            norms.append(engine.get_global_grad_norm())
            acc = 0.0
    return {"losses": losses, "norms": norms, "state": full_state(engine.module)}


def _grid(rank: int, world: int) -> list[dict]:
    return [_train(stage) for stage in STAGES]


def test_loss_equals_a_plain_loop_on_deepspeeds_schedule():
    results = run_ranks(_grid, world_size=2, timeout=240)
    batches = global_batches(make_dataset(N_SAMPLES), world=2, micro=MICRO, gas=GAS, steps=STEPS)
    ref_losses, ref_state = reference_run(make_model(), batches, clip=CLIP,
                                          weight_decay=WEIGHT_DECAY,
                                          lr_at=lambda k: deepspeed_warmup_lr(k, **WARMUP))
    for i, stage in enumerate(STAGES):
        got = [(a + b) / 2 for a, b in zip(results[0][i]["losses"], results[1][i]["losses"])]
        assert min(results[0][i]["norms"]) > CLIP, "clipping did not act at every step"
        torch.testing.assert_close(torch.tensor(got), torch.tensor(ref_losses), rtol=0, atol=1e-5,
                                   msg=lambda m, stage=stage: f"stage {stage} losses: {m}")
        for k, v in ref_state.items():
            torch.testing.assert_close(results[0][i]["state"][k], v, rtol=0, atol=1e-5,
                                       msg=lambda m, stage=stage, k=k: f"stage {stage} {k}: {m}")
