"""Training cost of flexspeed's ZeRO stages against the raw PyTorch path each one wraps.

Workload (shared/ANCHORS.md): GPT 4 layers, d_model 256, 4 heads, vocab 1024, seq 128 (3.7M
parameters), world size 2 (gloo, spawned), micro-batch 8, gradient accumulation 2 (32 samples per
step), AdamW, clipping 1.0, one thread per rank.

Side by side in one spawned group, alternating so machine noise hits both, per stage:

- stage 0: flexspeed vs ``DistributedDataParallel`` + AdamW (``no_sync`` while accumulating)
- stage 1: flexspeed vs DDP + ``ZeroRedundancyOptimizer(AdamW)``
- stage 2: flexspeed vs ``fully_shard(reshard_after_forward=False)`` per block and root + AdamW
- stage 3: flexspeed vs ``fully_shard(reshard_after_forward=True)`` per block, root default
  (both with every parameter sharded: ``stage3_param_persistence_threshold: 0``)

FSDP2 runs reduce-scatter gradients on every micro-step in both columns (flexspeed's choice: a full
gradient never outlives one block's backward). The metric is CPU-seconds per sample, summed over
both ranks (``time.process_time`` of each rank process, so gloo's threads count too), median of
``--reps``, flexspeed and raw alternating which goes first; ``ratio`` = raw / flexspeed (>= 0.95
is the target). A measured DeepSpeed column (same API, same config) appears only if
``import deepspeed`` works; the DeepSpeed figures from ANCHORS.md (this machine kind, 30 steps)
are printed for reference.

    python benchmarks/train_throughput.py [--steps 10] [--warmup 2] [--reps 3] [--precision fp32 bf16]
                                          [--stages 0 1 2 3]
"""

from __future__ import annotations

import argparse
import contextlib
import re
import statistics
import time

MICRO, GAS, SEQ, VOCAB, LR = 8, 2, 128, 1024, 1e-4
ANCHOR_DEEPSPEED = {("fp32", 0): 0.027, ("fp32", 1): 0.028, ("fp32", 2): 0.029, ("fp32", 3): 0.034}


def _batches(rank: int, n: int):
    import torch

    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randint(0, VOCAB, (n, MICRO, SEQ + 1), generator=g)
    return [(b[:, :-1], b[:, 1:]) for b in x]


def _hwm_reset() -> None:
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _hwm_mb() -> float:
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1)) / 1024
    return float("nan")


def _autocast(precision: str):
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def _raw(stage: int, precision: str, steps: int, warmup: int, batches) -> tuple[float, float]:
    """The plain PyTorch loop; returns (CPU seconds of the timed steps, last loss)."""
    import torch
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    from flexspeed.models import GPT

    torch.manual_seed(0)
    model = GPT()
    if stage < 2:
        net = DDP(model)
        opt = (torch.optim.AdamW(net.parameters(), lr=LR) if stage == 0 else
               ZeroRedundancyOptimizer(net.parameters(), optimizer_class=torch.optim.AdamW, lr=LR))
    else:
        for block in model.transformer.h:
            fully_shard(block, reshard_after_forward=stage == 3)
        net = fully_shard(model, reshard_after_forward=None if stage == 3 else False)
        opt = torch.optim.AdamW(net.parameters(), lr=LR)
    i, loss_value, t0 = 0, float("nan"), 0.0
    for step in range(warmup + steps):
        if step == warmup:
            t0 = time.process_time()
        for m in range(GAS):
            x, y = batches[i % len(batches)]
            i += 1
            skip_sync = stage < 2 and m < GAS - 1
            with net.no_sync() if skip_sync else contextlib.nullcontext():
                with _autocast(precision):
                    loss = net(x, y)
                (loss / GAS).backward()
            loss_value = loss.item()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.process_time() - t0, loss_value


