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
- stage 3: flexspeed vs ``fully_shard`` on the units flexspeed builds (``flexspeed.runtime.fsdp.shard_units``:
  consecutive blocks grouped up to min(DeepSpeed's default ``reduce_bucket_size`` 5e8,
  ``stage3_prefetch_bucket_size`` 5e7, ``stage3_max_live_parameters``) elements; this 3.7M-parameter
  model fits one bucket, so with the default budgets the root is the only unit: one all-gather and
  one reduce-scatter per micro-step, as DeepSpeed's buckets do), root default, each unit's
  ``reshard_after_forward`` from ``flexspeed.runtime.fsdp.reshard_plan`` with DeepSpeed's default
  ``stage3_max_live_parameters`` / ``stage3_max_reuse_distance`` (1e9 each: the model stays gathered
  from forward to backward, as DeepSpeed does), both with every parameter sharded (``stage3_param_persistence_threshold: 0``); in bf16 both
  with ``MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=bf16)``, what flexspeed configures
  (DeepSpeed's default ``communication_data_type`` in bf16 runs).
  ``--stage3-budget 0`` sets both budgets to 0 in every column (every block its own unit, released
  after forward and gathered again in backward: the ZeRO-3 memory floor, two all-gathers per block
  per micro-step).

Stage-3 runs reduce-scatter gradients on every micro-step in both columns (flexspeed's choice: a full
gradient never outlives one unit's backward). The raw column keeps ``torch.optim.AdamW``'s default
(multi-tensor) path; flexspeed runs the fused kernel on DTensor shards (docs/zero.md, "The
optimizer step at stage 3"). The metric is CPU-seconds per sample, summed over
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

Peak memory: ``--only NAME`` runs one column alone (no interleaving) and prints each rank's peak
RSS (``ru_maxrss``), so a column's memory is not hidden under another's.

Run it under DeepSpeed's interpreter to get the DeepSpeed column (flexspeed on PYTHONPATH):

    PYTHONPATH=$PWD /work/dsvenv/bin/python benchmarks/train_throughput.py --precision bf16 --stages 3
    python benchmarks/train_throughput.py [--steps 10] [--warmup 2] [--reps 2] [--precision fp32 bf16]
                                          [--stages 0 1 2 3] [--stage3-budget N] [--only NAME]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import statistics
import time

MICRO, GAS, SEQ, VOCAB, LR = 8, 2, 128, 1024, 1e-4
BUDGET = [10**9]  # stage3_max_live_parameters and stage3_max_reuse_distance in every column (--stage3-budget)
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

        # what flexspeed configures: 16-bit gathers, compute and reduction in bf16 runs
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16) \
            if precision == "bf16" else MixedPrecisionPolicy()
        from flexspeed.runtime.fsdp import reshard_plan, shard_units

        blocks = list(model.transformer.h)
        numels = [sum(p.numel() for p in b.parameters()) for b in blocks]
        root = sum(p.numel() for p in model.parameters()) - sum(numels)
        # the units flexspeed builds: DeepSpeed's default bucket sizes (reduce 5e8, prefetch 5e7) and the budget
        groups = shard_units(numels, root, min(5 * 10**7, BUDGET[0]))
        unit_numels = [sum(numels[i] for i in g) for g in groups]
        plan = reshard_plan(unit_numels, root + sum(numels) - sum(unit_numels), BUDGET[0], BUDGET[0])
        for group, reshard in zip(groups, plan):
            members = [blocks[i] for i in group]
            fully_shard(members if len(members) > 1 else members[0], reshard_after_forward=reshard, mp_policy=mp)
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
           "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0,
                                 "stage3_max_live_parameters": BUDGET[0], "stage3_max_reuse_distance": BUDGET[0]},
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
               stages: list[int], names: list[str], budget: int, profile: int = 0) -> dict:
    """Per (precision, stage, name): per-step CPU seconds of this rank (all reps) and the last loss;
    ``"peak_rss"``: this rank's peak resident memory in bytes."""
    import resource

    BUDGET[0] = budget
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
                if profile and rep == 0:  # every rank steps (collectives), rank 0's table is kept
                    for name in names:
                        table = _profile(steppers[name], profile)
                        if rank == 0:
                            out[("profile", precision, stage, name)] = table
                del steppers
    out["peak_rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def _profile(step, n: int) -> str:
    """``torch.profiler`` table of ``n`` steps of ``step`` on this rank: where the CPU time goes."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(n):
            step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60)


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
    parser.add_argument("--stage3-budget", type=int, default=10**9,
                        help="stage3_max_live_parameters = stage3_max_reuse_distance in every column "
                             "(DeepSpeed's default 1e9; 0 = release every block after forward)")
    parser.add_argument("--only", choices=["flexspeed", "raw", "deepspeed"],
                        help="run one column alone, to read its peak RSS per rank")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="also profile N steps of each column on rank 0 (torch.profiler) and print the tables")
    args = parser.parse_args()
    names = ["flexspeed", "raw"]
    try:
        import deepspeed  # noqa: F401

        names.append("deepspeed")
    except ImportError:
        pass
    if args.only:
        if args.only not in names:
            parser.error(f"--only {args.only}: not available here (deepspeed not importable)")
        names = [args.only]
    from flexspeed.testing import run_ranks

    world = 2
    per_rank = run_ranks(_rank_main, world_size=world, timeout=3600, env={"OMP_NUM_THREADS": "1"},
                         args=(args.steps, args.warmup, args.reps, args.precision, args.stages, names,
                                 args.stage3_budget, args.profile))
    per_step = MICRO * GAS * world
    print(f"\nCPU-seconds per sample, both ranks: median over {args.steps} x {args.reps} interleaved steps "
          f"(after {args.warmup} warm-up each; {MICRO}x{GAS}x{world} = {per_step} samples per step)")
    for key, table in per_rank[0].items():
        if key[0] == "profile":
            print(f"\n## torch.profiler, rank 0, {args.profile} steps: {key[1]} stage {key[2]} {key[3]}\n{table}")
    rss = " / ".join(f"{r['peak_rss'] / 2**20:.0f}" for r in per_rank)
    if args.only:
        print(f"| precision | stage | {args.only} CPU-s per sample | peak RSS per rank, MiB |\n|---|---|---|---|")
        for precision in args.precision:
            for stage in args.stages:
                cpu, _ = _summary([r[(precision, stage, args.only)] for r in per_rank])
                print(f"| {precision} | {stage} | {cpu / per_step:.4f} | {rss} |")
        return
    print(f"(stage3_max_live_parameters = stage3_max_reuse_distance = {args.stage3_budget}; peak RSS per rank of "
          f"the whole interleaved run: {rss} MiB)")
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
