"""The demo's training script, one copy per rank - a DeepSpeed-style script like any user's.

``flexspeed demo`` starts it through ``flexspeed launch``; it can also be started by hand::

    flexspeed launch --nproc-per-node 2 -m flexspeed.demo.train --out demo_out \\
        --deepspeed_config examples/ds_config_demo.json

It trains a GPT from scratch on :class:`~flexspeed.demo.task.AdditionTask` with the engine the
config describes (ZeRO stage, bf16, optimizer, scheduler, monitors), shows a progress bar on
rank 0, saves a checkpoint to ``<out>/checkpoint`` and writes ``<out>/train.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch

import flexspeed
from flexspeed.demo.task import MODEL_SHAPE, AdditionTask
from flexspeed.models import GPT, GPTConfig

__all__ = ["build_model", "main"]


def build_model(task: AdditionTask, device: str | torch.device | None = None) -> GPT:
    """The demo GPT for ``task`` (``device="meta"`` builds it without memory, to be loaded)."""
    cfg = GPTConfig(vocab_size=16, block_size=task.prompt_len + task.answer_len, **MODEL_SHAPE)
    if device is None:
        return GPT(cfg)
    with torch.device(device):
        return GPT(cfg)


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="train the flexspeed demo model (one copy per rank)")
    p.add_argument("--out", required=True, help="output directory (checkpoint, train.json)")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps")
    p.add_argument("--digits", type=int, default=2, help="digits per operand")
    p.add_argument("--seed", type=int, default=1234, help="seed of the data split and the model init")
    p = flexspeed.add_config_arguments(p)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = _parse(argv)
    task = AdditionTask(digits=args.digits, seed=args.seed)
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    model = build_model(task)
    engine, _, loader, _ = flexspeed.initialize(args=args, model=model, model_parameters=model.parameters(),
                                                training_data=task.train_data())
    rank = engine.global_rank
    if rank == 0:
        print(f"[demo] {model.num_parameters():,}-parameter GPT, {task.digits}-digit addition, "
              f"{len(loader.dataset):,} training questions, {task.num_held_out} held out; world size "
              f"{engine.world_size}, ZeRO stage {engine.zero_optimization_stage()}, "
              f"{'bf16' if engine.bf16_enabled() else 'fp16' if engine.fp16_enabled() else 'fp32'}, "
              f"{engine.train_batch_size()} questions per step", flush=True)
    losses: list[float] = []
    start = time.perf_counter()
    with engine.progress(args.steps, desc="training"):
        while engine.global_steps < args.steps:
            for x, y in loader:
                loss = engine(x, y)
                engine.backward(loss)
                engine.step()
                losses.append(loss.item())
                if engine.global_steps >= args.steps:
                    break
    train_s = time.perf_counter() - start
    ckpt = os.path.join(args.out, "checkpoint")
    engine.save_checkpoint(ckpt)
    if rank == 0:
        tail = losses[-20:]
        summary = {"task": task.to_dict(), "model": MODEL_SHAPE, "steps": engine.global_steps,
                   "world_size": engine.world_size, "zero_stage": engine.zero_optimization_stage(),
                   "bf16": engine.bf16_enabled(), "train_batch_size": engine.train_batch_size(),
                   "train_seconds": round(train_s, 2), "first_loss": losses[0] if losses else math.nan,
                   "final_loss": sum(tail) / max(len(tail), 1), "checkpoint": ckpt}
        with open(os.path.join(args.out, "train.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(f"[demo] trained {engine.global_steps} steps in {train_s:.1f}s: loss {summary['first_loss']:.3f} -> "
              f"{summary['final_loss']:.3f}; checkpoint saved to {ckpt}", flush=True)


if __name__ == "__main__":
    main()
