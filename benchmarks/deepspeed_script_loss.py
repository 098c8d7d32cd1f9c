"""The DeepSpeed-style script check: loss after 30 steps, flexspeed vs plain DDP on DeepSpeed's schedule.

Workload (shared/ANCHORS.md): GPT 4 layers, d_model 256, 4 heads, vocab 1024, seq 128 (3.7M
parameters), world size 2 (gloo, spawned), micro-batch 8, gradient accumulation 2, AdamW and
WarmupLR from the config, gradient clipping 1.0, 30 steps, one thread per rank. Each rank feeds
its own fixed random token batches (seed 100 + rank), cycled.

Columns, each in the same spawned group:
- ``ddp``: ``DistributedDataParallel`` + ``torch.optim.AdamW``, clipping, and the lr of each
  optimizer step from ``tests/compat/ds_reference.py`` (DeepSpeed's WarmupLR, checked against
  DeepSpeed's recorded engine run) - the reference, never flexspeed's scheduler;
- ``flexspeed`` at each ZeRO stage, fp32, the same config;
- ``deepspeed`` at each stage, when ``import deepspeed`` works (run this file with DeepSpeed's
  venv and ``PYTHONPATH`` at the repository; ``torch_adam: true`` so no kernel is JIT-built).

The loss of a step is the mean over ranks and micro-batches. flexspeed is expected to equal ddp
to float round-off (the table prints the difference).

    python benchmarks/deepspeed_script_loss.py [--steps 30] [--stages 0 1 2 3] [--libs ddp flexspeed]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.compat.ds_reference

MICRO, GAS, SEQ, VOCAB, N_BATCHES = 8, 2, 128, 1024, 8
LR, WEIGHT_DECAY = 3e-3, 0.01
WARMUP = {"warmup_min_lr": 0.0, "warmup_max_lr": LR, "warmup_num_steps": 10, "warmup_type": "linear"}


def config(stage: int, lib: str) -> dict:
    opt_params = {"lr": LR, "weight_decay": WEIGHT_DECAY}
    if lib == "deepspeed":
        opt_params["torch_adam"] = True  # torch.optim.AdamW, as the others (no fused kernel to build)
    return {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": GAS,
            "optimizer": {"type": "AdamW", "params": opt_params},
            "scheduler": {"type": "WarmupLR", "params": dict(WARMUP)},
            "gradient_clipping": 1.0, "zero_optimization": {"stage": stage}, "steps_per_print": 10**6}


def batches(rank: int) -> list:
    import torch

    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randint(0, VOCAB, (N_BATCHES, MICRO, SEQ + 1), generator=g)
    return [(b[:, :-1], b[:, 1:]) for b in x]


def run_ddp(rank: int, steps: int) -> list[float]:
    """Plain PyTorch: DDP, AdamW, clipping, and DeepSpeed's WarmupLR lr at every optimizer step."""
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    from flexspeed.models import GPT
    from tests.compat.ds_reference import deepspeed_warmup_lr

    torch.manual_seed(0)
    net = DDP(GPT())
    opt = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    data, losses = batches(rank), []
    for step in range(1, steps + 1):
        total = 0.0
        for m in range(GAS):
            x, y = data[((step - 1) * GAS + m) % N_BATCHES]
            with net.no_sync() if m < GAS - 1 else contextlib.nullcontext():
                loss = net(x, y)
                (loss / GAS).backward()
            total += loss.item() / GAS
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        for group in opt.param_groups:
            group["lr"] = deepspeed_warmup_lr(step, **WARMUP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(total)
    return losses


def run_engine(lib: str, rank: int, stage: int, steps: int) -> list[float]:
    """flexspeed or DeepSpeed (same API) with the config's AdamW and WarmupLR."""
    import torch

    from flexspeed.models import GPT

    library = importlib.import_module(lib)
    torch.manual_seed(0)
    model = GPT()
    engine, *_ = library.initialize(model=model, model_parameters=model.parameters(), config=config(stage, lib))
    data, losses = batches(rank), []
    for step in range(1, steps + 1):
        total = 0.0
        for m in range(GAS):
            x, y = data[((step - 1) * GAS + m) % N_BATCHES]
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            total += loss.item() / GAS
        losses.append(total)
    return losses


def rank_main(rank: int, world: int, steps: int, stages: list[int], libs: list[str]) -> dict:
    out = {}
    if "ddp" in libs:
        out[("ddp", None)] = run_ddp(rank, steps)
    for lib in (name for name in libs if name != "ddp"):
        for stage in stages:
            out[(lib, stage)] = run_engine(lib, rank, stage, steps)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3], choices=[0, 1, 2, 3])
    parser.add_argument("--libs", nargs="+", default=["ddp", "flexspeed", "deepspeed"],
                        choices=["ddp", "flexspeed", "deepspeed"])
    args = parser.parse_args()
    libs = list(args.libs)
    if "deepspeed" in libs and importlib.util.find_spec("deepspeed") is None:
        libs.remove("deepspeed")
        print("(deepspeed is not installed: no DeepSpeed column)")
    from flexspeed.testing import run_ranks

    per_rank = run_ranks(rank_main, world_size=2, timeout=3600, env={"OMP_NUM_THREADS": "1"},
                         args=(args.steps, args.stages, libs))
    loss = {key: [sum(r[key][k] for r in per_rank) / len(per_rank) for k in range(args.steps)]
            for key in per_rank[0]}
    ref = loss.get(("ddp", None))
    print(f"\nloss after step {args.steps} (mean over 2 ranks x {GAS} micro-batches); WarmupLR {WARMUP}, "
          f"AdamW lr {LR} weight_decay {WEIGHT_DECAY}, clipping 1.0")
    print("| run | stage | loss step 1 | loss step %d | minus ddp |" % args.steps)
    print("|---|---|---|---|---|")
    for (lib, stage), values in loss.items():
        diff = f"{values[-1] - ref[-1]:+.2e}" if ref is not None else "-"
        print(f"| {lib} | {'-' if stage is None else stage} | {values[0]:.6f} | {values[-1]:.6f} | {diff} |")


if __name__ == "__main__":
    main()
