"""``flexspeed report``: versions, backends, devices, and which features this build provides."""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys

__all__ = ["add_parser", "run", "collect"]

# feature -> (module that provides it, how to enable it)
FEATURES = {
    "config (DeepSpeed JSON schema)": "flexspeed.config",
    "training engine (ZeRO stage 0, DDP)": "flexspeed.runtime.engine",
    "ZeRO stages 1-3 (FSDP2)": "flexspeed.runtime.fsdp",
    "pipeline parallelism": "flexspeed.pipe.engine",
    "checkpoints (torch.distributed.checkpoint)": "flexspeed.runtime.checkpoint",
    "inference engine": "flexspeed.inference.engine",
    "tensor parallelism (inference)": "flexspeed.inference.tp",
    "weight quantization (int8/int4)": "flexspeed.inference.quant",
    "fused kernels (kernel injection)": "flexspeed.inference.kernels",
    "offloaded generation": "flexspeed.inference.offload",
    "HF safetensors loading": "safetensors",
    "HF transformers models": "transformers",
    "flexspeed serve (starlette + uvicorn)": "uvicorn",
    "HJSON configs": "hjson",
    "TensorBoard monitor": "tensorboard",
    "wandb monitor": "wandb",
    "plots (matplotlib)": "matplotlib",
}


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def collect() -> dict:
    """The report as a dict (also what ``--json`` prints)."""
    import torch
    import torch.distributed as dist

    from flexspeed import __version__
    from flexspeed.distributed import default_backend

    cuda = torch.cuda.is_available()
    return {
        "flexspeed": __version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cuda_available": cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "cpu_threads": torch.get_num_threads(),
        "backends": {"gloo": dist.is_gloo_available(), "nccl": dist.is_nccl_available(),
                     "mpi": dist.is_mpi_available()},
        "default_backend": default_backend(),
        "features": {name: _has(mod) for name, mod in FEATURES.items()},
    }


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    width = 44
    print("flexspeed environment report")
    print("-" * 60)
    for key in ("flexspeed", "python", "platform", "torch", "torch_cuda", "cuda_available", "cpu_threads",
                "default_backend"):
        print(f"{key:<{width}} {info[key]}")
    if info["gpus"]:
        print(f"{'gpus':<{width}} {', '.join(info['gpus'])}")
    print(f"{'backends':<{width}} " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in info["backends"].items()))
    print("-" * 60)
    for feature, ok in info["features"].items():
        print(f"{feature:<{width}} {'[OK]' if ok else '[--]'}")
    return 0
