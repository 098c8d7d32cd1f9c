"""Rank functions for the Lightning Fabric parity test (spawned by ``run_ranks``; no DeepSpeed identity needed)."""

from __future__ import annotations

from typing import Any


def fabric_losses(strategy: Any, accumulate: int = 2, steps: int = 8) -> tuple[list[float], dict]:
    """One Fabric loop (tiny Llama, AdamW + manually stepped LambdaLR, accumulation via no_backward_sync).

    ``strategy="ddp"``: Fabric's DDP run, which divides the loss by ``accumulate`` and clips with
    ``fabric.clip_gradients``; the flexspeed strategy gets both from its DeepSpeed config.
    """
    import torch
    from lightning.fabric import Fabric
    from torch.utils.data import DataLoader

    from tests.integrations._hf_runs import TokenData, tiny_llama

    fabric = Fabric(accelerator="cpu", devices=2, strategy=strategy)
    fabric.launch()
    ddp = strategy == "ddp"
    model = tiny_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / (steps // accumulate)))
    model, opt = fabric.setup(model, opt)
    loader = fabric.setup_dataloaders(DataLoader(TokenData(), batch_size=2, shuffle=False))
    model.train()
    losses = []
    for i, batch in enumerate(loader):
        if i == steps:
            break
        accumulating = (i + 1) % accumulate != 0
        with fabric.no_backward_sync(model, enabled=accumulating):
            loss = model(**batch).loss
            fabric.backward(loss / accumulate if ddp else loss)
        if not accumulating:
            if ddp:
                fabric.clip_gradients(model, opt, max_norm=1.0)
            opt.step()
            opt.zero_grad()
            sched.step()
        losses.append(float(loss.detach()))
    if ddp:
        weights = {k: v.detach().float().clone() for k, v in model.module.state_dict().items()}
    else:
        from flexspeed.checkpoint.utils import clone_tensors_for_torch_save

        engine = fabric.strategy.model
        weights = {k: v.float() for k, v in clone_tensors_for_torch_save(engine.module.state_dict()).items()}
    return losses, weights


def rank_fabric_parity(rank: int, world: int, out_dir: str, stage: int, bf16: bool) -> dict:
    from flexspeed.integrations.lightning import FlexspeedStrategy

    ddp, w_ddp = fabric_losses("ddp")
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": stage}, "bf16": {"enabled": bf16}, "steps_per_print": 10 ** 6}
    flex, w_flex = fabric_losses(FlexspeedStrategy(config=config))
    return {"ddp": ddp, "flex": flex, "keys_equal": sorted(w_ddp) == sorted(w_flex),
            "max_weight_diff": max(float((w_ddp[k] - w_flex[k]).abs().max()) for k in w_ddp)}


def rank_fabric_grid(rank: int, world: int, out_dir: str) -> dict:
    return {f"z{stage}": rank_fabric_parity(rank, world, out_dir, stage, False) for stage in (2, 3)}


def llama_module(seed: int = 0) -> Any:
    """A LightningModule around ``tiny_llama(seed)`` that records its training losses (AdamW, lr 1e-2)."""
    import lightning.pytorch as pl
    import torch

    from tests.integrations._hf_runs import tiny_llama

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = tiny_llama(seed)
            self.losses: list[float] = []

        def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
            loss = self.net(**batch).loss
            self.losses.append(float(loss.detach()))
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters(), lr=1e-2, weight_decay=0.01)

    return Module()


