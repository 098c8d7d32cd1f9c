"""``flexspeed generate``: offloaded high-throughput generation from a model folder (FlexLLMGen's flags).

The model is a Hugging Face folder (``config.json`` plus safetensors; OPT, Llama, GPT-2). Its
weights are loaded straight into the policy's tiers through ``flexspeed.init_inference(...,
offload=...)``, never whole into memory. The policy comes from ``--percent`` (six numbers, as
FlexLLMGen's) or from ``--mem-budget``, in which case this machine is probed and the cost
model picks the percentages and the block size. Prompts are random token ids (no tokenizer is
needed); every row generates exactly ``--gen-len`` tokens.

The last line reports tokens/s (batch x gen-len over the wall time of the generate call),
prefill time, decode tokens/s, peak memory (``ru_maxrss``) and the policy used.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

__all__ = ["add_parser", "run"]

_EPILOG = """\
examples:
  flexspeed generate --model /models/opt-1.3b --percent 10 0 100 0 100 0 --gpu-batch-size 8 --num-gpu-batches 4
  flexspeed generate --model /models/opt-1.3b --mem-budget 4GB
  flexspeed generate --model /models/opt-1.3b --mem-budget 2GB --compress-weight --direct-io

percent: w_gpu w_cpu cache_gpu cache_cpu act_gpu act_cpu (disk gets the rest of each pair).
On a machine without an accelerator the "gpu" and "cpu" tiers are both RAM.
"""


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text, epilog=_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, metavar="DIR",
                   help="Hugging Face model folder (config.json + safetensors)")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--percent", nargs=6, type=float, metavar="P",
                     help="six percentages: w_gpu w_cpu cache_gpu cache_cpu act_gpu act_cpu "
                          "(default 100 0 100 0 100 0)")
    how.add_argument("--mem-budget", default=None, metavar="SIZE",
                     help="memory for weights, KV cache and buffers (e.g. 4GB); the policy is chosen for it")
    p.add_argument("--gpu-batch-size", type=int, default=None, help="rows per micro-batch (default 4; searched "
                                                                     "with --mem-budget)")
    p.add_argument("--num-gpu-batches", type=int, default=None, help="micro-batches per block (default 1; searched "
                                                                      "with --mem-budget)")
    p.add_argument("--prompt-len", type=int, default=512, help="prompt tokens per row (default 512)")
    p.add_argument("--gen-len", type=int, default=32, help="new tokens per row (default 32)")
    p.add_argument("--compress-weight", action="store_true", help="int4 weights (group 64, asymmetric)")
    p.add_argument("--compress-cache", action="store_true", help="int4 KV cache (group 64, asymmetric)")
    p.add_argument("--offload-dir", default=None, help="directory for disk-tier files (default: a temporary one)")
    p.add_argument("--direct-io", action="store_true", help="true-disk mode: disk reads bypass the page cache")
    p.add_argument("--no-overlap", action="store_true", help="read weights inline instead of on background threads")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="compute dtype (default: the checkpoint's)")
    p.add_argument("--max-batch", type=int, default=64, help="largest batch --mem-budget may choose (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    return p


def _checkpoint_dtype(folder: str):
    from flexspeed.inference.loading import checkpoint_files
    from flexspeed.inference.offload.store import TensorSource

    source = TensorSource.from_files(checkpoint_files(folder))
    return next((s.dtype for s in source.spans.values() if s.dtype.is_floating_point), None)


def _policy(args: argparse.Namespace, arch, dtype) -> tuple[object, str]:
    """The policy, and a line saying where it came from."""
    from flexspeed.inference.offload.policy import OffloadPolicy, parse_bytes

    flags = dict(compress_weight=args.compress_weight, compress_cache=args.compress_cache, offload_dir=args.offload_dir,
                 direct_io=args.direct_io, overlap=not args.no_overlap)
    if args.mem_budget is None:
        percent = args.percent or [100, 0, 100, 0, 100, 0]
        pol = OffloadPolicy.from_percent(percent, gpu_batch_size=args.gpu_batch_size or 4,
                                         num_gpu_batches=args.num_gpu_batches or 1, **flags)
        return pol, "policy (from --percent)"
    from flexspeed.inference.offload.chooser import choose_policy, probe_machine
    from flexspeed.inference.loading import checkpoint_files

    budget = parse_bytes(args.mem_budget, "--mem-budget")
    device = "cuda" if _cuda() else "cpu"
    profile = probe_machine(checkpoint_files(args.model)[0], dtype=dtype, device=device)
    print(f"probe: {profile.describe()}", flush=True)
    pol, est = choose_policy(arch, budget, profile, prompt_len=args.prompt_len, gen_len=args.gen_len,
                             base=OffloadPolicy(**flags), gpu_batch_size=args.gpu_batch_size,
                             num_gpu_batches=args.num_gpu_batches, max_batch=args.max_batch, dtype=dtype)
    line = (f"policy (chosen for {args.mem_budget}: estimated {est['tokens_per_s']:.1f} tok/s, "
            f"{est['memory_bytes'] / 2**30:.2f} GiB)")
    return pol, line


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    import flexspeed
    from flexspeed.config.errors import ConfigError
    from flexspeed.inference.offload.arch import arch_from_config
    from flexspeed.inference.offload.runner import OffloadedLM

    if args.threads:
        torch.set_num_threads(args.threads)
    for flag in ("prompt_len", "gen_len", "gpu_batch_size", "num_gpu_batches", "max_batch"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            print(f"flexspeed generate: --{flag.replace('_', '-')}={value} must be >= 1", file=sys.stderr)
            return 2
    try:
        stub = OffloadedLM.from_pretrained(args.model)
        arch = arch_from_config(stub.config)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(args.dtype) \
            or _checkpoint_dtype(args.model) or torch.float32
        policy, origin = _policy(args, arch, dtype)
        print(f"{origin}: {policy.describe()}", flush=True)
        t0 = time.perf_counter()
        engine = flexspeed.init_inference(stub, checkpoint=args.model, dtype=dtype, offload=policy,
                                          max_out_tokens=args.prompt_len + args.gen_len)
    except (ConfigError, ValueError, NotImplementedError) as e:
        print(f"flexspeed generate: {e}", file=sys.stderr)
        return 2
    runner = engine.offload
    summary = runner.summary()
    tiers = summary["weight_bytes"]
    print(f"loaded in {time.perf_counter() - t0:.1f}s: weights {sum(tiers.values()) / 2**30:.2f} GiB, "
          f"{100 * summary['resident_fraction']:.0f}% resident, disk reads via {summary['read_method']}", flush=True)
    batch = (policy.gpu_batch_size or 1) * policy.num_gpu_batches
    gen = torch.Generator().manual_seed(args.seed)
    ids = torch.randint(min(3, arch.vocab - 1), arch.vocab, (batch, args.prompt_len), generator=gen)  # no special ids
    with tqdm(total=args.gen_len, desc="generate", unit="tok", file=sys.stderr) as bar:
        runner.on_step = lambda _dt: bar.update(1)
        t0 = time.perf_counter()
        engine.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.gen_len,
                        min_new_tokens=args.gen_len)
        wall = time.perf_counter() - t0
    runner.on_step = None
    prefill = runner.call_seconds[0] if runner.call_seconds else 0.0
    decode = wall - prefill
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    if _cuda():
        peak_dev = torch.cuda.max_memory_allocated() / 2**30
        mem = f"peak RSS {peak:.2f} GiB, peak device {peak_dev:.2f} GiB"
    else:
        mem = f"peak RSS {peak:.2f} GiB"
    decode_tps = batch * (args.gen_len - 1) / decode if decode > 0 and args.gen_len > 1 else 0.0
    print(f"throughput {batch * args.gen_len / wall:.2f} tok/s (batch {batch} x {args.gen_len} tokens in {wall:.1f}s; "
          f"prefill {prefill:.2f}s, decode {decode_tps:.2f} tok/s) | {mem} | policy {policy.describe()}", flush=True)
    runner.close()
    return 0
