"""What does flexspeed cost on top of the PyTorch path it wraps?

1. ``import flexspeed`` (and ``import flexspeed; flexspeed.initialize``) time against ``import torch``,
   each in a fresh interpreter, median of N runs.
2. Stage-0 training step time against raw ``DistributedDataParallel`` on the same model, data
   and settings (world size 2, gloo, one thread per rank), measured side by side in one spawned
   group, alternating the two so machine noise hits both. Workload = shared/ANCHORS.md's: GPT 4
   layers, d_model 256, 4 heads, vocab 1024, seq 128 (3.7M parameters), micro-batch 8,
   gradient accumulation 2, AdamW, clipping 1.0.

    python benchmarks/overhead.py [--steps 8] [--reps 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

MICRO, GAS, SEQ, VOCAB = 8, 2, 128, 1024


def import_time(stmt: str, runs: int) -> float:
    times = []
    for _ in range(runs):
        code = f"import time; t=time.perf_counter(); {stmt}; print(time.perf_counter()-t)"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        times.append(float(out.stdout.strip().splitlines()[-1]))
    return statistics.median(times)


def _batches(rank: int, n: int):
    import torch

    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randint(0, VOCAB, (n, MICRO, SEQ + 1), generator=g)
    return [(b[:, :-1], b[:, 1:]) for b in x]


def _raw_ddp(steps: int, batches) -> float:
    import torch
    from torch.nn.parallel import DistributedDataParallel as DDP

    from flexspeed.models import GPT

    torch.manual_seed(0)
    model = DDP(GPT())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    t0 = time.process_time()
    i = 0
    for _ in range(steps):
        for m in range(GAS):
            x, y = batches[i % len(batches)]
            i += 1
            if m < GAS - 1:
                with model.no_sync():
                    (model(x, y) / GAS).backward()
            else:
                (model(x, y) / GAS).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.process_time() - t0


def _flexspeed(steps: int, batches, world: int) -> float:
    import torch

    import flexspeed
    from flexspeed.models import GPT

    torch.manual_seed(0)
    model = GPT()
    cfg = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": GAS,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}, "gradient_clipping": 1.0,
           "zero_optimization": {"stage": 0}, "steps_per_print": 1000}
    engine, *_ = flexspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    t0 = time.process_time()
    i = 0
    for _ in range(steps * GAS):
        x, y = batches[i % len(batches)]
        i += 1
        engine.backward(engine(x, y))
        engine.step()
    return time.process_time() - t0


def _ranks(rank: int, world: int, steps: int, reps: int) -> dict:
    batches = _batches(rank, 8)
    _raw_ddp(1, batches), _flexspeed(1, batches, world)  # warm-up
    raw, fs = [], []
    for r in range(reps):
        order = [("raw", _raw_ddp), ("fs", None)] if r % 2 == 0 else [("fs", None), ("raw", _raw_ddp)]
        for name, _ in order:
            t = _raw_ddp(steps, batches) if name == "raw" else _flexspeed(steps, batches, world)
            (raw if name == "raw" else fs).append(t)
    return {"raw": raw, "fs": fs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--import-runs", type=int, default=5)
    args = ap.parse_args()

    t_torch = import_time("import torch", args.import_runs)
    t_fs = import_time("import flexspeed", args.import_runs)
    t_fs_init = import_time("import flexspeed; flexspeed.initialize", args.import_runs)

    from flexspeed.testing import run_ranks

    world = 2
    res = run_ranks(_ranks, world_size=world, args=(args.steps, args.reps), timeout=1800)
    samples = args.steps * GAS * MICRO * world  # per repetition, both ranks
    raw = statistics.median(sum(r["raw"][i] for r in res) for i in range(args.reps)) / samples
    fs = statistics.median(sum(r["fs"][i] for r in res) for i in range(args.reps)) / samples

    print("\n| measurement | value | ratio |")
    print("|---|---|---|")
    print(f"| import torch (s) | {t_torch:.3f} | 1.00 |")
    print(f"| import flexspeed (s) | {t_fs:.3f} | {t_fs / t_torch:.2f} x torch |")
    print(f"| import flexspeed + initialize (s) | {t_fs_init:.3f} | {t_fs_init / t_torch:.2f} x torch |")
    print(f"| raw DDP, CPU-s per sample (both ranks) | {raw:.4f} | 1.00 |")
    print(f"| flexspeed stage 0, CPU-s per sample (both ranks) | {fs:.4f} | {fs / raw:.3f} x raw "
          f"(throughput ratio {raw / fs:.3f}) |")


if __name__ == "__main__":
    main()
