"""``flexspeed generate``: text prompts from a JSONL file to completions, or random-id throughput (``--benchmark``).

With ``--prompts FILE.jsonl --output OUT.jsonl`` the model folder's own tokenizer encodes each
line's prompt (or renders its chat with the chat template), the serving engine generates (in
memory with continuous batching, or offloaded with ``--percent`` / ``--mem-budget``, FlexLLMGen's
flags), and one JSON record per line is appended to OUT as each finishes: id, text, token counts
and finish reason, or an error naming the line. Prompts run shortest first; a rerun skips the
ids already in OUT (see :mod:`flexspeed.serve.batch`). Sampling options carry HF ``generate``'s
names and defaults (greedy unless ``--do-sample``).

With ``--benchmark`` the prompts are random token ids (no tokenizer is needed), every row
generates exactly ``--gen-len`` tokens through the offload runner, and the last line reports
tokens/s (batch x gen-len over the wall time of the generate call), prefill time, decode tokens/s,
peak memory (``ru_maxrss``) and the policy used.
"""

from __future__ import annotations

import argparse
import resource
import sys
import time

from flexspeed.cli.textargs import (add_engine_arguments, add_model_arguments, add_offload_arguments,
                                    add_text_arguments, check_positive)

__all__ = ["add_parser", "run"]

_EPILOG = """\
examples:
  flexspeed generate --model /models/llama --prompts prompts.jsonl --output out.jsonl --max-new-tokens 64
  flexspeed generate --model /models/opt-1.3b --prompts p.jsonl --output out.jsonl --percent 10 0 100 0 100 0
  flexspeed generate --model /models/opt-1.3b --benchmark --percent 10 0 100 0 100 0 --gpu-batch-size 8 --num-gpu-batches 4
  flexspeed generate --model /models/opt-1.3b --benchmark --mem-budget 4GB

prompts.jsonl, one object per line: {"id": "q1", "prompt": "text"} or {"id": "q2", "messages": [{"role": "user",
"content": "..."}]}, optionally with max_new_tokens, do_sample, temperature, top_k, top_p, ... for that line.
out.jsonl gets {"id", "text", "prompt_tokens", "completion_tokens", "finish_reason"} or {"id", "line", "error"}.

percent: w_gpu w_cpu cache_gpu cache_cpu act_gpu act_cpu (disk gets the rest of each pair).
On a machine without an accelerator the "gpu" and "cpu" tiers are both RAM.
"""


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text, epilog=_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    text = p.add_argument_group("text generation (--prompts)")
    text.add_argument("--prompts", metavar="FILE.jsonl", help="prompts, one JSON object per line")
    text.add_argument("--output", metavar="OUT.jsonl", help="completions are appended here; a rerun skips its ids")
    add_text_arguments(text)
    text.add_argument("--max-new-tokens", type=int, default=32, help="new tokens per prompt at most (default 32)")
    text.add_argument("--min-new-tokens", type=int, default=0, help="end-of-sequence suppressed until this many")
    text.add_argument("--do-sample", action="store_true", help="sample (default: greedy, as HF generate)")
    text.add_argument("--temperature", type=float, default=1.0, help="with --do-sample (default 1.0)")
    text.add_argument("--top-k", type=int, default=0, help="with --do-sample: sample among the k likeliest (0: all)")
    text.add_argument("--top-p", type=float, default=1.0, help="with --do-sample: nucleus sampling (default 1.0)")
    text.add_argument("--repetition-penalty", type=float, default=1.0, help="HF's repetition penalty (default 1.0)")
    text.add_argument("--stop-strings", nargs="+", default=None, metavar="S", help="strings that end a completion")
    add_engine_arguments(text, serving=False)
    offload = p.add_argument_group("offload (FlexLLMGen's policy; text generation and --benchmark)")
    add_offload_arguments(offload)
    bench = p.add_argument_group("--benchmark: random token ids, throughput")
    bench.add_argument("--benchmark", action="store_true", help="random-id throughput through the offload runner "
                                                                "(default policy 100 0 100 0 100 0)")
    bench.add_argument("--prompt-len", type=int, default=512, help="prompt tokens per row (default 512)")
    bench.add_argument("--gen-len", type=int, default=32, help="new tokens per row (default 32)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of sampling (text), or of the random prompts (--benchmark; default 0)")
    return p


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run(args: argparse.Namespace) -> int:
    if args.benchmark:
        return _run_benchmark(args)
    if not args.prompts or not args.output:
        print("flexspeed generate: give --prompts FILE.jsonl and --output OUT.jsonl (text generation), or "
              "--benchmark (random-id throughput)", file=sys.stderr)
        return 2
    from flexspeed.cli.generate_text import run_prompts

    return run_prompts(args)


def _run_benchmark(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    import flexspeed
    from flexspeed.cli.textargs import checkpoint_dtype, offload_policy
    from flexspeed.config.errors import ConfigError
    from flexspeed.inference.offload.arch import arch_from_config
    from flexspeed.inference.offload.runner import OffloadedLM

    if args.threads:
        torch.set_num_threads(args.threads)
    bad = check_positive(args, ("prompt_len", "gen_len", "gpu_batch_size", "num_gpu_batches", "max_batch"))
    if bad:
        print(f"flexspeed generate: {bad}", file=sys.stderr)
        return 2
    try:
        stub = OffloadedLM.from_pretrained(args.model)
        arch = arch_from_config(stub.config)
        dtype = checkpoint_dtype(args)
        policy, origin = offload_policy(args, args.prompt_len, args.gen_len, default_percent=True)
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
    gen = torch.Generator().manual_seed(args.seed or 0)
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
