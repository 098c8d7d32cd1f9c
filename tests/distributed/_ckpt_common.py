"""Shared pieces of the checkpoint tests: configs with one global batch at every world size,
a training loop that reports the global loss per optimizer step, and engine construction."""

from __future__ import annotations

import torch

from tests.distributed._parity import make_dataset, make_model

GLOBAL_BATCH = 8  # samples per optimizer step at every world size (so data order is identical)
LR = 1e-2
N_BEFORE, N_AFTER = 3, 3  # optimizer steps before the save and after the resume


def ckpt_config(world: int, stage: int, **extra) -> dict:
    """Same global batch at world 1 (4 x 2 accumulation), 2 (4 x 1) and 4 (2 x 1)."""
    micro = 4 if world <= 2 else GLOBAL_BATCH // world
    gas = GLOBAL_BATCH // (micro * world)
    cfg = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": 0.01}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": LR,
                                                     "warmup_num_steps": 4}},
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "steps_per_print": 10_000,
    }
    cfg.update(extra)
    return cfg


def build(world: int, stage: int, seed: int = 0, **extra):
    """(engine, loader) for the tiny GPT on the deterministic dataset."""
    import flexspeed

    model = make_model(seed=seed)
    engine, _, loader, _ = flexspeed.initialize(model=model, model_parameters=model.parameters(),
                                               training_data=make_dataset(), config=ckpt_config(world, stage, **extra))
    return engine, loader


def train(engine, it, steps: int) -> list[float]:
    """``steps`` optimizer steps from iterator ``it``; the loss of each, averaged over all samples."""
    import torch.distributed as dist

    gas = engine.gradient_accumulation_steps()
    losses = []
    for _ in range(steps):
        total = torch.zeros((), dtype=torch.float64)
        for _ in range(gas):
            x, y = next(it)
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            total += loss.detach().double() / gas
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(total)
            total /= dist.get_world_size()
        losses.append(float(total))
    return losses


def eval_loss(model, seed: int = 7) -> float:
    """Loss of ``model`` on a fixed batch (no grad)."""
    ds = make_dataset(n=8, seed=seed)
    x = torch.stack([ds[i][0] for i in range(8)])
    y = torch.stack([ds[i][1] for i in range(8)])
    with torch.no_grad():
        return float(model(x, y))


def build_local(seed: int = 0, make_optimizer=None, model=None, **extra):
    """(engine, loader) at world size 1 in this process, with no process group (stage 0).

    ``make_optimizer(params)`` replaces the default AdamW; ``model`` replaces the tiny GPT.
    """
    from flexspeed.config import build_config
    from flexspeed.runtime.data import FlexDataLoader
    from flexspeed.runtime.engine import TrainingEngine
    from flexspeed.runtime.precision import PrecisionPolicy
    from flexspeed.runtime.schedulers import build_scheduler
    from flexspeed.runtime.zero import apply_zero

    cfg = build_config(config=ckpt_config(1, 0, **extra), world_size=1, world_size_source="checkpoint unit test")
    cpu = torch.device("cpu")
    model = make_model(seed=seed) if model is None else model
    strategy = apply_zero(model, config=cfg, device=cpu)
    params = [p for p in model.parameters() if p.requires_grad]
    client = make_optimizer(params) if make_optimizer else torch.optim.AdamW(params, lr=LR, weight_decay=0.01)
    optimizer = strategy.build_optimizer(client, None)
    scheduler = build_scheduler(cfg.scheduler.type, dict(cfg.scheduler.params or {}), optimizer)
    loader = FlexDataLoader(make_dataset(), batch_size=cfg.train_micro_batch_size_per_gpu, dp_rank=0, dp_world_size=1)
    engine = TrainingEngine(strategy=strategy, config=cfg, optimizer=optimizer, lr_scheduler=scheduler,
                            training_dataloader=loader, precision=PrecisionPolicy(), loss_scaler=None, device=cpu)
    return engine, loader
