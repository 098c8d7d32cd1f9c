"""How long do checkpoints take, and how large are they, per ZeRO stage and world size?

For each world size (one spawned gloo group each, one thread per rank) and each ZeRO stage:
build the engine (GPT of shared/ANCHORS.md: 4 layers, d_model 256, vocab 1024, 3.7M
parameters; AdamW), take one optimizer step so the optimizer state exists, then

- save: ``engine.save_checkpoint`` (all ranks, wall time of the slowest), median of ``--reps``;
- load: ``engine.load_checkpoint`` into a fresh engine at the same world size and stage, verified
  (every record's CRC-32 checked as it is read) and, interleaved in pairs (order alternating, a warm-up
  pair dropped), a copy without checksums (as saved before they existed): the difference of the medians,
  each pair's overhead (median [min, max]: the spread on a noisy machine), and the share of the verified
  load its loading thread spent verifying (inline checksums + waiting for the verify thread; target < 10%),
  and the CRC-32 time on all threads over the load time (the verify thread's work overlaps the load);
- the save-side checksum cost: each rank hashing its share of the data files (part of save s);
- bytes on disk of one tag, against the 12 bytes/parameter of fp32 weights + Adam's two moments;
- raw PyTorch baseline (same group): rank 0 ``torch.save`` of the full model + optimizer state
  dicts, and ``torch.load(weights_only=True)`` + ``load_state_dict`` of it on every rank (what a
  hand-written DDP loop does; it does not reshard).

``--stall``: the training stall per interval save (``checkpoint.save_interval``), synchronous against
``checkpoint.async_save`` (the state copied, then written on a background thread), side by side on the
same engine.

Then, in this process: ``consolidate`` (what ``flexspeed export`` does) of the world-2 stage-3
checkpoint, and a reshard load (saved at world 2 stage 2, loaded at world 1 stage 0).

``--export-peak``: peak memory of exporting a 167M-parameter (0.67 GB fp32) checkpoint, each way in
its own fresh process (peak RSS over the RSS after imports): the streaming folder export
(``flexspeed export CKPT OUT/ --max-shard-size 200MB``) against consolidating the whole state dict in
memory and writing it (the single-file ``.pt`` path). Target: <= 1.2 x the largest shard + 0.5 GB.

    python benchmarks/checkpoint.py [--worlds 1 2 4] [--stages 0 1 2 3] [--reps 5] [--export-peak | --stall]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

MICRO, SEQ, VOCAB = 4, 128, 1024


def _config(world: int, stage: int) -> dict:
    return {"train_batch_size": MICRO * world, "train_micro_batch_size_per_gpu": MICRO,
            "gradient_accumulation_steps": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
            "zero_optimization": {"stage": stage}, "steps_per_print": 10_000}


def _engine(world: int, stage: int):
    import torch

    import flexspeed
    from flexspeed.models import GPT

    torch.manual_seed(0)
    model = GPT()
    engine, *_ = flexspeed.initialize(model=model, model_parameters=model.parameters(), config=_config(world, stage))
    return engine


def _step(engine) -> None:
    import torch

    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, VOCAB, (MICRO, SEQ + 1), generator=g)
    engine.backward(engine(x[:, :-1], x[:, 1:]))
    engine.step()


def _timed(fn) -> float:
    """Wall seconds of ``fn`` on the slowest rank."""
    import torch
    import torch.distributed as dist

    dist.barrier()
    t0 = time.perf_counter()
    fn()
    took = torch.tensor(time.perf_counter() - t0, dtype=torch.float64)
    dist.all_reduce(took, op=dist.ReduceOp.MAX)
    return float(took)


def _raw_torch(engine, root: str, reps: int) -> tuple[float, float, int]:
    """Rank-0 torch.save of full state dicts, then every rank loads it (the hand-written baseline)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

    path = os.path.join(root, "raw.pt")
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    saves, loads = [], []
    for _ in range(reps):
        def save() -> None:
            msd, osd = get_state_dict(engine.module, engine.optimizer, options=opts)
            if dist.get_rank() == 0:
                torch.save({"model": msd, "optim": osd}, path)

        def load() -> None:
            state = torch.load(path, map_location="cpu", weights_only=True)
            set_state_dict(engine.module, engine.optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"], options=StateDictOptions(full_state_dict=True))

        saves.append(_timed(save))
        loads.append(_timed(load))
    return statistics.median(saves), statistics.median(loads), os.path.getsize(path)


def _group(rank: int, world: int, root: str, stages: list, reps: int) -> list:
    from flexspeed.runtime.checkpoint import dir_bytes

    rows = []
    for stage in stages:
        engine = _engine(world, stage)
        _step(engine)
        save_dir = os.path.join(root, f"w{world}s{stage}")
        saves = [_timed(lambda i=i: engine.save_checkpoint(save_dir, tag=f"t{i}")) for i in range(reps)]
        fresh = _engine(world, stage)
        loads, unverified, hash_s, share, crc_cpu = _verified_vs_unverified(fresh, save_dir, rank, world, reps)
        raw_save, raw_load, raw_bytes = _raw_torch(engine, save_dir, reps) if stage == 0 else (None, None, None)
        if rank == 0:
            rows.append({"world": world, "stage": stage, "save_s": statistics.median(saves),
                         "load_s": statistics.median(loads), "bytes": dir_bytes(os.path.join(save_dir, "t0")),
                         "unverified_load_s": statistics.median(unverified), "hash_s": hash_s,
                         "pair_overheads": sorted(v / u - 1 for v, u in zip(loads, unverified)),
                         "checksum_share": share, "crc_cpu_share": crc_cpu,
                         "raw_save_s": raw_save, "raw_load_s": raw_load, "raw_bytes": raw_bytes})
    return rows


def _verified_vs_unverified(engine, save_dir: str, rank: int, world: int, reps: int
                            ) -> tuple[list, list, float, float, float]:
    """Load times of tag t0 with its checksums and of a copy without them (as saved before checksums
    existed), interleaved in pairs after one warm-up pair, the order alternating (verified first, then
    unverified first) so neither side always meets the warmer cache; the largest share of a verified load
    its loading thread spent verifying (checksums of small files and records inline, plus waiting for the
    verify thread's checks of large ones; timed inside the load, so immune to the noise between two loads
    on a busy machine); and the save-side checksum cost (each rank hashing its share of the data files)."""
    import json
    import warnings

    import torch.distributed as dist

    from flexspeed.runtime import checkpoint_io, checkpoint_verify
    from flexspeed.runtime.checkpoint_io import read_metadata
    from flexspeed.runtime.checkpoint_verify import hash_state_files

    plain = save_dir + "-unverified"
    if rank == 0:
        shutil.copytree(os.path.join(save_dir, "t0"), os.path.join(plain, "t0"))
        file = os.path.join(plain, "t0", "flexspeed_checkpoint.json")
        with open(file) as f:
            manifest = json.load(f)
        manifest.pop("integrity")
        manifest["format_version"] = 1
        with open(file, "w") as f:
            json.dump(manifest, f)
    dist.barrier()
    verified, unverified, in_verify, crc_cpu = [], [], [], []
    spent, cpu = [0.0], [0.0]
    loader = threading.get_ident()
    real_checksum = checkpoint_verify.checksum
    real_wait = checkpoint_io.SafeFileSystemReader._raise_failed_check

    def timed_checksum(*args):  # spent: on the loading thread; cpu: on any thread (the verify thread overlaps)
        t0 = time.perf_counter()
        try:
            return real_checksum(*args)
        finally:
            took = time.perf_counter() - t0
            cpu[0] += took
            if threading.get_ident() == loader:
                spent[0] += took

    def timed_wait(self):  # the loading thread waiting for the verify thread's checks
        t0 = time.perf_counter()
        try:
            return real_wait(self)
        finally:
            spent[0] += time.perf_counter() - t0

    checkpoint_verify.checksum = timed_checksum
    checkpoint_io.SafeFileSystemReader._raise_failed_check = timed_wait
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for i in range(reps + 1):
                spent[0] = 0.0
                sides = [(verified, save_dir), (unverified, plain)]
                for out, where in sides if i % 2 == 0 else sides[::-1]:
                    if out is verified:
                        spent[0] = cpu[0] = 0.0
                    took = _timed(lambda where=where: engine.load_checkpoint(where, tag="t0"))
                    if i > 0:  # pair 0 warms the caches and is dropped
                        out.append(took)
                        if out is verified:
                            in_verify.append(spent[0] / took)
                            crc_cpu.append(cpu[0] / took)
    finally:
        checkpoint_verify.checksum = real_checksum
        checkpoint_io.SafeFileSystemReader._raise_failed_check = real_wait
    state_dir = os.path.join(save_dir, "t0", "state")
    metadata = read_metadata(state_dir)
    files = sorted({str(i.relative_path) for i in metadata.storage_data.values()})
    hash_s = statistics.median(_timed(lambda: hash_state_files(state_dir, files[rank::world], metadata))
                               for _ in range(reps))
    return verified, unverified, hash_s, max(in_verify), max(crc_cpu)


def _stall_group(rank: int, world: int, root: str, stages: list, reps: int) -> list:
    """Training stall per interval save (checkpoint.save_interval), synchronous vs asynchronous, side by side.

    The same engine trains ``4 * (reps + 1)`` steps with a save every 4 steps; the stall of a save is the
    time the training thread spent in it (``AutoSaver.stalls``: for an asynchronous save the copy of the
    state plus any wait for the previous write), the first save of each run left out (warm-up). Also the
    median step time without a save, for scale.
    """
    import torch.distributed as dist

    from flexspeed.runtime.autosave import AutoSaver

    rows = []
    for stage in stages:
        engine = _engine(world, stage)
        _step(engine)
        step_s = statistics.median(_timed(lambda: _step(engine)) for _ in range(3))
        stalls = {}
        for mode in ("sync", "async"):
            saver = AutoSaver(save_dir=os.path.join(root, f"stall-w{world}s{stage}-{mode}"), save_interval=4,
                              keep_last=2, async_save=mode == "async")
            engine.autosaver = saver
            for _ in range(4 * (reps + 1)):
                _step(engine)
            saver.wait()
            engine.autosaver = None
            worst = [0.0] * world
            dist.all_gather_object(worst, statistics.median(saver.stalls[1:]))
            stalls[mode] = max(worst)
        if rank == 0:
            rows.append({"world": world, "stage": stage, "step_s": step_s, **stalls})
    return rows


def _print_stalls(rows: list[dict]) -> None:
    print()
    print("Training stall per interval save (checkpoint.save_interval=4): seconds the training thread spends in "
          "it, median, slowest rank")
    print()
    print("| world | stage | step s (no save) | sync save stall s | async save stall s | async / sync |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['world']} | {r['stage']} | {r['step_s']:.3f} | {r['sync']:.3f} | {r['async']:.3f} | "
              f"{r['async'] / r['sync']:.2f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--export-peak", action="store_true", help="only the export peak-memory comparison")
    ap.add_argument("--stall", action="store_true", help="only the training stall per save, sync vs async")
    args = ap.parse_args()
    if args.export_peak:
        return export_peak()
    if args.stall:
        from flexspeed.testing import run_ranks

        root = tempfile.mkdtemp(prefix="flexspeed-ckpt-stall-")
        try:
            stall_rows = [row for world in args.worlds for row in
                          run_ranks(_stall_group, world_size=world, args=(root, args.stages, args.reps),
                                    timeout=900)[0]]
        finally:
            shutil.rmtree(root, ignore_errors=True)
        _print_stalls(stall_rows)
        return 0

    from flexspeed.models import GPT
    from flexspeed.testing import run_ranks

    n_params = sum(p.numel() for p in GPT().parameters())
    root = tempfile.mkdtemp(prefix="flexspeed-ckpt-bench-")
    rows: list[dict] = []
    try:
        for world in args.worlds:
            print(f"world {world}: stages {args.stages} ...", flush=True)
            rows += run_ranks(_group, world_size=world, args=(root, args.stages, args.reps), timeout=900)[0]
        extra = _single_process(root, args)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    _print_table(rows, extra, n_params, args.reps)
    return 0


def _single_process(root: str, args: argparse.Namespace) -> list[str]:
    """consolidate() and a reshard load, in this process (no process group for consolidate)."""
    from flexspeed.runtime.export import consolidate

    lines = []
    src = os.path.join(root, "w2s3")
    if 2 in args.worlds and 3 in args.stages:
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            state = consolidate(src, tag="t0")
            times.append(time.perf_counter() - t0)
        lines.append(f"consolidate (flexspeed export) of the world-2 stage-3 checkpoint: "
                     f"{statistics.median(times):.3f} s, {len(state)} tensors, no process group")
    if 2 in args.worlds and 2 in args.stages:
        from flexspeed.testing import run_ranks

        took = run_ranks(_reshard_load, world_size=1, args=(os.path.join(root, "w2s2"),), timeout=300)[0]
        lines.append(f"reshard load (saved world 2 stage 2 -> loaded world 1 stage 0): {took:.3f} s")
    return lines


def _reshard_load(rank: int, world: int, path: str) -> float:
    engine = _engine(world, 0)
    return _timed(lambda: engine.load_checkpoint(path, tag="t0"))


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):+.1%} [{min(values):+.1%}, {max(values):+.1%}]"


