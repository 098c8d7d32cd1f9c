"""``flexspeed export``: write a checkpoint's consolidated model weights as one file.

Runs in one process, without the processes (or world size) that saved the checkpoint::

    flexspeed export ckpt/ model.safetensors --dtype bf16
    flexspeed export ckpt/ pytorch_model.bin --tag global_step100 --format pt

The output loads into the plain model with ``model.load_state_dict(...)``.
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["add_parser", "run"]


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("ckpt_dir", help="the directory given to save_checkpoint (holds 'latest' and the tags), "
                                    "or one tag's directory")
    p.add_argument("out", help="output file (or a directory: the file is named after the format)")
    p.add_argument("--tag", default=None, help="checkpoint tag to export (default: the one named in 'latest')")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="dtype of floating-point tensors (default fp32, the master weights)")
    p.add_argument("--format", dest="fmt", default=None, choices=["safetensors", "pt"],
                   help="file format (default: from OUT's extension; safetensors unless it ends in .pt/.bin/.pth)")
    return p


def _format_for(out: str, fmt: str | None) -> str:
    if fmt:
        return fmt
    return "pt" if out.endswith((".pt", ".bin", ".pth")) else "safetensors"


def run(args: argparse.Namespace) -> int:
    from flexspeed.runtime.checkpoint_io import CheckpointError
    from flexspeed.runtime.export import consolidate, write_state_dict

    fmt = _format_for(args.out, args.fmt)
    out = args.out
    if os.path.isdir(out):
        out = os.path.join(out, "model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
    try:
        state = consolidate(args.ckpt_dir, tag=args.tag, dtype=args.dtype)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"flexspeed export: {e}", file=sys.stderr)
        return 1
    path = write_state_dict(state, out, fmt)
    numel = sum(t.numel() for t in state.values())
    print(f"wrote {len(state)} tensors ({numel:,} elements, {args.dtype}, {fmt}) to {path}")
    return 0
