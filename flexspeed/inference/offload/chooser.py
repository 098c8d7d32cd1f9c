"""Choosing a policy: a quick probe of this machine, a cost model, and a search under a memory budget.

:func:`probe_machine` measures, in about a second: memory read and copy bandwidth, file read
bandwidth (cold through ``O_DIRECT`` and warm through the page cache, on the model's own file
when given), matmul throughput in the compute dtype, and, with CUDA, host-to-device bandwidth.

:func:`estimate` prices one generation (a prompt step, then one step per new token) under a
policy. Per layer and step, compute is ``max(flops / matmul rate, weight bytes / memory
bandwidth)`` (a decode step streams every weight once per block, whatever the micro-batch
count; small micro-batches run matmuls below the probed rate and pay a dispatch overhead each)
and I/O is ``disk bytes / cold disk bandwidth`` plus, with an accelerator, cpu-tier bytes over
the host link; with ``overlap`` a layer costs the larger of the two, else their sum. Disk-tier
bytes the page cache can hold next to the budget are mapped, not read, and cost only the
compute's own stream; the rest is read cold, and all of it is with ``direct_io``. Memory counts
resident weights, two layers in flight, the resident KV cache, one micro-batch's activations and
the logits.

:func:`choose_policy` searches the weight and cache percentages and, unless fixed, the
micro-batch size and block size, and returns the fastest policy that fits the budget (ties go
to the one using less memory, within 1%). It never turns compression on by itself: compression changes
the output, so it is the caller's choice.
"""

from __future__ import annotations

import functools
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch

from flexspeed.inference.offload.arch import Arch
from flexspeed.inference.offload.policy import OffloadPolicy, place_by_size

__all__ = ["MachineProfile", "probe_machine", "estimate", "choose_policy", "replace_policy", "available_memory"]

_INT4_BYTES = 0.5 + 4 / 64  # packed values plus a bf16 (scale, offset) pair per group of 64
_PROBE_ROWS, _HALF_ROWS = 512, 64  # matmul rate at M rows ~ M / (M + 64) of the peak (probed at M = 512)
_CALL_OVERHEAD_S = 3e-4  # per layer and micro-batch: Python and kernel dispatch


@dataclass(frozen=True)
class MachineProfile:
    """Measured rates of this machine (bytes/s, FLOP/s)."""

    mem_read_bw: float
    """Bytes/s a reduction reads (what a decode step's weight stream is bound by)."""
    mem_copy_bw: float
    """Bytes/s a tensor copy moves (read + write counted once each)."""
    disk_cold_bw: float
    """Bytes/s of ``O_DIRECT`` reads (the page cache bypassed)."""
    disk_warm_bw: float
    """Bytes/s of reads served by the page cache."""
    matmul_flops: float
    """FLOP/s of a large matmul in the compute dtype."""
    h2d_bw: float = 0.0
    """Host-to-device bytes/s (accelerators; 0 on CPU-only machines)."""
    device: str = "cpu"

    def describe(self) -> str:
        g = 1e9
        text = (f"memory read {self.mem_read_bw / g:.1f} GB/s, copy {self.mem_copy_bw / g:.1f} GB/s; file read cold "
                f"{self.disk_cold_bw / g:.2f} GB/s, warm {self.disk_warm_bw / g:.1f} GB/s; matmul "
                f"{self.matmul_flops / g:.0f} GFLOP/s")
        return text + (f"; host->device {self.h2d_bw / g:.1f} GB/s" if self.h2d_bw else "")


