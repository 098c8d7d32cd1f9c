"""Pipeline step time against the bubble that theory predicts, for 2 and 4 stages.

For p stages and m micro-batches a synchronous schedule (GPipe, 1F1B) keeps every stage idle
for a fraction (p - 1) / (m + p - 1) of the step: each stage computes m forward+backward units
in a step of (m + p - 1) units. This script times real ``train_batch`` calls and, inside them,
every stage's compute (``forward_one_chunk`` / ``backward_one_chunk`` of its
``PipelineStage``, so waiting for a neighbour does not count). The measured idle fraction of a
stage is 1 - compute / schedule time; the table shows its mean over the stages next to theory.

The bubble model assumes a core per stage. With more stages than cores (4 stages on a 2-core
machine) the stages cannot all compute at once: a step needs at least p * m * t / cores of wall
time for its p * m units of work t, so each stage idles at least 1 - cores / p of the step. The
prediction is max((p - 1) / (m + p - 1), 1 - cores / p). Other processes on a shared machine
take cores away the same way and raise every row's idle fraction; the load average is printed.
The per-layer work is a dense matmul chain (no sleeps), so all of this shows honestly.

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

HIDDEN, LAYERS, MICRO = 1024, 8, 64


def _layers() -> list:
    from flexspeed.pipe import LayerSpec

    out = []
    for _ in range(LAYERS):
        out += [LayerSpec(nn.Linear, HIDDEN, HIDDEN), LayerSpec(nn.Tanh)]
    return out


def _loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out, target)


def _timed(obj: object, name: str, cell: list[float], slot: int) -> None:
    """Replace ``obj.name`` by a wrapper that adds its run time to ``cell[slot]``."""
    original = getattr(obj, name)

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            cell[slot] += time.perf_counter() - t0

    setattr(obj, name, timed)


def _instrument(engine) -> list[float]:
    """Seconds this rank spends [computing (its stages' forward/backward), in the schedule] per step."""
    cell = [0.0, 0.0]
    for stage in engine.stages:
        _timed(stage, "forward_one_chunk", cell, 0)
        _timed(stage, "backward_one_chunk", cell, 0)
    _timed(engine._schedule, "step", cell, 1)
    return cell


def _rank(rank: int, world: int, micro_counts: list[int], steps: int) -> list[dict]:
    import torch.distributed as dist

    import flexspeed
    from flexspeed.pipe import PipelineModule

    results = []
    for m in micro_counts:
        model = PipelineModule(_layers(), num_stages=world, loss_fn=_loss, partition_method="uniform")
        cfg = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": m,
               "optimizer": {"type": "SGD", "params": {"lr": 1e-4}}, "steps_per_print": 10**9,
               "pipeline": {"schedule": "1f1b"}}
        engine, *_ = flexspeed.initialize(model=model, config=cfg)
        busy = _instrument(engine)
        batches = [(torch.randn(MICRO, HIDDEN), torch.randn(MICRO, HIDDEN)) for _ in range(m)]
        rows = []
        for step in range(steps + 1):
            busy[0] = busy[1] = 0.0
            dist.barrier()
            t0 = time.perf_counter()
            engine.train_batch(iter(batches))
            elapsed = time.perf_counter() - t0
            mine = torch.tensor([elapsed, busy[1], busy[0]])
            every = [torch.zeros(3) for _ in range(world)]
            dist.all_gather(every, mine)
            if step >= 1:  # the first step also infers shapes and allocates buffers
                step_t = max(float(e[0]) for e in every)
                pipe_t = max(float(e[1]) for e in every)
                idle = statistics.mean(1 - float(e[2]) / pipe_t for e in every)
                rows.append((step_t, pipe_t, statistics.mean(float(e[2]) for e in every), idle))
        step_t, pipe_t, busy_t, idle = (statistics.median(col) for col in zip(*rows))
        results.append({"m": m, "step": step_t, "pipe": pipe_t, "busy": busy_t, "idle": idle})
    return results


def _table(rows: list[dict], cores: int, steps: int, loads: tuple[float, float]) -> None:
    print(f"\nModel: {LAYERS} x (Linear({HIDDEN},{HIDDEN}) + Tanh) split uniformly over the stages; micro-batch "
          f"{MICRO} rows; fp32; SGD; 1 thread per rank; schedule 1f1b; gloo on localhost; {cores} CPU core(s); "
          f"medians of {steps} steps.")
    print(f"1-minute load average {loads[0]:.1f} before, {loads[1]:.1f} after: above {cores}, other processes take "
          "cores from the ranks and raise the idle fraction the way the floor does.")
    print("step = train_batch; schedule = its pipeline part (without gradient reduction and optimizer step); "
          "per-mb = a stage's forward+backward time per micro-batch in it (mean over stages);")
    print("idle(meas) = 1 - compute/schedule, mean over stages (time waiting for a neighbour or a core); "
          "theory = (p-1)/(m+p-1).")
    print(f"floor = 1 - cores/p for more stages than the {cores} cores: stages that cannot all compute at once idle at "
          "least that much whatever the micro-batch count; pred = max(theory, floor).")
    print(f"Rows with at most {cores} stages test the bubble model; rows with more are oversubscribed and test the "
          "floor (the bubble shows only where it exceeds it).")
    print()
    header = (f"{'stages':>6} {'micro':>5} {'step ms':>9} {'schedule ms':>11} {'per-mb ms':>9} "
              f"{'idle(meas)':>10} {'theory':>7} {'floor':>6} {'pred':>6} {'meas/pred':>9}")
    print(header)
    print("-" * len(header))
    for r in rows:
        p, m = r["p"], r["m"]
        theory = (p - 1) / (m + p - 1)
        floor = max(0.0, 1 - cores / p)
        pred = max(theory, floor)
        print(f"{p:>6} {m:>5} {r['step'] * 1e3:>9.1f} {r['pipe'] * 1e3:>11.1f} {r['busy'] / m * 1e3:>9.2f} "
              f"{r['idle']:>10.3f} {theory:>7.3f} {floor:>6.3f} {pred:>6.3f} {r['idle'] / pred:>9.2f}")


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
            rows.append({"p": p, **r})
        print(f"measured {p} stages in {time.perf_counter() - started:.0f}s", flush=True)
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    _table(rows, cores, steps, (load_before, load_after))


if __name__ == "__main__":
    main()