def trainer_losses(strategy: Any, stage: int | None = None) -> list[float]:
    """A Lightning Trainer run: tiny Llama, AdamW, accumulate_grad_batches=2, clip 1.0, 4 optimizer steps."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    from tests.integrations._hf_runs import TokenData

    module = llama_module()
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=strategy, accumulate_grad_batches=2,
                         gradient_clip_val=1.0, max_steps=4, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=True)
    trainer.fit(module, DataLoader(TokenData(), batch_size=2, shuffle=False))
    return module.losses


def rank_trainer_grid(rank: int, world: int, out_dir: str) -> dict:
    from flexspeed.integrations.lightning import FlexspeedTrainerStrategy

    out = {"ddp": trainer_losses("ddp")}
    for stage in (2, 3):
        out[f"z{stage}"] = trainer_losses(FlexspeedTrainerStrategy(config={"zero_optimization": {"stage": stage},
                                                                           "steps_per_print": 10 ** 6}))
    return out


def _fabric_steps(fabric: Any, model: Any, opt: Any, batches: list, losses: list) -> None:
    for i, batch in enumerate(batches):
        accumulating = (i + 1) % 2 != 0
        with fabric.no_backward_sync(model, enabled=accumulating):
            loss = model(**batch).loss
            fabric.backward(loss)
        if not accumulating:
            opt.step()
            opt.zero_grad()
        losses.append(float(loss.detach()))


def rank_fabric_resume(rank: int, world: int, out_dir: str) -> dict:
    """fabric.save after 2 optimizer steps, 2 more steps; a fresh Fabric loads the save and must repeat them."""
    import os

    import torch
    from lightning.fabric import Fabric

    from flexspeed.integrations.lightning import FlexspeedStrategy
    from tests.integrations._hf_runs import TokenData, tiny_llama

    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": 3}, "steps_per_print": 10 ** 6}
    data = TokenData()
    batches = [{k: v.unsqueeze(0).repeat(2, 1) for k, v in data[4 * rank + i].items()} for i in range(8)]
    path = os.path.join(out_dir, "fabric-ckpt")

    def fresh(seed: int) -> tuple:
        fabric = Fabric(accelerator="cpu", devices=2, strategy=FlexspeedStrategy(config=config))
        fabric.launch()
        model = tiny_llama(seed)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model, opt = fabric.setup(model, opt)
        return fabric, model, opt

    fabric, model, opt = fresh(0)
    first: list = []
    _fabric_steps(fabric, model, opt, batches[:4], first)
    fabric.save(path, {"model": model, "optimizer": opt, "step": 4})
    after: list = []
    _fabric_steps(fabric, model, opt, batches[4:], after)
    fabric, model, opt = fresh(1)  # other initial weights: the load must replace them
    state = {"model": model, "optimizer": opt, "step": 0}
    fabric.load(path, state)
    resumed: list = []
    _fabric_steps(fabric, model, opt, batches[4:], resumed)
    return {"after": after, "resumed": resumed, "step": state["step"]}


def rank_trainer_resume(rank: int, world: int, out_dir: str) -> dict:
    """Trainer.fit with FlexspeedTrainerStrategy (ZeRO-3, accumulate 2): 2 epochs straight; then 1 epoch,
    trainer.save_checkpoint, and a fresh Trainer (other initial weights) fit(ckpt_path=) for the second.

    One epoch is 2 optimizer steps (16 samples, 2 ranks, batch 2, accumulation 2), so the save falls on an epoch
    end and the resumed run sees the batches of the straight run's second epoch."""
    import os

    import lightning.pytorch as pl
    import torch
    from torch.utils.data import DataLoader

    from flexspeed.integrations.lightning import FlexspeedTrainerStrategy
    from tests.integrations._hf_runs import TokenData

    def fit(seed: int, max_epochs: int, ckpt_path: str | None = None, save: str | None = None) -> list[float]:
        module = llama_module(seed)
        trainer = pl.Trainer(accelerator="cpu", devices=2, accumulate_grad_batches=2, gradient_clip_val=1.0,
                             strategy=FlexspeedTrainerStrategy(config={"zero_optimization": {"stage": 3},
                                                                       "steps_per_print": 10 ** 6}),
                             max_epochs=max_epochs, logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False)
        data = torch.utils.data.Subset(TokenData(), range(16))
        trainer.fit(module, DataLoader(data, batch_size=2, shuffle=False), ckpt_path=ckpt_path)
        if save is not None:
            trainer.save_checkpoint(save)
        return module.losses

    path = os.path.join(out_dir, "trainer-ckpt")
    straight = fit(0, 2)
    first = fit(0, 1, save=path)
    resumed = fit(1, 2, ckpt_path=path)
    return {"straight": straight, "first": first, "resumed": resumed,
            "saved": sorted(os.listdir(path)) if rank == 0 else None}
