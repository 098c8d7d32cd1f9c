"""``flexspeed report``: versions, backends and devices, and what this install can actually do.

A feature is reported by running it, not by importing its module: a two-rank save and load of a
checkpoint in a temporary directory, the native kernel's build, ABI check and two small kernels
checked against torch (or why it is not built: no compiler, the failed command, and the fix), a one-step training run (and, with CUDA, the same on the GPU). Optional packages are
listed with the command that installs each missing one. ``--quick`` skips the runs.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable

__all__ = ["add_parser", "run", "collect", "PROBES", "OPTIONAL"]

# optional package -> (what it enables, how to get it)
OPTIONAL = {
    "transformers": ("HF models (init_inference on HF checkpoints, tensor-parallel plans, demo tests)",
                     "pip install transformers"),
    "hjson": ("HJSON configs", "pip install 'flexspeed[hjson]'"),
    "tensorboard": ("TensorBoard monitor", "pip install 'flexspeed[monitor]'"),
    "matplotlib": ("flexspeed plot, the demo's loss.png", "pip install 'flexspeed[monitor]'"),
    "wandb": ("wandb monitor", "pip install wandb"),
    "accelerate": ("benchmarks against HF Accelerate", "pip install 'flexspeed[bench]'"),
    "uvicorn": ("flexspeed serve (with starlette)", "pip install 'flexspeed[serve]'"),
}


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# ------------------------------------------------------------------------------------------ probes

def _checkpoint_rank(rank: int, world: int, directory: str) -> bool:
    import torch

    import flexspeed

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    cfg = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
           "zero_optimization": {"stage": 2}, "steps_per_print": 10**6}
    engine, *_ = flexspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(rank))
    engine.backward(engine(x).pow(2).mean())
    engine.step()
    engine.save_checkpoint(directory)
    saved = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).clone() for k, v in engine.module.state_dict().items()}
    other, *_ = flexspeed.initialize(model=torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(),
                                                               torch.nn.Linear(16, 4)), config=cfg)
    other.load_checkpoint(directory)
    loaded = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in other.module.state_dict().items()}
    return all(torch.equal(saved[k], loaded[k]) for k in saved) and other.global_steps == 1


def probe_checkpoint() -> str:
    """Two gloo ranks train one ZeRO-2 step, save, and load into a fresh engine: weights equal."""
    from flexspeed.testing import run_ranks

    with tempfile.TemporaryDirectory(prefix="flexspeed-report-") as d:
        ok = run_ranks(_checkpoint_rank, 2, args=(d,), timeout=120, init_process_group=False)
    if not all(ok):
        raise RuntimeError("the loaded weights differ from the saved ones")
    return "2 ranks, ZeRO-2: save, load, weights equal"


def probe_native() -> str:
    """Load the native kernel (building it if needed), check its ABI against the ctypes mirrors,
    call a trivial export and run two small kernels (attention on its worker threads, argmax)
    against torch. Fails with the build's own reason (no compiler, the failed command) and fix."""
    import torch
    import torch.nn.functional as F

    from flexspeed.inference import native

    lib = native.library()  # a NativeABIError propagates: the probe reports it
    st = native.status()
    if lib is None:
        fix = f" Fix: {st['fix']}." if st.get("fix") else ""
        raise RuntimeError(f"not built ({st['state']}):{fix} {st['detail'][:600]}")
    native.check_abi(lib)
    version = lib.fs_abi_version()
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 4, 3, 16, generator=g) for _ in range(3))
    got = native.attention(q, k, v, 0, None, True, 0.25)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25)
    if got is None or not torch.allclose(got, want, atol=1e-5, rtol=1e-5):
        raise RuntimeError("built, but its attention disagreed with torch's")
    x = torch.randn(3, 1000, generator=g)
    am = native.argmax_rows(x)
    if am is None or not torch.equal(am, x.argmax(-1)):
        raise RuntimeError("built, but its argmax disagreed with torch's")
    return (f"ABI {version}, {'AVX-512' if lib.fs_fast_path() else 'portable C'} build; attention and argmax equal "
            f"torch ({st.get('compiler', '?')}, {lib._name})")


def probe_training() -> str:
    """One process, no launcher: one optimizer step through initialize()."""
    import torch

    import flexspeed

    model = torch.nn.Linear(4, 2)
    engine, *_ = flexspeed.initialize(model=model, model_parameters=model.parameters(), config={
        "train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
        "steps_per_print": 10**6})
    before = model.weight.detach().clone()
    x = torch.randn(2, 4).to(engine.device)
    engine.backward(engine(x).sum())
    engine.step()
    if torch.equal(engine.module.weight.detach().cpu(), before.cpu()):
        raise RuntimeError("the step did not change the weights")
    return f"one step on {engine.device}"


PROBES: dict[str, Callable[[], str]] = {"training step": probe_training, "checkpoints (2 ranks)": probe_checkpoint,
                                        "native CPU kernel": probe_native}


def run_probes() -> dict[str, dict]:
    out = {}
    for name, fn in PROBES.items():
        t0 = time.perf_counter()
        try:
            out[name] = {"ok": True, "detail": fn()}
        except Exception as exc:  # noqa: BLE001 - a probe reports what failed, it does not stop the report
            out[name] = {"ok": False, "detail": " ".join(f"{type(exc).__name__}: {exc}".split())[:600]}
        out[name]["seconds"] = round(time.perf_counter() - t0, 2)
    return out


# ------------------------------------------------------------------------------------------ report

def collect(probes: bool = True) -> dict:
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
        "optional": {name: {"installed": _has(name), "enables": what, "install": how}
                     for name, (what, how) in OPTIONAL.items()},
        "probes": run_probes() if probes else {},
    }


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, description=help_text)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--quick", action="store_true", help="skip the probes (a training step, a 2-rank checkpoint "
                                                        "round trip, the native kernel); ~10 s saved")
    return p


def run(args: argparse.Namespace) -> int:
    info = collect(probes=not args.quick)
    failed = [n for n, p in info["probes"].items() if not p["ok"]]
    if args.json:
        print(json.dumps(info, indent=2))
        return 1 if failed else 0
    width = 28
    print("flexspeed environment report")
    print("-" * 72)
    for key in ("flexspeed", "python", "platform", "torch", "torch_cuda", "cuda_available", "cpu_threads",
                "default_backend"):
        print(f"{key:<{width}} {info[key]}")
    if info["gpus"]:
        print(f"{'gpus':<{width}} {', '.join(info['gpus'])}")
    print(f"{'backends':<{width}} " + ", ".join(f"{k}={'yes' if v else 'no'}" for k, v in info["backends"].items()))
    if info["probes"]:
        print("-" * 72)
        for name, p in info["probes"].items():
            print(f"{name:<{width}} {'[OK]  ' if p['ok'] else '[FAIL]'} {p['detail']} ({p['seconds']} s)")
    print("-" * 72)
    for name, o in info["optional"].items():
        line = f"{name:<{width}} {'[OK]' if o['installed'] else '[--]'}   {o['enables']}"
        print(line if o["installed"] else f"{line}; get it: {o['install']}")
    return 1 if failed else 0
