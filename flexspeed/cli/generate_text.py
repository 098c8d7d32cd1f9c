"""``flexspeed generate --prompts FILE.jsonl --output OUT.jsonl``: the text path of the command (see
:mod:`flexspeed.cli.generate` for the options and :mod:`flexspeed.serve.batch` for the file formats)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from flexspeed.cli.textargs import check_positive

__all__ = ["run_prompts"]

# SamplingParams field -> the flag that sets it here
_FLAGS = {"max_tokens": "--max-new-tokens", "min_tokens": "--min-new-tokens", "temperature": "--temperature",
          "top_k": "--top-k", "top_p": "--top-p", "repetition_penalty": "--repetition-penalty",
          "stop": "--stop-strings"}


def _defaults(args: argparse.Namespace) -> dict[str, Any]:
    out = {"max_new_tokens": args.max_new_tokens, "min_new_tokens": args.min_new_tokens, "do_sample": args.do_sample,
           "temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
           "repetition_penalty": args.repetition_penalty, "stop_strings": args.stop_strings, "seed": args.seed}
    return {k: v for k, v in out.items() if v is not None}


def _fail(message: str) -> int:
    print(f"flexspeed generate: {message}", file=sys.stderr)
    return 2


def run_prompts(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from flexspeed.cli.textargs import engine_options, load_model, offload_policy
    from flexspeed.config.errors import ConfigError
    from flexspeed.serve.batch import done_ids, id_key, read_prompts, run_batch, sampling_from_hf
    from flexspeed.serve.engine import Engine
    from flexspeed.serve.errors import RequestError
    from flexspeed.serve.model import check_model_folder
    from flexspeed.serve.tokenizer import load_tokenizer

    bad = check_positive(args, ("max_new_tokens", "gpu_batch_size", "num_gpu_batches", "max_batch", "max_num_seqs",
                                "max_model_len", "cache_len", "threads"))
    if bad:
        return _fail(bad)
    if args.threads:
        torch.set_num_threads(args.threads)
    defaults = _defaults(args)
    try:
        sampling_from_hf(defaults)
    except RequestError as exc:
        return _fail(f"{_FLAGS.get(exc.param, exc.param)}: {exc}")
    if not args.do_sample and (args.temperature != 1.0 or args.top_k or args.top_p != 1.0):
        print("note: --temperature/--top-k/--top-p apply with --do-sample only (greedy decoding otherwise, as in HF "
              "generate)", file=sys.stderr)
    try:
        check_model_folder(args.model)
        tokenizer = load_tokenizer(args.tokenizer or args.model, args.chat_template)

        def tokenize(rec: dict[str, Any]) -> list[int]:
            return tokenizer.encode(rec["prompt"]) if "prompt" in rec else tokenizer.encode_chat(rec["messages"])

        items = read_prompts(args.prompts, tokenize)
        finished = done_ids(args.output)
        skipped = sum(id_key(it.id) in finished for it in items)
        if skipped == len(items):
            print(f"nothing to do: all {len(items)} ids of {args.prompts} are in {args.output}", flush=True)
            return 0
        longest = max((len(it.ids) for it in items), default=1)
        policy, origin = offload_policy(args, longest, args.max_new_tokens, args.max_num_seqs)
        if policy is not None:
            print(f"{origin}: {policy.describe()}", flush=True)
        t0 = time.perf_counter()
        model, _ = load_model(args, policy)
        engine = Engine(model, tokenizer, engine_options(args, policy, max_queue=len(items) + 1)).start()
    except (ConfigError, ValueError, NotImplementedError) as exc:
        return _fail(str(exc))
    print(f"loaded {model.describe()} in {time.perf_counter() - t0:.1f}s; {engine.describe()}", flush=True)
    bar = tqdm(total=len(items) - skipped, desc="generate", unit="prompt", file=sys.stderr)
    made, start = [0], time.perf_counter()

    def progress(tokens: int) -> None:
        made[0] += tokens
        bar.set_postfix_str(f"{made[0] / max(time.perf_counter() - start, 1e-9):.1f} tok/s", refresh=False)
        bar.update(1)

    try:
        summary = run_batch(engine, items, args.output, defaults, on_record=progress)
    finally:
        bar.close()
        engine.close()
        if model.offloaded:
            model.engine.offload.close()
    rate = summary.tokens / summary.seconds if summary.seconds > 0 else 0.0
    print(f"wrote {summary.written + summary.errors} records to {args.output} ({summary.written} completions, "
          f"{summary.errors} errors; {summary.skipped} ids were already there): {summary.tokens} tokens in "
          f"{summary.seconds:.1f}s, {rate:.1f} tok/s", flush=True)
    return 0