def _engine(lib: str, stage: int, precision: str, steps: int, warmup: int, batches) -> tuple[float, float]:
    """flexspeed, or DeepSpeed through the same API (``lib`` is the module name)."""
    import importlib

    import torch

    from flexspeed.models import GPT

    library = importlib.import_module(lib)
    torch.manual_seed(0)
    model = GPT()
    cfg = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": GAS,
           "optimizer": {"type": "AdamW", "params": {"lr": LR}}, "gradient_clipping": 1.0,
           "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
           "steps_per_print": 1000}
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    engine, *_ = library.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    i, loss_value, t0 = 0, float("nan"), 0.0
    for step in range(warmup + steps):
        if step == warmup:
            t0 = time.process_time()
        for _ in range(GAS):
            x, y = batches[i % len(batches)]
            i += 1
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
            loss_value = loss.item()
    return time.process_time() - t0, loss_value


def _rank_main(rank: int, world: int, steps: int, warmup: int, reps: int, precisions: list[str],
               stages: list[int], names: list[str]) -> dict:
    import functools

    batches = _batches(rank, 8)
    out: dict = {}
    for rep in range(reps):
        for precision in precisions:
            for stage in stages:
                runners = {"flexspeed": functools.partial(_engine, "flexspeed"), "raw": _raw,
                           "deepspeed": functools.partial(_engine, "deepspeed")}
                order = names if rep % 2 == 0 else names[::-1]  # alternate who goes first
                for name, fn in ((n, runners[n]) for n in order):
                    _hwm_reset()
                    cpu, loss = fn(stage, precision, steps, warmup, batches)
                    out.setdefault((precision, stage, name), []).append((cpu, loss, _hwm_mb()))
    return out


def _summary(runs: list[list[tuple]], reps: int, samples: int) -> tuple[float, float, float]:
    """(CPU-s per sample, both ranks, median over reps; last loss, mean over ranks; max RSS HWM MB)."""
    cpu = statistics.median(sum(rank_runs[k][0] for rank_runs in runs) for k in range(reps))
    loss = statistics.mean(rank_runs[-1][1] for rank_runs in runs)
    return cpu / samples, loss, max(rank_runs[-1][2] for rank_runs in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per run (ANCHORS: 30)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3], choices=[0, 1, 2, 3])
    args = parser.parse_args()
    names = ["flexspeed", "raw"]
    try:
        import deepspeed  # noqa: F401

        names.append("deepspeed")
    except ImportError:
        pass
    from flexspeed.testing import run_ranks

    world = 2
    per_rank = run_ranks(_rank_main, world_size=world, timeout=3600, env={"OMP_NUM_THREADS": "1"},
                         args=(args.steps, args.warmup, args.reps, args.precision, args.stages, names))
    samples = args.steps * MICRO * GAS * world
    print(f"\nCPU-seconds per sample, both ranks, median of {args.reps} (steps={args.steps} after "
          f"{args.warmup} warm-up; {MICRO}x{GAS}x{world} = {MICRO * GAS * world} samples per step)")
    ds_head = " DeepSpeed (measured) |" if "deepspeed" in names else ""
    print(f"| precision | stage | flexspeed | raw PyTorch | ratio raw/flexspeed | loss flexspeed / raw "
          f"| RSS high-water mark per rank MB (flex / raw) |{ds_head} DeepSpeed (ANCHORS, 30 steps) |")
    print("|---" * (9 if ds_head else 8) + "|")
    for precision in args.precision:
        for stage in args.stages:
            cols = {name: _summary([r[(precision, stage, name)] for r in per_rank], args.reps, samples)
                    for name in names}
            (f_cps, f_loss, f_mb), (r_cps, r_loss, r_mb) = cols["flexspeed"], cols["raw"]
            ds = f" {cols['deepspeed'][0]:.4f} |" if "deepspeed" in cols else ""
            anchor = ANCHOR_DEEPSPEED.get((precision, stage), "-")
            print(f"| {precision} | {stage} | {f_cps:.4f} | {r_cps:.4f} | {r_cps / f_cps:.3f} | "
                  f"{f_loss:.4f} / {r_loss:.4f} | {f_mb:.0f} / {r_mb:.0f} |{ds} {anchor} |")
    if "deepspeed" not in names:
        print("(deepspeed is not installed: no measured DeepSpeed column)")
    print("RSS high-water mark: reset before each run; includes the process's baseline (imports, earlier runs).")


if __name__ == "__main__":
    main()