def _print_table(rows: list[dict], extra: list[str], n_params: int, reps: int) -> None:
    print()
    print(f"GPT {n_params / 1e6:.2f}M parameters, AdamW, fp32; medians of {reps}; wall seconds of the slowest rank; "
          f"12 B/param = fp32 weights + Adam's two moments")
    print()
    print("| world | stage | save s | of it crc32 s | load s | unverified load s | difference | paired overhead "
          "median [min, max] | verify share of load (max) | CRC CPU, all threads (max) | MB on disk | B/param | torch.save s (rank 0) | "
          "torch.load s | torch.save MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        raw = ("-", "-", "-") if r["raw_save_s"] is None else (
            f"{r['raw_save_s']:.3f}", f"{r['raw_load_s']:.3f}", f"{r['raw_bytes'] / 1e6:.1f}")
        overhead = (r["load_s"] - r["unverified_load_s"]) / r["unverified_load_s"]
        print(f"| {r['world']} | {r['stage']} | {r['save_s']:.3f} | {r['hash_s']:.3f} | {r['load_s']:.3f} | "
              f"{r['unverified_load_s']:.3f} | {overhead:+.1%} | {_spread(r['pair_overheads'])} | "
              f"{r['checksum_share']:.1%} | {r['crc_cpu_share']:.1%} | {r['bytes'] / 1e6:.1f} | "
              f"{r['bytes'] / n_params:.1f} | {raw[0]} | {raw[1]} | {raw[2]} |")
    for line in extra:
        print(line)


