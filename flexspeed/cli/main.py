"""The ``flexspeed`` command. Each subcommand lives in its own module under ``flexspeed.cli``
with ``add_parser(subparsers)`` and ``run(args) -> int``; this file only dispatches, and imports
a subcommand's module only when that subcommand runs (so ``flexspeed --help`` is fast)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

__all__ = ["main", "SUBCOMMANDS"]

# name -> (module, one-line help). Order is the order shown in --help.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("flexspeed.cli.demo", "train a small GPT on addition with ZeRO-2 + bf16 on 2 processes, then test it"),
    "launch": ("flexspeed.cli.launch", "start a script on N processes per node (torchrun's agent; hostfile, Slurm)"),
    "check-config": ("flexspeed.cli.check_config",
                     "validate a ds_config.json for a world size, without starting processes"),
    "export": ("flexspeed.cli.export", "write a checkpoint's consolidated weights as one safetensors/pt file"),
    "plot": ("flexspeed.cli.plot", "draw the loss and lr curves of a csv_monitor run as a PNG"),
    "generate": ("flexspeed.cli.generate", "text prompts (JSONL) to completions from a model folder, in memory or "
                                           "offloaded (FlexLLMGen's policy); --benchmark for random-id throughput"),
    "serve": ("flexspeed.cli.serve", "an OpenAI-compatible HTTP server for a model folder (continuous batching)"),
    "report": ("flexspeed.cli.report", "print versions, backends, devices and which features are available"),
}


_EPILOG = """examples:
  flexspeed demo                                        train a GPT on 2 processes, then generate
  flexspeed launch --nproc-per-node 2 train.py --deepspeed_config ds.json
  flexspeed check-config ds_config.json --world-size 8  validate a config, print the resolved batch triad
  flexspeed export ckpt/ model.safetensors              consolidate a sharded checkpoint
  flexspeed generate --model DIR --prompts p.jsonl --output out.jsonl   text completions, resumable
  flexspeed serve --model DIR --port 8000               OpenAI-compatible server (/v1/completions, chat, ...)
  flexspeed report                                      versions, backends, available features

'flexspeed COMMAND --help' describes each command."""


def build_parser(selected: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flexspeed",
        description="flexspeed: configuration-driven large-model training and inference on PyTorch.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from flexspeed import __version__

    parser.add_argument("--version", action="version", version=f"flexspeed {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        if name == selected:
            importlib.import_module(module_name).add_parser(sub, name, help_text)
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    selected = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(selected if selected in SUBCOMMANDS else None)
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    module = importlib.import_module(SUBCOMMANDS[args.command][0])
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        print(f"flexspeed {args.command}: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError, KeyError, RuntimeError) as exc:
        # what a user's input or machine can cause: one line, never a traceback (FLEXSPEED_DEBUG=1 shows it)
        if os.environ.get("FLEXSPEED_DEBUG") == "1":
            raise
        text = " ".join(str(exc).split()) or type(exc).__name__
        print(f"flexspeed {args.command}: error: {text} ({type(exc).__name__}; FLEXSPEED_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