def available_memory() -> int:
    """``MemAvailable`` of ``/proc/meminfo`` in bytes (total RAM where that file is missing)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _best(fn: Any, reps: int = 3) -> float:
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _file_bandwidth(path: str | None, nbytes: int) -> tuple[float, float]:
    """(cold O_DIRECT, warm page-cache) read bandwidth over up to ``nbytes`` of ``path``."""
    from flexspeed.inference.offload.files import AlignedBuffer, DirectFile

    own = None
    if path is None or os.path.getsize(path) < (8 << 20):
        fd, own = tempfile.mkstemp(prefix="flexspeed-probe-")
        block = os.urandom(1 << 20)
        for _ in range(nbytes >> 20):
            os.write(fd, block)
        os.fsync(fd)
        os.close(fd)
        path = own
    try:
        n = min(nbytes, os.path.getsize(path)) // 4096 * 4096
        reader = DirectFile(path)
        buf = AlignedBuffer(n)
        cold = n / _best(lambda: reader.read_runs([(0, n)], buf), reps=1)
        reader.close()
        fd = os.open(path, os.O_RDONLY)
        mv = buf.memview(0, n)
        os.preadv(fd, [mv], 0)  # make it warm
        warm = n / _best(lambda: os.preadv(fd, [mv], 0), reps=2)
        os.close(fd)
        return cold, warm
    finally:
        if own is not None:
            os.unlink(own)


@functools.cache
def _probe(path: str | None, dtype: torch.dtype, device: str, file_bytes: int) -> MachineProfile:
    x = torch.ones(32 << 20)  # 128 MB of fp32
    y = torch.empty_like(x)
    read = x.numel() * 4 / _best(lambda: x.sum())
    copy = 2 * x.numel() * 4 / _best(lambda: y.copy_(x))
    dev = torch.device(device)
    a = torch.full((512, 2048), 0.5, dtype=dtype, device=dev)  # a timing only: no draw from the user's RNG
    b = torch.full((2048, 2048), 0.25, dtype=dtype, device=dev)
    a @ b
    flops = 2 * 512 * 2048 * 2048 / _best(lambda: (a @ b, torch.cuda.synchronize() if dev.type == "cuda" else None))
    h2d = 0.0
    if dev.type == "cuda":
        host = torch.empty(64 << 20, dtype=torch.uint8).pin_memory()
        h2d = host.numel() / _best(lambda: (host.to(dev, non_blocking=True), torch.cuda.synchronize()))
    cold, warm = _file_bandwidth(path, file_bytes)
    return MachineProfile(read, copy, cold, warm, flops, h2d, device)


def probe_machine(path: str | None = None, dtype: torch.dtype = torch.bfloat16, device: str = "cpu",
                  file_bytes: int = 128 << 20) -> MachineProfile:
    """Measure this machine (cached per process for the same arguments).

    Args:
        path: a weight file to time reads on (a temporary file is written when ``None``).
        dtype: the compute dtype for the matmul probe.
        device: the compute device.
        file_bytes: how much of the file to read.
    """
    return _probe(path, dtype, device, file_bytes)


# ------------------------------------------------------------------------------ cost model

@functools.lru_cache(maxsize=4096)
def _split(sizes: tuple[int, ...], percents: tuple[float, float, float]) -> tuple[int, int, int]:
    """(gpu, cpu, disk) bytes of one layer whose tensors have ``sizes``."""
    tiers = place_by_size(sizes, percents)
    return (sum(s for s, t in zip(sizes, tiers) if t == "gpu"), sum(s for s, t in zip(sizes, tiers) if t == "cpu"),
            sum(s for s, t in zip(sizes, tiers) if t == "disk"))


def _layer_sizes(arch: Arch, elem: int, compress: bool) -> list[tuple[int, ...]]:
    return [tuple(int(math.prod(t.shape) * (_INT4_BYTES if compress and t.matrix else elem)) for t in layer.tensors)
            for layer in arch.layers]


def estimate(arch: Arch, policy: OffloadPolicy, profile: MachineProfile, *, batch: int, prompt_len: int,
             gen_len: int, dtype: torch.dtype = torch.bfloat16, mem_budget: int | None = None) -> dict[str, float]:
    """Predicted seconds, tokens/s and memory of one ``generate`` call under ``policy``.

    Decode steps are priced at the mean context length. On an accelerator ``memory_bytes`` is
    device memory (host memory is taken as ample); on a CPU-only machine it is RAM.

    Returns:
        ``{"prefill_s", "decode_s", "total_s", "tokens_per_s", "memory_bytes", "weight_resident_bytes",
        "disk_bytes_per_step"}``.
    """
    elem, accel = dtype.itemsize, profile.device != "cpu"
    sizes = _layer_sizes(arch, elem, policy.compress_weight)
    splits = [_split(s, policy.percents("w")) for s in sizes]
    disk_total = sum(d for _, _, d in splits)
    page_cache = max(0, available_memory() - (0 if accel else mem_budget or 0))
    # page-cache hits cost no more than the compute's own stream over the mapped bytes; misses read cold
    cold = 1.0 if policy.direct_io else (1.0 - min(1.0, page_cache / disk_total) if disk_total else 0.0)
    kv_tok = arch.kv_bytes_per_token(elem) / max(1, arch.n_layers)  # one layer, one token
    if policy.compress_cache:
        kv_tok *= (0.5 + 4 / 64) / elem  # int4 values plus a float16 pair per group of 64
    cache_gpu, cache_cpu, cache_disk = (p / 100 for p in policy.percents("cache"))
    flop_rate = profile.matmul_flops * (0.7 if policy.compress_weight else 1.0)  # dequantizing costs time

    mb = policy.gpu_batch_size or math.ceil(batch / policy.num_gpu_batches)
    n_micro = math.ceil(batch / mb)

    def step(rows: int, ctx: int) -> float:
        m = rows // n_micro  # matmul rows per micro-batch: small ones run below the probed rate
        rate = flop_rate * (m / (m + _HALF_ROWS)) / (_PROBE_ROWS / (_PROBE_ROWS + _HALF_ROWS))
        total = 0.0
        for j, (gpu, cpu, disk) in enumerate(splits):
            layer = arch.layers[j]
            if layer.kind == "embed":
                continue  # row lookups: negligible
            params = math.prod(layer.tensors[-1].shape) if layer.kind == "head" else \
                sum(math.prod(t.shape) for t in layer.tensors)
            flops, kv = 2 * params * rows, 0.0
            if layer.kind == "decoder":
                flops += 4 * rows * ctx * arch.n_heads * arch.head_dim
                kv = batch * ctx * kv_tok
            # every micro-batch's matmuls stream the layer's weights from memory again (measured on
            # CPU: OPT-1.3B at batch 32, 8 x 4 ran at 0.71x of 32 x 1)
            streamed = n_micro * (gpu + cpu + disk) + kv * (cache_gpu + cache_cpu)
            compute = max(flops / rate, streamed / profile.mem_read_bw)
            compute += n_micro * _CALL_OVERHEAD_S
            if not accel:  # cache rows read from and written to files are copied by the same cores
                compute += 2 * kv * cache_disk / profile.mem_copy_bw
            io = disk * cold / profile.disk_cold_bw + kv * cache_disk / profile.disk_cold_bw
            if accel:
                io += (cpu + kv * cache_cpu) / profile.h2d_bw
            total += max(compute, io) if policy.overlap else compute + io
        return total

    prefill = step(batch * prompt_len, prompt_len)
    decode = (gen_len - 1) * step(batch, prompt_len + gen_len // 2)
    weights = sum(g if accel else g + c for g, c, _ in splits)
    in_flight = 2 * max(sum(s) - (g if accel else g + c) for s, (g, c, _) in zip(sizes, splits))
    widest = max((max(t.shape) for t in arch.layers[1].tensors if t.kind in ("linear", "conv1d")), default=arch.hidden)
    acts = mb * prompt_len * (4 * arch.hidden + 2 * widest) * elem + batch * arch.vocab * 4
    kv_mem = batch * (prompt_len + gen_len) * kv_tok * arch.n_layers * (cache_gpu if accel else cache_gpu + cache_cpu)
    total = prefill + decode
    return {"prefill_s": prefill, "decode_s": decode, "total_s": total,
            "tokens_per_s": batch * gen_len / total if total else math.inf,
            "memory_bytes": weights + in_flight + kv_mem + acts, "weight_resident_bytes": weights,
            "disk_bytes_per_step": disk_total}


def _pow2(limit: int) -> list[int]:
    return [1 << i for i in range(int(math.log2(max(1, limit))) + 1)]


def choose_policy(arch: Arch, mem_budget: int, profile: MachineProfile, *, prompt_len: int, gen_len: int,
                  base: OffloadPolicy | None = None, gpu_batch_size: int | None = None,
                  num_gpu_batches: int | None = None, max_batch: int = 64,
                  dtype: torch.dtype = torch.bfloat16) -> tuple[OffloadPolicy, dict[str, float]]:
    """The fastest policy whose estimated memory fits ``mem_budget`` bytes.

    Candidates within 1% of the best throughput count as equal; the one needing the least memory
    wins among them.

    Args:
        arch: the model.
        mem_budget: bytes the weights, KV cache and working buffers may hold (RAM on a CPU-only
            machine, device memory with an accelerator).
        profile: measured rates (:func:`probe_machine`).
        prompt_len, gen_len: the workload.
        base: flags kept as given (compression, direct_io, overlap, offload_dir).
        gpu_batch_size, num_gpu_batches: fix these instead of searching them.
        max_batch: largest effective batch (micro-batch x block) searched.
        dtype: the compute dtype.
    Returns:
        (policy, its :func:`estimate`).
    Raises:
        ValueError: nothing fits, not even with every weight and the whole cache on disk; the
            message gives the smallest budget that would.
    """
    base = base or OffloadPolicy()
    accel = profile.device != "cpu"
    gbs_list = [gpu_batch_size] if gpu_batch_size else _pow2(max_batch)
    ngb_list = [num_gpu_batches] if num_gpu_batches else _pow2(max_batch)
    found: list[tuple[float, float, OffloadPolicy, dict[str, float]]] = []
    smallest = math.inf
    for gbs in gbs_list:
        for ngb in ngb_list:
            if gbs * ngb > max_batch and not (gpu_batch_size and num_gpu_batches):
                continue
            for w in range(0, 101, 5):
                for cache in (100, 75, 50, 25, 0):
                    rest_w, rest_c = (100.0 - w, 100.0 - cache) if accel else (0.0, 0.0)  # accelerators: rest on host
                    pol = replace_policy(base, gpu_batch_size=gbs, num_gpu_batches=ngb, w_gpu_percent=float(w),
                                         w_cpu_percent=rest_w, cache_gpu_percent=float(cache), cache_cpu_percent=rest_c)
                    est = estimate(arch, pol, profile, batch=gbs * ngb, prompt_len=prompt_len, gen_len=gen_len,
                                   dtype=dtype, mem_budget=mem_budget)
                    smallest = min(smallest, est["memory_bytes"])
                    if est["memory_bytes"] <= mem_budget:
                        found.append((est["tokens_per_s"], est["memory_bytes"], pol, est))
    if not found:
        raise ValueError(f"mem_budget={_size(mem_budget)} is too small for this model even with every weight "
                         f"on disk; the smallest configuration needs about {_size(smallest)} (raise "
                         "--mem-budget, lower --gpu-batch-size or --prompt-len, or add --compress-weight)")
    top = max(f[0] for f in found)
    _, _, pol, est = min((f for f in found if f[0] >= 0.99 * top), key=lambda f: (f[1], -f[0]))
    return pol, est


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def replace_policy(policy: OffloadPolicy, **changes: Any) -> OffloadPolicy:
    """A copy of a frozen policy with some fields changed (validated again)."""
    return OffloadPolicy(**{**policy.model_dump(), **changes})
