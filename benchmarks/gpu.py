"""GPU benchmarks, side by side in one run: training per ZeRO stage, decode, offloaded generation.

Written for one NVIDIA H200 (absolute numbers hold on that GPU kind only; compare the ratios).
``--quick`` shrinks every shape so the whole script runs on a CPU in a minute (a smoke test of
the script itself; its numbers mean nothing).

Sections (``--sections train,decode,offload``):

- ``train``: a GPT of GPT-2-medium shape (24 layers, d_model 1024, 16 heads, vocab 50304,
  sequence 1024: 354M parameters), bf16, micro-batch 8, gradient accumulation 2, AdamW, clipping
  1.0, one GPU (world size 1, NCCL). Per ZeRO stage: flexspeed against the raw PyTorch path it
  wraps (stage 0 ``DistributedDataParallel``, 1 plus ``ZeroRedundancyOptimizer``, 2 and 3
  ``fully_shard`` per block and root, all under ``torch.autocast(bfloat16)``), built side by side
  in one process, their optimizer steps interleaved (A B B A ...); ``ratio`` = raw step time /
  flexspeed step time (target >= 0.97). DeepSpeed (same model, data and config, its torch AdamW)
  runs in a subprocess when ``import deepspeed`` works there.
- ``decode``: OPT-1.3B shape (24 layers, hidden 2048, ffn 8192, vocab 50272) and a Llama shape
  (16 layers, hidden 2048, 32 heads, 8 KV heads, ffn 5632, vocab 32000), random weights, bf16,
  prompt 128, 32 new tokens (eos suppressed), batch 1 and 32: HF ``generate`` against
  ``init_inference(replace_with_kernel_inject=True)`` (decode steps replayed from CUDA graphs)
  and the same engine with graphs off. ``decode ms`` = (full call - prompt-only call) / 31;
  ``floor ms`` = weight bytes read per step / the device's read bandwidth measured in the same
  run (a ``sum`` over a 4 GiB buffer).
- ``offload``: OPT-1.3B shape, bf16 (2.6 GB of weights) under a GPU budget of 0.6 GiB for
  weights: flexspeed ``offload={"w_gpu_percent": 20, "w_cpu_percent": 80}`` (pinned host
  weights, copies on a side stream) against HF Accelerate's ``device_map`` CPU offload
  (``max_memory={0: "0.6GiB"}``: the layers that do not fit stay in host memory and are moved to
  the GPU for each call), batch 1 and 32, prompt 128, 32 new tokens.

    python benchmarks/gpu.py [--sections train,decode,offload] [--quick] [--json results.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

TRAIN = dict(n_layer=24, n_embd=1024, n_head=16, vocab_size=50304, block_size=1024, bias=False)
TRAIN_QUICK = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=256, block_size=32, bias=False)
MICRO, GAS, LR = 8, 2, 1e-4
OPT = dict(layers=24, hidden=2048, ffn=8192, heads=32, vocab=50272)
LLAMA = dict(layers=16, hidden=2048, ffn=5632, heads=32, kv=8, vocab=32000)
QUICK_LM = dict(layers=2, hidden=64, ffn=128, heads=4, kv=2, vocab=512)
PROMPT, NEW = 128, 32


def device() -> torch.device:
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object]) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def peak_reset() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_gib(base: int = 0) -> float | None:
    """Peak device memory since the last :func:`peak_reset`, less ``base`` bytes (what was already held)."""
    return (torch.cuda.max_memory_allocated() - base) / 2**30 if torch.cuda.is_available() else None


def allocated() -> int:
    return torch.cuda.memory_allocated() if torch.cuda.is_available() else 0


# ------------------------------------------------------------------------------------------ train

def _train_data(shape: dict, n: int, dev: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(100)
    x = torch.randint(0, shape["vocab_size"], (n, MICRO, shape["block_size"] + 1), generator=g)
    return [(b[:, :-1].to(dev), b[:, 1:].to(dev)) for b in x]


def _train_config(stage: int, lib: str) -> dict:
    params: dict = {"lr": LR, "weight_decay": 0.0}
    if lib == "deepspeed":
        params["torch_adam"] = True  # DeepSpeed's FusedAdam is a C++/CUDA op not built with DS_BUILD_OPS=0
    cfg = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": GAS,
           "optimizer": {"type": "AdamW", "params": params}, "gradient_clipping": 1.0,
           "bf16": {"enabled": True}, "steps_per_print": 10**6,
           "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}}
    if lib == "deepspeed":
        cfg["zero_allow_untested_optimizer"] = True
    return cfg


def _raw_stepper(stage: int, shape: dict, data: list) -> Callable[[], float]:
    """The plain PyTorch path flexspeed wraps at ``stage``; ``step()`` runs one optimizer step."""
    import contextlib
    import itertools

    from torch.distributed.fsdp import fully_shard
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    from flexspeed.models import GPT

    dev = device()
    torch.manual_seed(0)
    with dev:  # random init on the device: seconds instead of a minute for 354M parameters on the host
        model = GPT(**shape)
    if stage < 2:
        net = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
        opt = (torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=0.0) if stage == 0 else
               ZeroRedundancyOptimizer(net.parameters(), optimizer_class=torch.optim.AdamW, lr=LR, weight_decay=0.0))
    else:
        for block in model.transformer.h:
            fully_shard(block, reshard_after_forward=stage == 3)
        net = fully_shard(model, reshard_after_forward=None if stage == 3 else False)
        opt = torch.optim.AdamW(net.parameters(), lr=LR, weight_decay=0.0)
    feed = itertools.cycle(data)

    def step() -> float:
        for m in range(GAS):
            x, y = next(feed)
            with net.no_sync() if stage < 2 and m < GAS - 1 else contextlib.nullcontext():
                with torch.autocast(dev.type, dtype=torch.bfloat16):
                    loss = net(x, y)
                (loss / GAS).backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def _engine_stepper(lib: str, stage: int, shape: dict, data: list) -> Callable[[], float]:
    """flexspeed or DeepSpeed through the shared API; ``step()`` runs one optimizer step."""
    import importlib

    from flexspeed.models import GPT

    library = importlib.import_module(lib)
    torch.manual_seed(0)
    with device():
        model = GPT(**shape)
    engine, *_ = library.initialize(model=model, model_parameters=model.parameters(),
                                    config=_train_config(stage, lib))
    from benchmarks.train_throughput import engine_stepper

    return engine_stepper(engine, data, GAS)


def _init_single_process_group(lib: str) -> None:
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1")
    from flexspeed.testing import free_port

    os.environ["MASTER_PORT"] = str(free_port())  # never the parent's: it still listens on its own
    if lib == "deepspeed":
        import deepspeed

        deepspeed.init_distributed()
    else:
        import flexspeed

        flexspeed.init_distributed()


def train_worker(names: list[str], stages: list[int], steps: int, warmup: int, quick: bool) -> dict:
    """Per (stage, name): step seconds (interleaved), peak GiB during warm-up, last loss."""
    shape = TRAIN_QUICK if quick else TRAIN
    _init_single_process_group(names[0] if names == ["deepspeed"] else "flexspeed")
    data = _train_data(shape, 4, device())
    out: dict = {}
    for stage in stages:
        steppers, peaks = {}, {}
        for name in names:
            sync()
            base = allocated()  # the other variants' states, still alive: not this one's
            peak_reset()
            fn = _raw_stepper(stage, shape, data) if name == "raw" else _engine_stepper(name, stage, shape, data)
            for _ in range(warmup):
                fn()
            sync()
            steppers[name], peaks[name] = fn, peak_gib(base)
        for k in range(steps):
            for name in (names if k % 2 == 0 else names[::-1]):
                sync()
                t0 = time.perf_counter()
                loss = steppers[name]()
                sync()
                rec = out.setdefault(f"{stage}/{name}", {"s": [], "peak_gib": peaks[name]})
                rec["s"].append(time.perf_counter() - t0)
                rec["loss"] = float(loss)
        del steppers
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return out


def bench_train(args: argparse.Namespace) -> list[dict]:
    stages = [0, 1, 2, 3]
    steps, warmup = (2, 1) if args.quick else (args.train_steps, 2)
    res = train_worker(["flexspeed", "raw"], stages, steps, warmup, args.quick)
    ds: dict = {}
    cmd = [sys.executable, __file__, "--ds-worker", json.dumps({"stages": stages, "steps": steps, "warmup": warmup,
                                                               "quick": args.quick})]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.ds_timeout)
        if proc.returncode == 0:
            ds = json.loads(proc.stdout.strip().splitlines()[-1])
        else:
            ds = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"rc {proc.returncode}"}
            sys.stderr.write(proc.stderr[-4000:])
    except subprocess.TimeoutExpired:
        ds = {"error": f"timed out after {args.ds_timeout} s"}
    shape = TRAIN_QUICK if args.quick else TRAIN
    tokens = MICRO * GAS * shape["block_size"]
    rows = []
    for stage in stages:
        f, r = res[f"{stage}/flexspeed"], res[f"{stage}/raw"]
        fs, rs = statistics.median(f["s"]), statistics.median(r["s"])
        row = {"section": "train", "stage": stage, "flexspeed_ms": fs * 1e3, "raw_ms": rs * 1e3, "ratio_raw_over_fs": rs / fs,
               "flexspeed_tok_s": tokens / fs, "flexspeed_peak_gib": f["peak_gib"], "raw_peak_gib": r["peak_gib"],
               "loss_fs": f["loss"], "loss_raw": r["loss"]}
        d = ds.get(f"{stage}/deepspeed")
        if d:
            row.update(deepspeed_ms=statistics.median(d["s"]) * 1e3, deepspeed_peak_gib=d["peak_gib"],
                       ratio_ds_over_fs=statistics.median(d["s"]) / fs, loss_ds=d["loss"])
        elif "error" in ds:
            row["deepspeed"] = ds["error"]
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------- decode

def build_lm(family: str, shape: dict, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """An HF causal LM of the given shape with random (seeded) weights, eval mode, on the CPU."""
    import transformers as tf

    tf.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    if family == "opt":
        cfg = tf.OPTConfig(num_hidden_layers=shape["layers"], hidden_size=shape["hidden"], ffn_dim=shape["ffn"],
                           num_attention_heads=shape["heads"], vocab_size=shape["vocab"],
                           word_embed_proj_dim=shape["hidden"], max_position_embeddings=2048)
        cls = tf.OPTForCausalLM
    else:
        cfg = tf.LlamaConfig(num_hidden_layers=shape["layers"], hidden_size=shape["hidden"],
                             intermediate_size=shape["ffn"], num_attention_heads=shape["heads"],
                             num_key_value_heads=shape.get("kv", shape["heads"]), vocab_size=shape["vocab"],
                             max_position_embeddings=2048)
        cls = tf.LlamaForCausalLM
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):  # random init on the GPU is faster
        model = cls(cfg)
    return model.to(dtype).cpu().eval()


def read_bandwidth(gib: float = 4.0) -> float:
    """Device read bandwidth, bytes/s: median of 10 ``sum`` over a ``gib`` GiB bf16 buffer."""
    dev = device()
    n = int(gib * 2**30) // 2
    x = torch.ones(n, dtype=torch.bfloat16, device=dev)
    x.sum()
    times = [timed(lambda: x.sum()) for _ in range(10)]
    del x
    return n * 2 / statistics.median(times)


def decode_read_bytes(model: torch.nn.Module) -> int:
    """Bytes of weights a decode step reads: every Linear/norm weight (embeddings: one row, ignored)."""
    seen, total = set(), 0
    for mod in model.modules():
        kind = type(mod).__name__
        if isinstance(mod, torch.nn.Linear) or kind in ("QuantLinear",) or "Norm" in kind:
            for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
                if t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += t.numel() * t.element_size()
    return total


def _decode_configs(family: str, shape: dict) -> list[tuple[str, torch.nn.Module, Callable]]:
    import flexspeed
    from flexspeed.inference.kernels import get_runner

    base = build_lm(family, shape)
    dev = device()
    hf = copy.deepcopy(base).to(dev)

    def hf_run(ids: torch.Tensor, new: int) -> torch.Tensor:
        return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0)

    out = [("HF generate", hf, hf_run)]
    for label, graphs in (("fs inject", True), ("fs inject, graphs off", False)):
        engine = flexspeed.init_inference(copy.deepcopy(base), dtype="bf16", replace_with_kernel_inject=True)
        get_runner(engine.module).cuda_graphs = graphs
        out.append((label, engine.module,
                    lambda ids, new, e=engine: e.generate(ids, max_new_tokens=new, min_new_tokens=new)))
    return out


def bench_decode(args: argparse.Namespace) -> list[dict]:
    bw = read_bandwidth(0.25 if args.quick else 4.0)
    rows = []
    families = [("opt", QUICK_LM if args.quick else OPT), ("llama", QUICK_LM if args.quick else LLAMA)]
    reps = 1 if args.quick else args.reps
    for family, shape in families:
        configs = _decode_configs(family, shape)
        read = decode_read_bytes(configs[0][1])
        for batch in (1, 32):
            ids = torch.randint(3, shape["vocab"], (batch, PROMPT), generator=torch.Generator().manual_seed(batch))
            ids = ids.to(device())
            full: dict[str, list[float]] = {c[0]: [] for c in configs}
            pre: dict[str, list[float]] = {c[0]: [] for c in configs}
            outs = {}
            with torch.inference_mode():
                for label, _, run in configs:  # warm-up: allocations, graph capture, cuBLAS handles
                    run(ids, NEW)
                for _ in range(reps):
                    for label, _, run in configs:
                        full[label].append(timed(lambda: outs.__setitem__(label, run(ids, NEW))))
                        pre[label].append(timed(lambda: run(ids, 1)))
            hf_tps = batch * NEW / statistics.median(full["HF generate"])
            floor_ms = read / bw * 1e3
            for label, _, _ in configs:
                f, p = statistics.median(full[label]), statistics.median(pre[label])
                dec_ms = (f - p) / (NEW - 1) * 1e3
                same = bool(torch.equal(outs[label].cpu(), outs["HF generate"].cpu()))
                rows.append({"section": "decode", "model": family, "batch": batch, "config": label,
                             "tok_s": batch * NEW / f, "vs_hf": batch * NEW / f / hf_tps, "decode_ms": dec_ms,
                             "prefill_ms": p * 1e3, "floor_ms": floor_ms, "x_floor": dec_ms / floor_ms,
                             "read_gb": read / 1e9, "bandwidth_gbs": bw / 1e9, "tokens_equal_hf": same})
        del configs
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------- offload

def bench_offload(args: argparse.Namespace) -> list[dict]:
    import flexspeed

    shape = QUICK_LM if args.quick else OPT
    budget = "0.6GiB"
    base = build_lm("opt", shape)
    w_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    contenders: list[tuple[str, Callable]] = []
    policy = {"w_gpu_percent": 20, "w_cpu_percent": 80, "cache_gpu_percent": 100, "pin_weight": True}
    engine = flexspeed.init_inference(copy.deepcopy(base), dtype="bf16", offload=policy)
    contenders.append(("fs offload 20% on GPU",
                       lambda ids: engine.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW)))
    acc_info = None
    try:
        from accelerate import dispatch_model, infer_auto_device_map

        if torch.cuda.is_available():
            hf = copy.deepcopy(base)
            dmap = infer_auto_device_map(hf, max_memory={0: budget, "cpu": "100GiB"},
                                         no_split_module_classes=["OPTDecoderLayer"])
            hf = dispatch_model(hf, device_map=dmap, main_device=0)
            acc_info = sum(1 for v in dmap.values() if v == "cpu")

            def hf_run(ids: torch.Tensor) -> torch.Tensor:
                return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW, min_new_tokens=NEW,
                                   do_sample=False, pad_token_id=1)
            contenders.insert(0, ("HF Accelerate cpu offload", hf_run))
    except ImportError:
        pass
    tiers = engine.offload.summary()["weight_bytes"]
    on_gpu = {"fs offload 20% on GPU": tiers.get("gpu", 0) if torch.cuda.is_available() else 0}
    if acc_info is not None:
        on_gpu["HF Accelerate cpu offload"] = sum(p.numel() * p.element_size() for p in hf.parameters()
                                                  if p.device.type == "cuda")
    rows = []
    reps = 1 if args.quick else 2
    for batch in (1, 32):
        ids = torch.randint(3, shape["vocab"], (batch, PROMPT), generator=torch.Generator().manual_seed(7)).to(device())
        times: dict[str, list[float]] = {c[0]: [] for c in contenders}
        transient: dict[str, float | None] = {}
        with torch.inference_mode():
            for label, run in contenders:
                sync()
                base = allocated()
                peak_reset()
                run(ids)
                transient[label] = peak_gib(base)  # what a call adds on the device: streamed weights, cache
            for _ in range(reps):
                for label, run in contenders:
                    times[label].append(timed(lambda: run(ids)))
        ref = None
        for label, _ in contenders:
            tps = batch * NEW / statistics.median(times[label])
            ref = ref or tps
            rows.append({"section": "offload", "batch": batch, "config": label, "tok_s": tps,
                         "vs_first": tps / ref, "weights_gb": w_bytes / 1e9, "gpu_budget": budget,
                         "weights_on_gpu_gb": on_gpu[label] / 1e9, "call_peak_extra_gib": transient[label],
                         "accelerate_cpu_modules": acc_info})
    engine.offload.close()
    return rows


# ------------------------------------------------------------------------------------------- main

def _print(rows: list[dict]) -> None:
    for section in ("train", "decode", "offload"):
        part = [r for r in rows if r.get("section") == section]
        if not part:
            continue
        keys = [k for k in part[0] if k != "section"]
        for r in part[1:]:
            keys += [k for k in r if k not in keys and k != "section"]
        print(f"\n## {section}")
        print("| " + " | ".join(keys) + " |")
        print("|" + "---|" * len(keys))
        for r in part:
            cells = [(f"{v:.4g}" if isinstance(v, float) else str(v)) for v in (r.get(k, "") for k in keys)]
            print("| " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sections", default="train,decode,offload")
    p.add_argument("--quick", action="store_true", help="tiny shapes (runs on a CPU; a smoke test)")
    p.add_argument("--json", default=None, help="write the rows here as JSON")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--train-steps", type=int, default=8)
    p.add_argument("--ds-timeout", type=float, default=240)
    p.add_argument("--ds-worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.ds_worker:
        spec = json.loads(args.ds_worker)
        res = train_worker(["deepspeed"], spec["stages"], spec["steps"], spec["warmup"], spec["quick"])
        print(json.dumps(res))
        return []
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True  # what a user's training run would use
    rows: list[dict] = []
    for section in args.sections.split(","):
        t0 = time.perf_counter()
        try:
            rows += {"train": bench_train, "decode": bench_decode, "offload": bench_offload}[section](args)
        except Exception as exc:  # noqa: BLE001 - one section failing must not lose the others' rows
            import traceback

            traceback.print_exc()
            rows.append({"section": section, "error": f"{type(exc).__name__}: {exc}"})
        print(f"[{section}: {time.perf_counter() - t0:.1f} s]", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
                           "torch": torch.__version__, "rows": rows}, f, indent=1)
    _print(rows)
    return rows


if __name__ == "__main__":
    main()
