"""Training cost of flexspeed's ZeRO stages against the raw PyTorch path each one wraps.

Workload (shared/ANCHORS.md): GPT 4 layers, d_model 256, 4 heads, vocab 1024, seq 128 (3.7M
parameters), world size 2 (gloo, spawned), micro-batch 8, gradient accumulation 2 (32 samples per
step), AdamW, clipping 1.0, one thread per rank.

Side by side in one spawned group, per stage, the two loops built next to each other and their
optimizer steps interleaved (A B B A ...), so load from other processes hits both alike:

- stage 0: flexspeed vs ``DistributedDataParallel`` + AdamW (``no_sync`` while accumulating)
- stage 1: flexspeed vs DDP + ``ZeroRedundancyOptimizer(AdamW)``
- stage 2: flexspeed vs DDP + ``ZeroRedundancyOptimizer(AdamW)`` (PyTorch has no stage 2 that keeps full
  parameters, as DeepSpeed's and flexspeed's do; this is the nearest path: the same parameter and
  optimizer-state layout, all-reducing once per step where flexspeed reduces each micro-step to the owners)
- stage 3: flexspeed vs ``fully_shard(reshard_after_forward=True)`` per block, root default
  (both with every parameter sharded: ``stage3_param_persistence_threshold: 0``; in bf16 both with
  ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)``, what flexspeed configures)

Stage-3 runs reduce-scatter gradients on every micro-step in both columns (flexspeed's choice: a full
gradient never outlives one block's backward). The metric is CPU-seconds per sample, summed over
both ranks (``time.process_time`` of each rank process, so gloo's threads count too), from the
median step; ``ratio`` = raw / flexspeed (>= 0.95 is the target). A measured DeepSpeed column
(same API, same config, interleaved with the other two) appears if ``import deepspeed`` works,
with ``flexspeed / DeepSpeed``; the DeepSpeed figures from ANCHORS.md (this machine kind, 30 steps,
whole-run CPU time) are printed for reference.

Bytes moved: every ``torch.distributed`` all-gather and reduce-scatter a step starts through the
Python API is counted on rank 0 (FSDP2's and DeepSpeed's ZeRO both call it; DDP's bucket all-reduces
run inside its C++ reducer and are not seen): all-gather = bytes of the gathered output,
reduce-scatter = bytes of the unreduced input, per optimizer step. With bf16 the stage-3 gathers
should be half of fp32's (FSDP2 ``param_dtype``).

Run it under DeepSpeed's interpreter to get the DeepSpeed column (flexspeed on PYTHONPATH):

    PYTHONPATH=$PWD /work/dsvenv/bin/python benchmarks/train_throughput.py --precision bf16 --stages 3
    python benchmarks/train_throughput.py [--steps 10] [--warmup 2] [--reps 2] [--precision fp32 bf16]
                                          [--stages 0 1 2 3]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import time

MICRO, GAS, SEQ, VOCAB, LR = 8, 2, 128, 1024, 1e-4
ANCHOR_DEEPSPEED = {("fp32", 0): 0.027, ("fp32", 1): 0.028, ("fp32", 2): 0.029, ("fp32", 3): 0.034}


class CommBytes:
    """Counts the bytes of ``torch.distributed`` all-gathers and reduce-scatters (see the module docstring).

    ``install()`` wraps the module-level functions once per process, before any library captures them;
    nested calls (one API function calling another) are counted once, at the outermost call.
    """

    GATHER = ("all_gather_single", "all_gather_into_tensor", "_all_gather_base", "all_gather")
    SCATTER = ("reduce_scatter_single", "reduce_scatter_tensor", "_reduce_scatter_base", "reduce_scatter")

    def __init__(self) -> None:
        self.counts = {"all_gather": 0, "reduce_scatter": 0}
        self._depth = 0

    @staticmethod
    def _nbytes(t) -> int:
        if isinstance(t, (list, tuple)):
            return sum(CommBytes._nbytes(x) for x in t)
        return t.numel() * t.element_size() if hasattr(t, "numel") else 0

    def _wrap(self, fn, kind: str, which: int):
        def counted(*args, **kwargs):
            if self._depth == 0:
                names = ("output_tensor", "output", "output_tensor_list") if which == 0 else \
                    ("input_tensor", "input", "input_list")
                arg = args[which] if len(args) > which else next((kwargs[n] for n in names if n in kwargs), None)
                self.counts[kind] += self._nbytes(arg)
            self._depth += 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._depth -= 1

        counted._flexspeed_counted = True
        return counted

    def install(self) -> CommBytes:
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d

        for names, kind, which in ((self.GATHER, "all_gather", 0), (self.SCATTER, "reduce_scatter", 1)):
            for name in names:
                fn = getattr(c10d, name, None)
                if fn is None or getattr(fn, "_flexspeed_counted", False):
                    continue
                wrapped = self._wrap(fn, kind, which)
                setattr(c10d, name, wrapped)
                if getattr(dist, name, None) is fn:
                    setattr(dist, name, wrapped)
        return self

    def take(self) -> dict[str, int]:
        """The counts since the last ``take()``, reset."""
        out, self.counts = self.counts, {"all_gather": 0, "reduce_scatter": 0}
        return out


def _batches(rank: int, n: int):
    import torch

    g = torch.Generator().manual_seed(100 + rank)
    x = torch.randint(0, VOCAB, (n, MICRO, SEQ + 1), generator=g)
    return [(b[:, :-1], b[:, 1:]) for b in x]


def _autocast(precision: str):
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def _raw(stage: int, precision: str, batches):
    """The plain PyTorch path; returns ``step() -> last micro-batch loss`` (one optimizer step)."""
    import torch
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    from flexspeed.models import GPT

    torch.manual_seed(0)
    model = GPT()
    if stage <= 2:
        net = DDP(model)
        opt = (torch.optim.AdamW(net.parameters(), lr=LR) if stage == 0 else
               ZeroRedundancyOptimizer(net.parameters(), optimizer_class=torch.optim.AdamW, lr=LR))
    else:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        # what flexspeed configures: 16-bit gathers and compute, fp32 reduction, in bf16 runs
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
            if precision == "bf16" else MixedPrecisionPolicy()
        for block in model.transformer.h:
            fully_shard(block, reshard_after_forward=stage == 3, mp_policy=mp)
        net = fully_shard(model, reshard_after_forward=None if stage == 3 else False, mp_policy=mp)
        opt = torch.optim.AdamW(net.parameters(), lr=LR)
    feed = itertools.cycle(batches)

    def step() -> float:
        for m in range(GAS):
            x, y = next(feed)
            skip_sync = stage <= 2 and m < GAS - 1
            with net.no_sync() if skip_sync else contextlib.nullcontext():
                with _autocast(precision):
                    loss = net(x, y)
                (loss / GAS).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def _engine(lib: str, stage: int, precision: str, batches):
    """flexspeed, or DeepSpeed through the same API (``lib`` is the module name); returns ``step()``."""
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
    return engine_stepper(engine, batches, GAS)


def engine_stepper(engine, batches, gas: int):
    """``step()``: one optimizer step of a DeepSpeed-API engine over ``gas`` micro-batches; returns the
    last micro-batch's loss as a tensor (reading it would sync a device)."""
    feed = itertools.cycle(batches)

    def step():
        for _ in range(gas):
            x, y = next(feed)
            loss = engine(x, y)
            engine.backward(loss)
            engine.step()
        return loss.detach()

    return step


