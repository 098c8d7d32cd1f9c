"""Options shared by ``flexspeed generate`` and ``flexspeed serve``: the model folder, its tokenizer, the
offload policy (FlexLLMGen's flags) and the engine's batching, and how they turn into a loaded model."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_model_arguments", "add_offload_arguments", "add_engine_arguments", "offload_policy", "load_model",
           "engine_options"]


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, metavar="DIR",
                   help="Hugging Face model folder (config.json + safetensors, and its tokenizer files)")
    p.add_argument("--dtype", default=None, choices=["bf16", "fp16", "fp32"],
                   help="compute dtype (default: the checkpoint's)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")


def add_text_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer folder (default: --model)")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="Jinja chat template replacing the tokenizer's (for chat messages)")


def add_offload_arguments(p: argparse.ArgumentParser, default_percent: bool = False) -> None:
    how = p.add_mutually_exclusive_group()
    default = " (default 100 0 100 0 100 0)" if default_percent else " (default: the model in memory)"
    how.add_argument("--percent", nargs=6, type=float, metavar="P",
                     help="offload: six percentages, w_gpu w_cpu cache_gpu cache_cpu act_gpu act_cpu" + default)
    how.add_argument("--mem-budget", default=None, metavar="SIZE",
                     help="offload: memory for weights, KV cache and buffers (e.g. 4GB); the policy is chosen for it")
    p.add_argument("--gpu-batch-size", type=int, default=None,
                   help="offload: rows per micro-batch (default 4; searched with --mem-budget)")
    p.add_argument("--num-gpu-batches", type=int, default=None,
                   help="offload: micro-batches per block (default 1; searched with --mem-budget)")
    p.add_argument("--compress-weight", action="store_true", help="offload: int4 weights (group 64, asymmetric)")
    p.add_argument("--compress-cache", action="store_true", help="offload: int4 KV cache (group 64, asymmetric)")
    p.add_argument("--offload-dir", default=None, help="offload: directory for disk-tier files (default: a temporary one)")
    p.add_argument("--direct-io", action="store_true", help="offload: disk reads bypass the page cache")
    p.add_argument("--no-overlap", action="store_true", help="offload: read weights inline, not on background threads")
    p.add_argument("--max-batch", type=int, default=64, help="largest batch --mem-budget may choose (default 64)")


def add_engine_arguments(p: argparse.ArgumentParser, serving: bool) -> None:
    p.add_argument("--max-num-seqs", type=int, default=None,
                   help="requests running at once (default 16; offloaded: the policy's batch)")
    p.add_argument("--max-model-len", type=int, default=None,
                   help="prompt + completion tokens of one request (default: the model's positions)")
    p.add_argument("--cache-len", type=int, default=None,
                   help="KV-cache columns under continuous batching (default 2 x max-model-len)")
    p.add_argument("--batching", default="auto", choices=["auto", "continuous", "static"],
                   help="continuous (requests join and leave between steps; fused GPT-2/OPT/Llama in memory) or "
                        "static (requests that arrive together run together); auto picks continuous where it can")
    if serving:
        p.add_argument("--max-queue", type=int, default=256,
                       help="requests that may wait for a slot; more get HTTP 429 (default 256)")


def check_positive(args: argparse.Namespace, names: tuple[str, ...]) -> str | None:
    """The first of ``names`` set below 1, as an error line."""
    for name in names:
        value = getattr(args, name, None)
        if value is not None and value < 1:
            return f"--{name.replace('_', '-')}={value} must be >= 1"
    return None


def offload_policy(args: argparse.Namespace, prompt_len: int, gen_len: int, max_batch: int | None = None,
                   default_percent: bool = False) -> tuple[Any, str]:
    """The policy of ``--percent`` / ``--mem-budget`` (``None`` for in memory), and a line saying where it came from.

    ``--mem-budget`` probes this machine and lets the cost model choose for ``prompt_len`` + ``gen_len``.
    """
    from flexspeed.inference.offload.policy import OffloadPolicy, parse_bytes

    flags = dict(compress_weight=args.compress_weight, compress_cache=args.compress_cache, offload_dir=args.offload_dir,
                 direct_io=args.direct_io, overlap=not args.no_overlap)
    if args.mem_budget is None:
        if args.percent is None and not default_percent:
            return None, "in memory"
        percent = args.percent or [100, 0, 100, 0, 100, 0]
        pol = OffloadPolicy.from_percent(percent, gpu_batch_size=args.gpu_batch_size or 4,
                                         num_gpu_batches=args.num_gpu_batches or 1, **flags)
        return pol, "policy (from --percent)"
    import torch

    from flexspeed.inference.loading import checkpoint_files
    from flexspeed.inference.offload.arch import arch_from_config
    from flexspeed.inference.offload.chooser import choose_policy, probe_machine
    from flexspeed.inference.offload.runner import OffloadedLM

    budget = parse_bytes(args.mem_budget, "--mem-budget")
    arch = arch_from_config(OffloadedLM.from_pretrained(args.model).config)
    dtype = checkpoint_dtype(args)
    profile = probe_machine(checkpoint_files(args.model)[0], dtype=dtype,
                            device="cuda" if torch.cuda.is_available() else "cpu")
    print(f"probe: {profile.describe()}", flush=True)
    pol, est = choose_policy(arch, budget, profile, prompt_len=prompt_len, gen_len=gen_len,
                             base=OffloadPolicy(**flags), gpu_batch_size=args.gpu_batch_size,
                             num_gpu_batches=args.num_gpu_batches, max_batch=max_batch or args.max_batch, dtype=dtype)
    line = (f"policy (chosen for {args.mem_budget}: estimated {est['tokens_per_s']:.1f} tok/s, "
            f"{est['memory_bytes'] / 2**30:.2f} GiB)")
    return pol, line


def checkpoint_dtype(args: argparse.Namespace):
    """``--dtype``, else the checkpoint's floating dtype, else fp32."""
    import torch

    from flexspeed.inference.loading import checkpoint_files
    from flexspeed.inference.offload.store import TensorSource

    named = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}.get(args.dtype)
    if named is not None:
        return named
    source = TensorSource.from_files(checkpoint_files(args.model))
    return next((s.dtype for s in source.spans.values() if s.dtype.is_floating_point), None) or torch.float32


def engine_options(args: argparse.Namespace, policy: Any, max_queue: int) -> Any:
    """The :class:`~flexspeed.serve.engine.EngineOptions` of the command line."""
    from flexspeed.serve.engine import EngineOptions

    seqs = args.max_num_seqs
    if seqs is None:
        seqs = (policy.gpu_batch_size or 1) * policy.num_gpu_batches if policy is not None else 16
    return EngineOptions(max_num_seqs=seqs, max_queue=max_queue, max_model_len=args.max_model_len,
                         cache_len=args.cache_len, batching=args.batching)


def load_model(args: argparse.Namespace, policy: Any) -> tuple[Any, Any]:
    """(TextModel, TextTokenizer) of the command line: the tokenizer first (a missing one fails fast)."""
    from flexspeed.serve.model import check_model_folder, load_text_model
    from flexspeed.serve.tokenizer import load_tokenizer

    check_model_folder(args.model)
    tokenizer = load_tokenizer(args.tokenizer or args.model, args.chat_template)
    return load_text_model(args.model, dtype=args.dtype, offload=policy), tokenizer
