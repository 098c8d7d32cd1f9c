"""Stage-0 (DDP) training at world size 2 equals a single-process PyTorch loop (fp32, 1e-5)."""

from __future__ import annotations

import torch

from flexspeed.testing import run_ranks
from tests.distributed._parity import global_batches, make_dataset, make_model, reference_run

MICRO, STEPS, LR, CLIP = 4, 4, 1e-3, 0.5


def _config(gas: int, world: int) -> dict:
    return {
        "train_batch_size": MICRO * gas * world,
        "train_micro_batch_size_per_gpu": MICRO,
        "gradient_accumulation_steps": gas,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.0}},
        "gradient_clipping": CLIP,
        "zero_optimization": {"stage": 0},
        "steps_per_print": 1000,
    }


def _train(rank: int, world: int, gas: int) -> dict:
    import flexspeed

    model = make_model()
    engine, _, loader, _ = flexspeed.initialize(model=model, model_parameters=model.parameters(),
                                               training_data=make_dataset(), config=_config(gas, world))
    losses, micro_losses = [], []
    it = iter(loader)
    for _ in range(STEPS * gas):
        x, y = next(it)
        loss = engine(x, y)
        engine.backward(loss)
        micro_losses.append(loss.item())
        engine.step()
        if engine.micro_steps % gas == 0:
            losses.append(sum(micro_losses) / gas)
            micro_losses = []
    assert engine.global_steps == STEPS and engine.micro_steps == STEPS * gas
    assert engine.global_samples == STEPS * gas * MICRO * world
    state = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    return {"losses": losses, "state": state, "norm": engine.get_global_grad_norm()}


def _grid(rank: int, world: int) -> list:
    return [_train(rank, world, gas) for gas in (1, 2)]


def test_stage0_world2_matches_single_process_reference():
    results = run_ranks(_grid, world_size=2, timeout=240)
    ds = make_dataset()
    for i, gas in enumerate((1, 2)):
        batches = global_batches(ds, world=2, micro=MICRO, gas=gas, steps=STEPS)
        ref_losses, ref_state = reference_run(make_model(), batches, lr=LR, clip=CLIP)
        # the global loss is the mean over ranks of their (accumulation-averaged) losses
        got = [(a + b) / 2 for a, b in zip(results[0][i]["losses"], results[1][i]["losses"])]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(ref_losses), rtol=0, atol=1e-5)
        for k, v in ref_state.items():
            torch.testing.assert_close(results[0][i]["state"][k], v, rtol=0, atol=1e-5, msg=f"gas={gas} {k}")
            torch.testing.assert_close(results[1][i]["state"][k], v, rtol=0, atol=1e-5, msg=f"gas={gas} {k}")
