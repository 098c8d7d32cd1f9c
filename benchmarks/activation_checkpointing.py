"""Activation memory with and without ``flexspeed.checkpointing``, side by side in one run.

Workload: a stack of pre-norm transformer MLP blocks (LayerNorm, Linear C->4C, GELU, Linear 4C->C,
residual) on (B, T, C) activations, trained through ``flexspeed.initialize`` with AdamW. The model
calls ``flexspeed.checkpointing.checkpoint(block, x)`` as a DeepSpeed model does; the config's
``activation_checkpointing`` section (applied by ``initialize``) decides what happens to the kept
inputs. Modes:

- ``none``: plain forward (every intermediate is kept for backward);
- ``checkpoint``: each block keeps only its input and is recomputed in backward;
- ``checkpoint+cpu``: ``cpu_checkpointing: true`` as well: those inputs wait in pinned CPU
  memory (only meaningful with a GPU; on a CPU-only run it is the same as ``checkpoint``).

Measured per mode (median of ``--steps`` steps after one warm-up step):

- ``kept MiB``: bytes the forward keeps for backward on the compute device, not counting the
  parameters (on CUDA: memory allocated after forward minus before; on CPU: the tensors the
  autograd graph saves, counted with ``torch.autograd.graph.saved_tensors_hooks``);
- ``peak MiB`` (CUDA only): peak allocated during forward+backward minus the allocation before it;
- ``step ms``: forward+backward+step wall time, idle and with a fixed background load (one
  busy process started by this script), and its ratio to ``none``.

    python benchmarks/activation_checkpointing.py [--batch 8 --seq 512 --width 1024 --depth 12]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from typing import Any

MODES = {"none": None, "checkpoint": {}, "checkpoint+cpu": {"cpu_checkpointing": True}}


def _busy(stop: Any) -> None:
    while not stop.is_set():
        sum(i * i for i in range(10_000))


def _model(width: int, depth: int, use_ckpt: bool) -> Any:
    import torch
    import torch.nn as nn

    import flexspeed

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.norm = nn.LayerNorm(width)
            self.up = nn.Linear(width, 4 * width)
            self.down = nn.Linear(4 * width, width)

        def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
            return x + self.down(nn.functional.gelu(self.up(self.norm(x))))

    class Stack(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(depth))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            for block in self.blocks:
                x = flexspeed.checkpointing.checkpoint(block, x) if use_ckpt else block(x)
            return x

    torch.manual_seed(0)
    return Stack()


def _kept_bytes_cpu(engine: Any, x: Any) -> int:
    import torch

    params = {p.data_ptr() for p in engine.module.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in params:
            seen[t.data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = engine(x).float().pow(2).mean()
    del loss
    return sum(seen.values())


def _step(engine: Any, x: Any, cuda: bool) -> tuple[float, int, int]:
    """One training step: (seconds, bytes kept after forward, peak bytes above the start) - CUDA bytes only."""
    import torch

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start_mem = torch.cuda.memory_allocated() if cuda else 0
    t0 = time.perf_counter()
    loss = engine(x).float().pow(2).mean()
    kept = torch.cuda.memory_allocated() - start_mem if cuda else 0
    engine.backward(loss)
    engine.step()
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - start_mem if cuda else 0
    return time.perf_counter() - t0, kept, peak


def _run_mode(mode: str, args: argparse.Namespace, contended: bool) -> dict:
    import torch
    import torch.distributed as dist

    import flexspeed

    section = MODES[mode]
    cfg = {"train_micro_batch_size_per_gpu": args.batch, "steps_per_print": 10**6,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
           "bf16": {"enabled": args.bf16}, "activation_checkpointing": section or {}}
    model = _model(args.width, args.depth, use_ckpt=section is not None)
    engine, *_ = flexspeed.initialize(model=model, config=cfg)
    cuda = engine.device.type == "cuda"
    x = torch.randn(args.batch, args.seq, args.width, device=engine.device)
    _step(engine, x, cuda)  # warm-up: optimizer state, allocator caches
    times, kept, peak = [], 0, 0
    for _ in range(args.steps):
        seconds, kept, peak = _step(engine, x, cuda)
        times.append(seconds)
    if not cuda:
        kept = _kept_bytes_cpu(engine, x)
    dist.destroy_process_group()
    return {"ms": 1e3 * statistics.median(times), "kept": kept, "peak": peak, "cuda": cuda,
            "contended": contended}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--bf16", action="store_true", help="compute in bf16 under autocast")
    parser.add_argument("--no-contended", action="store_true", help="skip the row under background load")
    args = parser.parse_args()
    import warnings

    warnings.filterwarnings("ignore", message=".*cpu_checkpointing=true has no effect.*")
    rows = {mode: _run_mode(mode, args, contended=False) for mode in MODES}
    loaded: dict[str, dict] = {}
    if not args.no_contended:
        stop = mp.Event()
        worker = mp.Process(target=_busy, args=(stop,), daemon=True)
        worker.start()
        try:
            loaded = {mode: _run_mode(mode, args, contended=True) for mode in MODES}
        finally:
            stop.set()
            worker.join(timeout=5)
    _print_table(args, rows, loaded)


def _print_table(args: argparse.Namespace, rows: dict, loaded: dict) -> None:
    mib = 2**20
    cuda = rows["none"]["cuda"]
    print(f"\nActivation checkpointing: {args.depth} blocks, (B, T, C) = ({args.batch}, {args.seq}, {args.width}), "
          f"{'bf16' if args.bf16 else 'fp32'}, {'CUDA' if cuda else 'CPU (checkpoint+cpu = checkpoint here)'}")
    head = f"{'mode':<16}{'kept MiB':>10}{'x none':>8}" + (f"{'peak MiB':>10}{'x none':>8}" if cuda else "")
    head += f"{'step ms':>10}{'x none':>8}" + (f"{'loaded ms':>11}{'x none':>8}" if loaded else "")
    print(head)
    base = rows["none"]
    for mode, r in rows.items():
        line = f"{mode:<16}{r['kept'] / mib:>10.1f}{r['kept'] / max(base['kept'], 1):>8.2f}"
        if cuda:
            line += f"{r['peak'] / mib:>10.1f}{r['peak'] / max(base['peak'], 1):>8.2f}"
        line += f"{r['ms']:>10.1f}{r['ms'] / base['ms']:>8.2f}"
        if loaded:
            line += f"{loaded[mode]['ms']:>11.1f}{loaded[mode]['ms'] / loaded['none']['ms']:>8.2f}"
        print(line)


if __name__ == "__main__":
    main()