_PEAK_CHILD = r"""
import json, os, resource, sys, time
import torch, flexspeed.runtime.export as ex
def rss():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith("VmRSS"))
base, t0 = rss(), time.perf_counter()
if sys.argv[1] == "stream":
    ex.export_folder(sys.argv[2], sys.argv[3], max_shard_size="200MB")
else:
    ex.write_state_dict(ex.consolidate(sys.argv[2]), os.path.join(sys.argv[3], "pytorch_model.bin"), "pt")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"extra": peak - base, "seconds": time.perf_counter() - t0}))
"""


def export_peak() -> int:
    """Peak RSS of a streaming folder export vs an in-memory consolidation, each in a fresh process."""
    import json
    import subprocess

    import torch

    import flexspeed
    from flexspeed.models import GPT

    root = tempfile.mkdtemp(prefix="flexspeed-export-bench-")
    try:
        torch.manual_seed(0)
        model = GPT(n_layer=8, n_embd=1024, n_head=16, vocab_size=32000, block_size=1024)
        n = sum(p.numel() for p in model.parameters())
        engine, *_ = flexspeed.initialize(model=model, model_parameters=model.parameters(), config={
            "train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "SGD", "params": {"lr": 0.0}},
            "steps_per_print": 10**6})
        engine.save_checkpoint(os.path.join(root, "ckpt"))
        del engine, model
        rows = []
        for mode in ("stream", "in-memory"):
            out = os.path.join(root, mode)
            os.makedirs(out, exist_ok=True)
            res = subprocess.run([sys.executable, "-c", _PEAK_CHILD, mode, os.path.join(root, "ckpt"), out],
                                 capture_output=True, text=True, timeout=1800, check=True)
            info = json.loads(res.stdout.strip().splitlines()[-1])
            shard = max(os.path.getsize(os.path.join(out, f)) for f in os.listdir(out) if not f.endswith(".json"))
            rows.append((mode, info, shard))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"\nexport of a {n / 1e6:.0f}M-parameter fp32 checkpoint ({4 * n / 1e9:.2f} GB), one process each")
    print("| export | peak RSS over baseline GB | bytes per element | largest file GB | target (1.2 x shard + 0.5 GB) | s |")
    print("|---|---|---|---|---|---|")
    for mode, info, shard in rows:
        target = 1.2 * shard + 0.5e9
        print(f"| {mode} | {info['extra'] / 1e9:.2f} | {info['extra'] / n:.2f} | {shard / 1e9:.2f} | "
              f"{target / 1e9:.2f} ({'met' if info['extra'] <= target else 'missed'}) | {info['seconds']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
