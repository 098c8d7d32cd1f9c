"""``flexspeed check-config``: validate a ds_config.json for a world size, without starting processes.

Prints the resolved batch triad, ZeRO stage, precision, optimizer and scheduler (a JSON object
with ``--json``). An invalid config prints the error (no traceback) and exits with status 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flexspeed.config.schema import FlexConfig

__all__ = ["add_parser", "run", "summarize"]


def add_parser(subparsers: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    """Register the ``check-config`` subcommand on ``subparsers``."""
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    parser.add_argument("config", metavar="FILE", help="ds_config.json (JSON or HJSON) or base64-encoded JSON")
    parser.add_argument("--world-size", type=int, default=None, metavar="N",
                        help="data-parallel world size to resolve the batch triad for (default 1)")
    parser.add_argument("--batch-size", type=int, default=None, metavar="B",
                        help='data-loader batch size, fills train_micro_batch_size_per_gpu: "auto"')
    parser.add_argument("--hidden-size", type=int, default=None, metavar="H",
                        help='model hidden size, fills "auto" ZeRO bucket sizes')
    parser.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return parser


def summarize(cfg: FlexConfig) -> dict[str, Any]:
    """The fields check-config reports, from a resolved ``FlexConfig``."""
    zero = cfg.zero_optimization

    def offload(section: Any) -> str:
        return "none" if section is None else section.device

    return {
        "train_batch_size": cfg.train_batch_size,
        "train_micro_batch_size_per_gpu": cfg.train_micro_batch_size_per_gpu,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "zero_stage": zero.stage,
        "offload_optimizer": offload(zero.offload_optimizer),
        "offload_param": offload(zero.offload_param),
        "precision": cfg.precision,
        "gradient_clipping": cfg.gradient_clipping,
        "optimizer": None if cfg.optimizer is None else {"type": cfg.optimizer.type, "params": cfg.optimizer.params},
        "scheduler": None if cfg.scheduler is None else {"type": cfg.scheduler.type, "params": cfg.scheduler.params},
    }


def run(args: argparse.Namespace) -> int:
    """Validate ``args.config``; print the summary; return 0 if valid, 1 if not."""
    from flexspeed.config import ConfigError, build_config

    if args.world_size is None:
        world_size, source = 1, "default; pass --world-size N"
    else:
        world_size, source = args.world_size, f"--world-size {args.world_size}"
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from flexspeed.config import load_config
            from flexspeed.distributed.tensor_parallel import resolve_tp

            raw = load_config(config=args.config)
            tp = resolve_tp(raw, None, world_size if args.world_size is not None else 0)[0]
            if tp > 1 and args.world_size is None:
                world_size, source = tp, "default: one tensor-parallel group; pass --world-size N"
            if tp > 1:  # the batch triad is over world / autotp_size
                world_size, source = world_size // tp, f"{source} / tensor_parallel.autotp_size {tp}"
            cfg = build_config(raw, world_size=world_size, world_size_source=source,
                               dataloader_batch_size=args.batch_size, hidden_size=args.hidden_size)
    except ConfigError as exc:
        if args.json:
            print(json.dumps({"ok": False, "config": args.config, "key": exc.key, "error": str(exc)}))
        else:
            print(f"{args.config}: invalid\n  {exc}", file=sys.stderr)
        return 1
    notes = [str(w.message) for w in caught]
    summary = summarize(cfg)
    if args.json:
        print(json.dumps({"ok": True, "config": args.config, "world_size": world_size,
                          "world_size_source": source, **summary, "warnings": notes}))
        return 0
    print(f"{args.config}: OK (world size {world_size}, {source})")
    for key, value in summary.items():
        if isinstance(value, dict):
            params = ", ".join(f"{k}={json.dumps(v)}" for k, v in value["params"].items())
            value = f"{value['type']}({params})"
        print(f"  {key:<32} {value if value is not None else '-'}")
    for note in notes:
        print(f"  warning: {note}")
    return 0
