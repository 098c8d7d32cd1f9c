"""Pipeline step time against the bubble that theory predicts, for 2 and 4 stages.

For p stages and m micro-batches, a synchronous schedule (GPipe, 1F1B) idles a fraction
(p - 1) / (m + p - 1) of each step, so a step takes (m + p - 1) * t, where t is one stage's
forward + backward time for one micro-batch. This script measures t (each stage alone, no
communication), the real ``train_batch`` time, and reports the measured idle fraction
1 - m * t / step next to the theoretical one.

When the ranks outnumber the CPU cores (4 stages on a 2-core machine), the stages cannot all
compute at once: a step then also takes at least (total work) / cores = p * m * t / cores. The
table prints both bounds and predicts the larger; its "limit" column says which one binds.
The per-layer work is a dense matmul chain (no sleeps), so oversubscription shows honestly.

Run: python benchmarks/pipeline.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch
import torch.nn as nn

from flexspeed.testing import run_ranks

HIDDEN, LAYERS, MICRO = 512, 8, 32


def _layers() -> list:
    from flexspeed.pipe import LayerSpec

    out = []
    for _ in range(LAYERS):
        out += [LayerSpec(nn.Linear, HIDDEN, HIDDEN), LayerSpec(nn.Tanh)]
    return out


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out, target)


def _stage_time(engine, reps: int) -> float:
    """Median seconds for this rank's stage to run forward + backward on one micro-batch, alone."""
    stage = engine.module.stage_modules[0]
    x = torch.randn(MICRO, HIDDEN, requires_grad=True)
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        out = stage(x)
        out.backward(torch.ones_like(out))
        times.append(time.perf_counter() - t0)
    engine.zero_grad()
    return statistics.median(times[1:])


def _rank(rank: int, world: int, micro_counts: list[int], steps: int) -> list[dict]:
    import torch.distributed as dist

    import flexspeed
    from flexspeed.pipe import PipelineModule

    results = []
    for m in micro_counts:
        model = PipelineModule(_layers(), num_stages=world, loss_fn=_loss, partition_method="uniform")
        cfg = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": m,
               "optimizer": {"type": "SGD", "params": {"lr": 1e-4}}, "steps_per_print": 10**9,
               "pipeline": {"schedule": "1f1b" if m >= world else "gpipe"}}
        engine, *_ = flexspeed.initialize(model=model, config=cfg)
        batches = [(torch.randn(MICRO, HIDDEN), torch.randn(MICRO, HIDDEN)) for _ in range(m)]
        step_times, stage_times = [], []
        for step in range(steps + 2):
            # the stage time is re-measured before every step (one rank at a time, so each
            # measures an otherwise idle machine): step and stage see the same background load
            t_stage = torch.zeros(())
            for r in range(world):
                dist.barrier()
                if r == rank:
                    t_stage = torch.tensor(_stage_time(engine, reps=3))
            dist.all_reduce(t_stage, op=dist.ReduceOp.MAX)
            dist.barrier()
            t0 = time.perf_counter()
            engine.train_batch(iter(batches))
            elapsed = torch.tensor(time.perf_counter() - t0)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if step >= 2:
                step_times.append(float(elapsed))
                stage_times.append(float(t_stage))
        results.append({"m": m, "step": statistics.median(step_times), "t": statistics.median(stage_times)})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer micro-batch counts and steps")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    steps = 3 if args.quick else 5
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    rows = []
    for p in (2, 4):
        counts = [p, 4 * p] if args.quick else [p, 2 * p, 4 * p, 8 * p]
        started = time.perf_counter()
        for r in run_ranks(_rank, world_size=p, args=(counts, steps), timeout=900)[0]:
            m, t, step = r["m"], r["t"], r["step"]
            theory = (p - 1) / (m + p - 1)
            bubble_bound = (m + p - 1) * t
            cpu_bound = p * m * t / min(cores, p)
            predicted = max(bubble_bound, cpu_bound)
            rows.append((p, m, "1f1b" if m >= p else "gpipe", step * 1e3, t * 1e3, m * t * 1e3,
                         1 - m * t / step, theory, predicted * 1e3, step / predicted,
                         "bubble" if bubble_bound >= cpu_bound else f"cores({cores})"))
        print(f"measured {p} stages in {time.perf_counter() - started:.0f}s", flush=True)

    print(f"\nModel: {LAYERS} x Linear({HIDDEN},{HIDDEN})+Tanh split uniformly over the stages; micro-batch "
          f"{MICRO} rows; fp32, 1 thread per rank, {cores} CPU core(s); gloo on localhost; medians of {steps} steps.")
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"1-minute load average {load_before:.1f} before, {load_after:.1f} after (other processes compete for the "
          f"cores when it exceeds {cores}).")
    print("t = slowest stage's forward+backward for one micro-batch, timed alone before each step. "
          "ideal = m*t (no bubble). "
          "bubble(meas) = 1 - ideal/step; theory = (p-1)/(m+p-1).")
    print("predicted = max((m+p-1)*t, p*m*t/min(cores,p)): the bubble bound, or the CPU bound when ranks "
          "outnumber cores (then all stages cannot compute at once, and the measured idle fraction")
    print("includes time spent waiting for a core, so it exceeds the theoretical bubble by design).\n")
    header = (f"{'stages':>6} {'micro':>5} {'sched':>6} {'step ms':>9} {'t ms':>7} {'ideal ms':>9} "
              f"{'bubble(meas)':>12} {'theory':>7} {'pred ms':>9} {'meas/pred':>9} {'limit':>9}")
    print(header)
    print("-" * len(header))
    for row in rows:
        p, m, sched, step, t, ideal, meas, theory, pred, ratio, limit = row
        print(f"{p:>6} {m:>5} {sched:>6} {step:>9.1f} {t:>7.2f} {ideal:>9.1f} {meas:>12.3f} {theory:>7.3f} "
              f"{pred:>9.1f} {ratio:>9.2f} {limit:>9}")


if __name__ == "__main__":
    main()
