"""Offloaded generation: flexspeed's block schedule against HF in RAM and HF Accelerate's disk offload.

Model: OPT-1.3B shape (24 layers, hidden 2048, ffn 8192, 32 heads, vocab 50272), random weights
written once as one bf16 safetensors file (2.45 GiB) under ``--cache-dir`` and reused. Prompt
128 tokens, 32 new tokens per row (eos suppressed), bf16, 2 threads.

Every contender runs in its own subprocess, so ``ru_maxrss`` (peak RSS) is its own. In each:

1. the parent drops the model file from the page cache (``POSIX_FADV_DONTNEED``);
2. the contender loads (``load s``) and runs one generate call: the **cold** pass;
3. the whole file is read once sequentially (the same page-cache warm-up for every contender);
4. ``--reps`` timed generate calls; the median is the **warm** tokens/s (batch >= 128: no cold
   pass and one timed call, to keep the run short).

tokens/s = batch x 32 / wall time of one generate call. Contenders:

- ``HF in RAM``: ``OPTForCausalLM.from_pretrained`` + ``generate`` (the in-memory reference);
- ``HF Accelerate disk``: ``device_map`` with ``model.decoder.layers`` on ``"disk"`` (only if
  ``accelerate`` is installed);
- ``fs in memory``: ``init_inference(..., offload=...)`` with every weight resident;
- ``fs 10%``: at most 10% of each layer's weight bytes resident, the rest read in place from the
  safetensors file through the page cache (``B x N`` = micro-batch x block);
- ``fs true-disk``: the same with ``direct_io`` (O_DIRECT: every pass reads the disk), bf16 and int4.

Columns: ``resident`` = share of weight bytes held in memory; ``RSS/(W+KV)`` = peak RSS over
weight bytes plus KV-cache bytes; ``disk GB/s`` = bytes read with direct I/O over the time spent
in those reads (true-disk rows).

    python benchmarks/offload.py [--quick] [--reps 2] [--only fs,hf] [--cache-dir /tmp/flexspeed-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import time

SHAPE = dict(layers=24, hidden=2048, ffn=8192, heads=32, vocab=50272, max_pos=2048)
QUICK = dict(layers=2, hidden=128, ffn=512, heads=4, vocab=1000, max_pos=256)
PROMPT, NEW = 128, 32
# ANCHORS.md, same machine kind: HF Accelerate disk offload and HF in RAM (bf16), DeepSpeed NVMe
ANCHOR = {"accel_b32": 39.60, "hf_ram_b32": 62.36, "ds_nvme_b8": 4.56}


# ------------------------------------------------------------------------------ the model file

def _tensors(shape: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """(key, shape, init) of an HF OPT checkpoint (lm_head tied, so not stored)."""
    c, f, d = shape["hidden"], shape["ffn"], "model.decoder"
    out = [(f"{d}.embed_tokens.weight", (shape["vocab"], c), "normal"),
           (f"{d}.embed_positions.weight", (shape["max_pos"] + 2, c), "normal"),
           (f"{d}.final_layer_norm.weight", (c,), "ones"), (f"{d}.final_layer_norm.bias", (c,), "zeros")]
    for i in range(shape["layers"]):
        p = f"{d}.layers.{i}"
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out += [(f"{p}.self_attn.{n}.weight", (c, c), "normal"), (f"{p}.self_attn.{n}.bias", (c,), "zeros")]
        out += [(f"{p}.fc1.weight", (f, c), "normal"), (f"{p}.fc1.bias", (f,), "zeros"),
                (f"{p}.fc2.weight", (c, f), "normal"), (f"{p}.fc2.bias", (c,), "zeros")]
        for n in ("self_attn_layer_norm", "final_layer_norm"):
            out += [(f"{p}.{n}.weight", (c,), "ones"), (f"{p}.{n}.bias", (c,), "zeros")]
    return sorted(out)


def ensure_model(folder: str, shape: dict) -> str:
    """Write (once) a random-weight OPT folder: config.json + model.safetensors (bf16), tensor by tensor."""
    import torch

    path = os.path.join(folder, "model.safetensors")
    if os.path.isfile(path) and os.path.isfile(os.path.join(folder, "config.json")):
        return folder
    os.makedirs(folder, exist_ok=True)
    cfg = {"model_type": "opt", "architectures": ["OPTForCausalLM"], "hidden_size": shape["hidden"],
           "num_hidden_layers": shape["layers"], "ffn_dim": shape["ffn"], "num_attention_heads": shape["heads"],
           "vocab_size": shape["vocab"], "max_position_embeddings": shape["max_pos"],
           "word_embed_proj_dim": shape["hidden"], "do_layer_norm_before": True, "activation_function": "relu",
           "enable_bias": True, "tie_word_embeddings": True, "pad_token_id": 1, "bos_token_id": 2,
           "eos_token_id": 2, "dtype": "bfloat16", "torch_dtype": "bfloat16"}
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)
    specs, header, offset = _tensors(shape), {}, 0
    for name, shp, _ in specs:
        n = 2
        for s in shp:
            n *= s
        header[name] = {"dtype": "BF16", "shape": list(shp), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps({"__metadata__": {"format": "pt"}, **header}).encode()
    blob += b" " * (-len(blob) % 8)
    gen = torch.Generator().manual_seed(0)
    print(f"writing {path} ({offset / 2**30:.2f} GiB, once)", file=sys.stderr, flush=True)
    with open(path + ".part", "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for _, shp, init in specs:
            t = {"ones": torch.ones, "zeros": torch.zeros}.get(init)
            t = t(shp) if t else torch.randn(shp, generator=gen) * 0.02
            f.write(t.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    os.replace(path + ".part", path)
    return folder


def drop_page_cache(folder: str) -> None:
    for name in os.listdir(folder):
        fd = os.open(os.path.join(folder, name), os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


def warm_page_cache(folder: str) -> None:
    buf = bytearray(64 << 20)
    for name in os.listdir(folder):
        with open(os.path.join(folder, name), "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


# ------------------------------------------------------------------------------ one contender (subprocess)

def _build(spec: dict, folder: str):
    """(generate(ids) callable, info dict) for a contender."""
    import torch

    kind = spec["kind"]
    if kind.startswith("hf"):
        import transformers as tf

        tf.utils.logging.set_verbosity_error()
        kw: dict = {"dtype": torch.bfloat16}
        if kind == "hf-accelerate":
            dmap = {"model.decoder.embed_tokens": "cpu", "model.decoder.embed_positions": "cpu",
                    "model.decoder.final_layer_norm": "cpu", "lm_head": "cpu", "model.decoder.layers": "disk"}
            kw.update(device_map=dmap, offload_folder=os.path.join(spec["tmp"], "accelerate"))
        model = tf.OPTForCausalLM.from_pretrained(folder, **kw).eval()

        def run(ids):
            with torch.inference_mode():
                return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW,
                                      min_new_tokens=NEW, do_sample=False, pad_token_id=1)
        params = list(model.parameters())
        held = sum(p.numel() * p.element_size() for p in params if p.device.type != "meta")
        return run, {"resident": held / sum(p.numel() * p.element_size() for p in params)}
    import flexspeed
    from flexspeed.inference.offload import OffloadedLM

    engine = flexspeed.init_inference(OffloadedLM.from_pretrained(folder), checkpoint=folder, dtype="bf16",
                                      offload=spec["policy"], max_out_tokens=PROMPT + NEW)

    def run(ids):
        return engine.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW)
    s = engine.offload.summary()
    return run, {"resident": s["resident_fraction"], "read_method": s["read_method"], "engine": engine}


def worker(spec: dict, folder: str) -> dict:
    import resource

    import torch

    torch.set_num_threads(spec.get("threads", 2))
    t0 = time.perf_counter()
    run, info = _build(spec, folder)
    load_s = time.perf_counter() - t0
    ids = torch.randint(3, spec["vocab"], (spec["batch"], PROMPT), generator=torch.Generator().manual_seed(0))
    engine = info.pop("engine", None)
    cold = None
    if spec.get("cold", True):
        t0 = time.perf_counter()
        out = run(ids)
        cold = time.perf_counter() - t0
        assert out.shape == (spec["batch"], PROMPT + NEW), out.shape
    warm_page_cache(folder)
    walls, disk = [], None
    if engine is not None:
        engine.offload.reset_stats()
        read0 = engine.offload.store.disk_stats()
    for _ in range(spec["reps"]):
        t0 = time.perf_counter()
        run(ids)
        walls.append(time.perf_counter() - t0)
    if engine is not None:
        read1 = engine.offload.store.disk_stats()
        if read1[0] > read0[0]:
            disk = (read1[0] - read0[0]) / max(1e-9, read1[1] - read0[1]) / 1e9
        stats = engine.offload.summary()
        info["weight_wait_s"] = stats["weight_wait_s"] / max(1, spec["reps"])
    tok = spec["batch"] * NEW
    return {**info, "load_s": load_s, "cold_tps": tok / cold if cold else None,
            "warm_tps": tok / statistics.median(walls),
            "walls": walls, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "disk_gbps": disk}


# ------------------------------------------------------------------------------ driver

def contenders(quick: bool, only: set[str] | None, have_accelerate: bool) -> list[dict]:
    ten = {"w_gpu_percent": 10.0}
    rows = [  # batch 8 first, then 32, then 1, the largest block last (it takes as long as four batch-32 runs)
        ("HF Accelerate disk", "hf-accelerate", 8, {}), ("fs 10%", "fs", 8, {**ten, "gpu_batch_size": 8}),
        ("fs true-disk", "fs", 8, {**ten, "gpu_batch_size": 8, "direct_io": True}),
        ("fs true-disk int4", "fs", 8, {**ten, "gpu_batch_size": 8, "direct_io": True, "compress_weight": True}),
        ("fs in memory", "fs", 8, {"gpu_batch_size": 8}),
        ("HF Accelerate disk", "hf-accelerate", 32, {}), ("fs 10%", "fs", 32, {**ten, "gpu_batch_size": 32}),
        ("fs 10% 8x4", "fs", 32, {**ten, "gpu_batch_size": 8, "num_gpu_batches": 4}),
        ("fs in memory", "fs", 32, {"gpu_batch_size": 32}), ("HF in RAM", "hf", 32, {}),
        ("HF Accelerate disk", "hf-accelerate", 1, {}), ("fs 10%", "fs", 1, {**ten, "gpu_batch_size": 1}),
        ("fs 10% 32x4", "fs", 128, {**ten, "gpu_batch_size": 32, "num_gpu_batches": 4}),
    ]
    out = []
    for label, kind, batch, policy in rows:
        family = "hf" if kind.startswith("hf") else "fs"
        if only and family not in only and label not in only:
            continue
        if kind == "hf-accelerate" and not have_accelerate:
            continue
        if quick and batch > 8:
            continue
        out.append({"label": label, "kind": kind, "batch": batch, "policy": policy})
    return out


def _fmt_row(r: dict, w_bytes: int, kv_tok: int) -> str:
    kv = r["batch"] * (PROMPT + NEW) * kv_tok
    ratio = r["peak_rss"] / (w_bytes + kv)
    disk = f"{r['disk_gbps']:.2f}" if r.get("disk_gbps") else "-"
    cold = f"{r['cold_tps']:>8.2f}" if r.get("cold_tps") else "       -"
    return (f"| {r['label']:<20} | {r['batch']:>5} | {r['warm_tps']:>8.2f} | {cold} "
            f"| {r['load_s']:>6.1f} "
            f"| {r['peak_rss'] / 2**30:>6.2f} | {100 * r['resident']:>5.1f}% | {ratio:>6.2f} | {disk:>5} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny shapes, batches up to 8 (a smoke test)")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--only", default=None, help="comma list: fs, hf, or contender labels")
    ap.add_argument("--cache-dir", default="/tmp/flexspeed-bench")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape = QUICK if args.quick else SHAPE
    folder = os.path.join(args.cache_dir, "opt-quick" if args.quick else "opt-1.3b-random")
    if args.worker:
        print("RESULT " + json.dumps(worker(json.loads(args.worker), folder)), flush=True)
        return
    ensure_model(folder, shape)
    import importlib.util
    import tempfile

    have_acc = importlib.util.find_spec("accelerate") is not None
    only = set(args.only.split(",")) if args.only else None
    results = []
    w_bytes = os.path.getsize(os.path.join(folder, "model.safetensors"))
    kv_tok = 2 * shape["layers"] * shape["hidden"] * 2
    for spec in contenders(args.quick, only, have_acc):
        big = spec["batch"] >= 128  # the largest block: no cold pass, one warm pass, to keep the run short
        spec.update(reps=1 if big else args.reps, cold=not big, vocab=shape["vocab"], threads=args.threads,
                    tmp=tempfile.mkdtemp())
        drop_page_cache(folder)
        cmd = [sys.executable, __file__, "--worker", json.dumps(spec), "--cache-dir", args.cache_dir]
        cmd += ["--quick"] if args.quick else []
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(f"{spec['label']} batch {spec['batch']}: failed\n{proc.stderr[-3000:]}", file=sys.stderr)
            continue
        r = {**spec, **json.loads(line[7:])}
        results.append(r)
        print(f"{r['label']} b{r['batch']}: {r['warm_tps']:.2f} tok/s warm, {r['cold_tps'] or 0:.2f} cold, peak RSS "
              f"{r['peak_rss'] / 2**30:.2f} GiB ({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    print(f"\nOPT {'quick' if args.quick else '1.3B'} shape, bf16 weights {w_bytes / 2**30:.2f} GiB, prompt {PROMPT}, "
          f"{NEW} new tokens, {args.threads} threads, warm = median of {args.reps} (1 for batch >= 128), load average "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| contender            | batch | warm tok/s | cold tok/s | load s | peak RSS GiB | resident | RSS/(W+KV) "
          "| disk GB/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(_fmt_row(r, w_bytes, kv_tok))
    if not args.quick:
        _targets(results, w_bytes, kv_tok)


def _targets(results: list[dict], w_bytes: int, kv_tok: int) -> None:
    def get(label: str, batch: int) -> dict | None:
        return next((r for r in results if r["label"] == label and r["batch"] == batch), None)

    acc = get("HF Accelerate disk", 32)
    acc_tps = acc["warm_tps"] if acc else ANCHOR["accel_b32"]
    hf = get("HF in RAM", 32)
    hf_tps = hf["warm_tps"] if hf else ANCHOR["hf_ram_b32"]
    fs32 = max((r["warm_tps"] for r in results if r["label"].startswith("fs 10%") and r["batch"] == 32), default=0.0)
    best = max((r["warm_tps"] for r in results if r["label"].startswith("fs 10%")), default=0.0)
    b8 = get("fs 10%", 8)
    td = max((r["warm_tps"] for r in results if r["label"].startswith("fs true-disk")), default=0.0)
    print("\ntargets:")
    print(f"- disk-offloaded batch 32: {fs32:.2f} tok/s = {fs32 / acc_tps:.2f}x HF Accelerate ({acc_tps:.2f}"
          f"{'' if acc else ', ANCHORS'}); target >= 1.5x")
    print(f"- best block configuration: {best:.2f} tok/s vs HF in RAM batch 32 {hf_tps:.2f}"
          f"{'' if hf else ' (ANCHORS)'}; target >= 1.0x")
    if b8:
        kv = 8 * (PROMPT + NEW) * kv_tok
        print(f"- batch 8 peak RSS {b8['peak_rss'] / 2**30:.2f} GiB = {b8['peak_rss'] / (w_bytes + kv):.0%} of "
              "weights + KV; target < 40%")
    print(f"- true-disk batch 8: {td:.2f} tok/s = {td / ANCHOR['ds_nvme_b8']:.2f}x DeepSpeed NVMe "
          f"({ANCHOR['ds_nvme_b8']}, ANCHORS); target >= 2x")


if __name__ == "__main__":
    main()
