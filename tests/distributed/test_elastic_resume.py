"""Elastic resume (issue 16, item 3): a job with an ``elasticity`` section killed at world size 2 and
resumed by ``auto_resume`` at world size 1 keeps the global batch (micro-batch x accumulation chosen
by DeepSpeed's arithmetic: 4 x 1 on 2 ranks, 4 x 2 on one) and the data order (the dataloader position
is in the checkpoint), so its per-step losses equal the uninterrupted world-2 run's within 1e-5
(float32 sums in another order)."""

from __future__ import annotations

import torch

from flexspeed.testing import run_ranks

STEPS = 8
ELASTIC = {"enabled": True, "max_train_batch_size": 8, "micro_batch_sizes": [2, 4], "min_gpus": 1, "max_gpus": 2}


def _train(rank: int, world: int, root: str | None, stop_at: int) -> dict:
    import torch.distributed as dist
    from torch.utils.data import TensorDataset

    import flexspeed

    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(64, 8, generator=g), torch.randn(64, 1, generator=g))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    cfg = {"elasticity": ELASTIC, "optimizer": {"type": "Adam", "params": {"lr": 0.01}}, "steps_per_print": 1000}
    if root is not None:
        cfg["checkpoint"] = {"save_dir": root, "save_interval": 2, "auto_resume": True}
    engine, _, loader, _ = flexspeed.initialize(model=model, training_data=data, config=cfg)
    losses: dict[int, float] = {}
    start = engine.global_steps
    acc = torch.zeros(())
    while engine.global_steps < stop_at:
        for x, y in loader:
            loss = torch.nn.functional.mse_loss(engine(x), y)
            acc += loss.detach() / engine.gradient_accumulation_steps()
            step = engine.global_steps
            engine.backward(loss)
            engine.step()
            if engine.global_steps > step:  # a boundary: the global batch's mean loss
                dist.all_reduce(acc)
                losses[step] = (acc / world).item()
                acc = torch.zeros(())
            if engine.global_steps >= stop_at:
                break
    return {"start": start, "losses": losses, "triad": (engine.train_batch_size(),
                                                         engine.train_micro_batch_size_per_gpu(),
                                                         engine.gradient_accumulation_steps())}


def test_killed_at_world_2_resumed_at_world_1(tmp_path):
    root = str(tmp_path / "ckpt")
    reference = run_ranks(_train, 2, (None, STEPS), timeout=240, init_process_group=False)[0]
    assert reference["triad"] == (8, 4, 1) and sorted(reference["losses"]) == list(range(STEPS))
    first = run_ranks(_train, 2, (root, 5), timeout=240, init_process_group=False)[0]  # "killed" after step 5
    resumed = run_ranks(_train, 1, (root, STEPS), timeout=240, init_process_group=False)[0]
    assert resumed["triad"] == (8, 4, 2), resumed["triad"]  # the same global batch on one rank
    assert resumed["start"] == 4  # the step-4 save; step 5's work was lost with the "kill"
    for step, loss in {**first["losses"], **resumed["losses"]}.items():
        assert abs(loss - reference["losses"][step]) <= 1e-5, (step, loss, reference["losses"][step])
    assert sorted(resumed["losses"]) == list(range(4, STEPS))
