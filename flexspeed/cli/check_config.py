"""``flexspeed check-config``: validate a ds_config.json for a world size, without starting processes.

Prints the resolved batch triad, ZeRO stage, precision, optimizer and scheduler (a JSON object
with ``--json``). An invalid config prints the error (no traceback) and exits with status 1.

The world is split as ``initialize()`` splits it: ``dp x pp x tp`` through
:class:`~flexspeed.distributed.parallel_dims.ParallelDims` (``pp`` from ``--pipeline-stages`` or an
integer ``pipeline.stages``, ``tp`` from ``tensor_parallel.autotp_size``), so a world size the
degrees do not divide is the same ConfigError as at runtime, and the batch triad is counted over
the data-parallel size ``world / (pp x tp)``.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flexspeed.config.schema import FlexConfig

__all__ = ["add_parser", "run", "summarize", "resolve_dims"]


def add_parser(subparsers: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    """Register the ``check-config`` subcommand on ``subparsers``."""
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    parser.add_argument("config", metavar="FILE", help="ds_config.json (JSON or HJSON) or base64-encoded JSON")
    parser.add_argument("--world-size", type=int, default=None, metavar="N",
                        help="number of processes to validate for (default: one model replica, pp x tp)")
    parser.add_argument("--pipeline-stages", type=int, default=None, metavar="P",
                        help="the PipelineModule's num_stages (default: pipeline.stages when an integer, else 1)")
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


def resolve_dims(raw: dict, world_size: int | None, pipeline_stages: int | None = None) -> Any:
    """The validated ``ParallelDims`` ``initialize()`` would build for config ``raw`` on ``world_size`` ranks.

    Args:
        raw: the loaded config dict.
        world_size: ``--world-size`` (None: one model replica, ``pp x tp`` ranks).
        pipeline_stages: ``--pipeline-stages`` (None: an integer ``pipeline.stages``, else 1).

    Raises:
        ConfigError: a degree that does not divide the world size (as at runtime: ``resolve_tp``, then
            ``ParallelDims.from_world``), or a non-positive ``--pipeline-stages``.
    """
    from flexspeed.config import ConfigError
    from flexspeed.distributed.parallel_dims import ParallelDims
    from flexspeed.distributed.tensor_parallel import resolve_tp

    stages = (raw.get("pipeline") or {}).get("stages", "auto")
    if pipeline_stages is not None:
        pp, pp_source = pipeline_stages, f"--pipeline-stages {pipeline_stages}"
        if isinstance(stages, int) and not isinstance(stages, bool) and stages != pp:
            raise ConfigError(f"pipeline.stages={stages} but --pipeline-stages {pp}. Fix: make them equal, or set "
                              'pipeline.stages to "auto"', key="pipeline.stages")
    elif isinstance(stages, int) and not isinstance(stages, bool):
        pp, pp_source = stages, f"pipeline.stages={stages}"
    else:
        pp, pp_source = 1, "no pipeline (1); pass --pipeline-stages P for a PipelineModule"
    tp = resolve_tp(raw, None, world_size or 0)[0]
    tp_source = f"tensor_parallel.autotp_size={tp}" if tp > 1 else "no tensor parallelism (1)"
    if world_size is None:
        return ParallelDims.from_world(pp * tp if pp > 0 else 1, pp=pp, tp=tp, pp_source=pp_source,
                                       tp_source=tp_source, world_source="default: one model replica, pp x tp; "
                                       "pass --world-size N")
    return ParallelDims.from_world(world_size, pp=pp, tp=tp, world_source=f"--world-size {world_size}",
                                   pp_source=pp_source, tp_source=tp_source)


def run(args: argparse.Namespace) -> int:
    """Validate ``args.config``; print the summary; return 0 if valid, 1 if not."""
    from flexspeed.config import ConfigError, build_config, load_config

    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            raw = load_config(config=args.config)
            dims = resolve_dims(raw, args.world_size, args.pipeline_stages)
            source = f"{dims.source('world')}" + (f" / (pp {dims.pp} x tp {dims.tp}) = data-parallel size"
                                                  if dims.pp * dims.tp > 1 else "")
            world_size = dims.dp
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
                          "world_size_source": source, "dp": dims.dp, "pp": dims.pp, "tp": dims.tp, **summary,
                          "warnings": notes}))
        return 0
    print(f"{args.config}: OK (world size {world_size}, {source})")
    print(f"  {'parallelism':<32} {dims.describe()}")
    for key, value in summary.items():
        if isinstance(value, dict):
            params = ", ".join(f"{k}={json.dumps(v)}" for k, v in value["params"].items())
            value = f"{value['type']}({params})"
        print(f"  {key:<32} {value if value is not None else '-'}")
    for note in notes:
        print(f"  warning: {note}")
    return 0
