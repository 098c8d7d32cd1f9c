"""``flexspeed export``: a checkpoint's consolidated model weights, as a Hugging Face folder or one file.

Runs in one process, without the processes (or world size) that saved the checkpoint::

    flexspeed export ckpt/ hf_model/                 # a folder: config.json + sharded safetensors (+ index)
    flexspeed export ckpt/ model.safetensors --dtype bf16
    flexspeed export ckpt/ pytorch_model.bin --tag global_step100

OUT is a folder when it ends with a path separator, already is a directory, or has no file
extension; ``from_pretrained(OUT)`` then loads it. A ``.safetensors`` file streams tensor by
tensor like the folder; ``.pt``/``.bin``/``.pth`` is one ``torch.save`` (the whole model in memory).
"""

from __future__ import annotations

import argparse
import os
import sys

__all__ = ["add_parser", "run", "output_kind"]


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("ckpt_dir", help="the directory given to save_checkpoint (holds 'latest' and the tags), "
                                    "or one tag's directory")
    p.add_argument("out", help="a folder (trailing '/', an existing directory, or no extension): a Hugging Face "
                               "model folder; or a file: *.safetensors, *.pt/*.bin/*.pth")
    p.add_argument("--tag", default=None, help="checkpoint tag to export (default: the one named in 'latest')")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"],
                   help="dtype of floating-point tensors (default fp32, the master weights)")
    p.add_argument("--format", dest="fmt", default=None, choices=["safetensors", "pt"],
                   help="file format of a single-file export (default: from OUT's extension)")
    p.add_argument("--max-shard-size", default="5GB", help="largest shard of a folder export (default 5GB)")
    return p


def output_kind(out: str, fmt: str | None) -> str:
    """``"folder"``, ``"safetensors"`` (one file) or ``"pt"``."""
    if fmt is None and (out.endswith(("/", os.sep)) or os.path.isdir(out) or not os.path.splitext(out)[1]):
        return "folder"
    if fmt:
        return fmt
    return "pt" if out.endswith((".pt", ".bin", ".pth")) else "safetensors"


def run(args: argparse.Namespace) -> int:
    from flexspeed.runtime.checkpoint_io import CheckpointError
    from flexspeed.runtime.export import consolidate, export_folder, write_state_dict

    kind = output_kind(args.out, args.fmt)
    if kind != "folder" and os.path.isdir(args.out):  # --format with a directory: the conventional file name
        args.out = os.path.join(args.out, "model.safetensors" if kind == "safetensors" else "pytorch_model.bin")
    try:
        if kind == "pt":
            state = consolidate(args.ckpt_dir, tag=args.tag, dtype=args.dtype)
            path = write_state_dict(state, args.out, "pt")
            print(f"wrote {len(state)} tensors ({sum(t.numel() for t in state.values()):,} elements, "
                  f"{args.dtype}, pt) to {path}")
            return 0
        if kind == "folder":
            out = export_folder(args.ckpt_dir, args.out, tag=args.tag, dtype=args.dtype,
                                max_shard_size=args.max_shard_size)
            where = os.path.abspath(args.out)
        else:
            folder, name = os.path.split(os.path.abspath(args.out))
            out = export_folder(args.ckpt_dir, folder, tag=args.tag, dtype=args.dtype, single_file=name)
            where = os.path.join(folder, name)
    except (CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"flexspeed export: {e}", file=sys.stderr)
        return 1
    tied = f", {len(out['skipped_tied'])} tied name(s) stored once" if out["skipped_tied"] else ""
    extra = " + config.json" if out.get("config") else ""
    print(f"wrote {out['total_size']:,} bytes ({args.dtype}) in {len(out['files'])} file(s){extra}{tied} to {where}")
    return 0