def _rank_main(rank: int, world: int, steps: int, warmup: int, reps: int, precisions: list[str],
               stages: list[int], names: list[str]) -> dict:
    """Per (precision, stage, name): per-step CPU seconds of this rank (all reps) and the last loss."""
    comm = CommBytes().install()  # before DeepSpeed (or FSDP2) can capture the functions
    batches = _batches(rank, 8)
    out: dict = {}
    for precision in precisions:
        for stage in stages:
            for rep in range(reps):
                steppers = {n: _raw(stage, precision, batches) if n == "raw" else _engine(n, stage, precision, batches)
                            for n in names}
                for _ in range(warmup):
                    for fn in steppers.values():
                        fn()
                for k in range(steps):
                    order = names if (k + rep) % 2 == 0 else names[::-1]  # alternate who goes first
                    for name in order:
                        comm.take()
                        t0 = time.process_time()
                        loss = float(steppers[name]())
                        cpu = time.process_time() - t0
                        rec = out.setdefault((precision, stage, name), {"cpu": [], "loss": None, "bytes": []})
                        rec["cpu"].append(cpu)
                        rec["bytes"].append(comm.take())
                        rec["loss"] = loss
                del steppers
    return out


def _summary(recs: list[dict]) -> tuple[float, float]:
    """(median step CPU seconds summed over ranks, last loss averaged over ranks)."""
    return sum(statistics.median(r["cpu"]) for r in recs), statistics.mean(r["loss"] for r in recs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per run (ANCHORS: 30)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--reps", type=int, default=2)
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
    per_step = MICRO * GAS * world
    print(f"\nCPU-seconds per sample, both ranks: median over {args.steps} x {args.reps} interleaved steps "
          f"(after {args.warmup} warm-up each; {MICRO}x{GAS}x{world} = {per_step} samples per step)")
    has_ds = "deepspeed" in names
    ds_head = " DeepSpeed (measured) | flexspeed / DeepSpeed |" if has_ds else ""
    print(f"| precision | stage | flexspeed | raw PyTorch | ratio raw/flexspeed | last loss flexspeed / raw "
          f"|{ds_head} DeepSpeed (ANCHORS, 30 steps) |")
    print("|---" * (9 if has_ds else 7) + "|")
    for precision in args.precision:
        for stage in args.stages:
            cols = {name: _summary([r[(precision, stage, name)] for r in per_rank]) for name in names}
            (f_cpu, f_loss), (r_cpu, r_loss) = cols["flexspeed"], cols["raw"]
            ds = f" {cols['deepspeed'][0] / per_step:.4f} | {f_cpu / cols['deepspeed'][0]:.3f} |" if has_ds else ""
            anchor = ANCHOR_DEEPSPEED.get((precision, stage), "-")
            print(f"| {precision} | {stage} | {f_cpu / per_step:.4f} | {r_cpu / per_step:.4f} | {r_cpu / f_cpu:.3f} | "
                  f"{f_loss:.4f} / {r_loss:.4f} |{ds} {anchor} |")
    print("\nBytes moved per optimizer step on rank 0, MB (all-gather output / reduce-scatter input; DDP's C++ "
          "all-reduces not counted)")
    print("| precision | stage | " + " | ".join(f"{n} all-gather | {n} reduce-scatter" for n in names) + " |")
    print("|---" * (2 + 2 * len(names)) + "|")
    for precision in args.precision:
        for stage in args.stages:
            cells = []
            for name in names:
                steps_bytes = per_rank[0][(precision, stage, name)]["bytes"]
                for kind in ("all_gather", "reduce_scatter"):
                    cells.append(f"{statistics.median(b[kind] for b in steps_bytes) / 1e6:.2f}")
            print(f"| {precision} | {stage} | " + " | ".join(cells) + " |")
    if not has_ds:
        print("(deepspeed is not installed: no measured DeepSpeed column; run under /work/dsvenv/bin/python)")


if __name__ == "__main__":
    main()
