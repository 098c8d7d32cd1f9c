"""Process-group start-up that works the same under torchrun, Slurm, Open MPI or no launcher.

``init_distributed()`` reads the launcher's environment, picks gloo on CPU and NCCL with CUDA
(``cpu:gloo,cuda:nccl`` so CPU tensors - offloaded state, checkpoints - can be reduced too),
sets the CUDA device from the local rank, and initialises ``torch.distributed``. With no launcher
at all it starts a one-process group on an in-memory store, so ``python train.py`` just works.
"""

from __future__ import annotations

import atexit
import functools
import os
import re
import shutil
import subprocess
import sys
import weakref
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

import flexspeed._torch_check  # noqa: F401  (refuse a torch older than flexspeed supports)

__all__ = ["LaunchEnv", "detect_launch_env", "init_distributed", "default_backend", "default_device",
           "first_slurm_host", "crashed"]


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits, and which launcher said so."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None
    master_port: int | None
    source: str  # e.g. "torchrun (WORLD_SIZE=2)", "Slurm (SLURM_NTASKS=4)", "no launcher"


def first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list: ``"node[03-05,9],gpu1"`` -> ``"node03"``."""
    if shutil.which("scontrol"):
        try:
            out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                                 timeout=10, check=True).stdout.split()
            if out:
                return out[0]
        except (subprocess.SubprocessError, OSError):
            pass
    m = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not m:
        raise ValueError(f"cannot parse SLURM_NODELIST={nodelist!r}; set MASTER_ADDR to the first host")
    prefix, bracket = m.group(1), m.group(3)
    if not bracket:
        return prefix
    first = bracket.split(",")[0].split("-")[0]
    return prefix + first


def detect_launch_env(env: dict[str, str] | None = None, default_port: int = 29500) -> LaunchEnv:
    """Read rank, world size and rendezvous address from torchrun, Slurm or Open MPI variables."""
    env = dict(os.environ if env is None else env)
    port = int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else None
    if "RANK" in env and "WORLD_SIZE" in env:
        launcher = "torchrun" if "TORCHELASTIC_RUN_ID" in env or "GROUP_RANK" in env else "environment"
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         env.get("MASTER_ADDR"), port, f"{launcher} (WORLD_SIZE={env['WORLD_SIZE']})")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        addr = env.get("MASTER_ADDR") or first_slurm_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1")))
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]), int(env.get("SLURM_LOCALID", 0)),
                         addr, port or default_port, f"Slurm (SLURM_NTASKS={env['SLURM_NTASKS']})")
    if "OMPI_COMM_WORLD_RANK" in env and "OMPI_COMM_WORLD_SIZE" in env:
        size, local_size = int(env["OMPI_COMM_WORLD_SIZE"]), int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", 0))
        addr = env.get("MASTER_ADDR") or ("127.0.0.1" if local_size == size else None)
        return LaunchEnv(int(env["OMPI_COMM_WORLD_RANK"]), size, int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)),
                         addr, port or default_port, f"Open MPI (OMPI_COMM_WORLD_SIZE={size})")
    return LaunchEnv(0, 1, 0, None, None, "no launcher (one process)")


def default_backend() -> str:
    """``cpu:gloo,cuda:nccl`` with CUDA (NCCL for GPU tensors, gloo for CPU ones), else ``gloo``."""
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return "gloo"


def default_device() -> torch.device:
    """The device this rank computes on: its local GPU if there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(dist_backend: str | None = None, auto_mpi_discovery: bool = True, distributed_port: int = 29500,
                     verbose: bool = False, timeout: timedelta | None = None, init_method: str | None = None,
                     dist_init_required: bool | None = None, config: object | None = None, rank: int = -1,
                     world_size: int = -1) -> LaunchEnv:
    """Initialise ``torch.distributed`` from the launcher's environment (DeepSpeed's signature).

    Args:
        dist_backend: "gloo", "nccl" or a device map such as "cpu:gloo,cuda:nccl"; default: NCCL
            with CUDA, gloo without.
        auto_mpi_discovery: read Slurm / Open MPI variables when torchrun's are absent.
        distributed_port: rendezvous port when the launcher gives none.
        verbose: print where the world size came from, on rank 0.
        timeout: collective timeout; default: the config's ``flexspeed_distributed.timeout_minutes``,
            else ``DEEPSPEED_TIMEOUT`` (minutes), else 10 minutes (see :mod:`flexspeed.distributed.timeout`).
        init_method: explicit URL (``tcp://host:port``); default ``env://``.
        dist_init_required: ``False`` means the caller promises an initialised group.
        config: a config (dict, path or base64, as for ``initialize``); its ``flexspeed_distributed``
            section sets the timeout (when ``timeout`` is not given) and the heartbeat interval.
        rank, world_size: explicit values, overriding the environment when >= 0.
    Returns:
        the detected ``LaunchEnv`` (also when the group already existed).
    """
    from flexspeed.distributed.timeout import config_timeout, resolve_timeout

    section = _distributed_section(config)
    resolved = resolve_timeout(timeout, config_timeout({"flexspeed_distributed": section}) if section else None)
    env = detect_launch_env(default_port=distributed_port) if auto_mpi_discovery else detect_launch_env(
        {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "OMPI_"))}, distributed_port)
    if rank >= 0 or world_size >= 0:
        env = LaunchEnv(max(rank, 0), max(world_size, 1), env.local_rank, env.master_addr, env.master_port,
                        f"explicit arguments (world_size={world_size})")
    if dist.is_initialized():
        ws = dist.get_world_size()
        _adopt_timeout(resolved)
        _start_heartbeat(section)
        return LaunchEnv(dist.get_rank(), ws, env.local_rank, env.master_addr, env.master_port,
                         f"an existing process group (world size {ws})")
    if dist_init_required is False:
        raise RuntimeError("dist_init_required=False but torch.distributed is not initialised: call "
                           "torch.distributed.init_process_group() first, or pass dist_init_required=None")
    backend = dist_backend or default_backend()
    kwargs = {"timeout": resolved.value}
    if torch.cuda.is_available():
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    if env.world_size == 1 and init_method is None and env.master_addr is None:
        # One process and no launcher: an in-memory store, no port to collide on.
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kwargs)
    else:
        if init_method is None:
            if env.master_addr is None:
                raise RuntimeError(
                    f"{env.source} gives rank {env.rank} of {env.world_size} but no rendezvous address: "
                    "export MASTER_ADDR (and MASTER_PORT), or launch with torchrun / flexspeed launch")
            os.environ.setdefault("MASTER_ADDR", env.master_addr)
            os.environ.setdefault("MASTER_PORT", str(env.master_port or distributed_port))
            os.environ.setdefault("RANK", str(env.rank))
            os.environ.setdefault("WORLD_SIZE", str(env.world_size))
            os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
            init_method = "env://"
        dist.init_process_group(backend, init_method=init_method, rank=env.rank, world_size=env.world_size, **kwargs)
    # DeepSpeed-style scripts end without destroy_process_group(); a group still alive when the
    # interpreter tears down aborted ~1 run in 10 of a 2-rank gloo job ("terminate called without
    # an active exception" from a backend thread). Destroy the group we made before that.
    _install_exit_handler()
    global _group_timeout
    _group_timeout = (resolved, weakref.ref(dist.distributed_c10d._get_default_group()))
    _start_heartbeat(section)
    if verbose and env.rank == 0:
        print(f"flexspeed: initialised {backend} with world size {env.world_size} from {env.source}, collective "
              f"timeout {resolved.describe()}", flush=True)
    return env


# (ResolvedTimeout, weak reference to the group flexspeed started). Weak: a strong reference kept a
# destroyed gloo group alive until interpreter teardown, and its destructor then aborted the process
# ("terminate called without an active exception") in ~1 exit of 4 of a 2-rank job.
_group_timeout: tuple | None = None


def group_timeout() -> object | None:
    """The ``ResolvedTimeout`` of the current default group if flexspeed started it, else None."""
    if _group_timeout is None or not dist.is_initialized():
        return None
    resolved, group = _group_timeout
    return resolved if group() is dist.distributed_c10d._get_default_group() else None


def _distributed_section(config: object | None) -> dict | None:
    """The ``flexspeed_distributed`` section of ``config`` (a dict, a path or base64 JSON), if any."""
    if config is None:
        return None
    if isinstance(config, (str, os.PathLike)):
        from flexspeed.config import load_config

        config = load_config(config=config)
    section = config.get("flexspeed_distributed") if isinstance(config, dict) else None
    return dict(section) if isinstance(section, dict) else section


def _adopt_timeout(resolved: object) -> None:
    """An existing group takes a config/environment timeout only if flexspeed started it without ``timeout=``."""
    current = group_timeout()
    if current is None or current.source.startswith("init_distributed") or resolved.source == current.source:
        return
    if resolved.source.startswith("the default"):
        return
    dist.distributed_c10d._set_pg_timeout(resolved.value)
    global _group_timeout
    _group_timeout = (resolved, weakref.ref(dist.distributed_c10d._get_default_group()))


def _start_heartbeat(section: dict | None) -> None:
    from flexspeed.distributed.heartbeat import start_heartbeat

    interval = 2.0
    if section:
        from flexspeed.distributed.timeout import distributed_section

        interval = distributed_section(section).heartbeat_interval
    start_heartbeat(interval)


_crashed = False


def crashed() -> bool:
    """True once an uncaught exception reached ``sys.excepthook`` in this process (after init_distributed)."""
    return _crashed


@functools.cache
def _install_exit_handler() -> None:
    """Once per process: destroy the group at exit, and note an uncaught exception first, so that
    exiting after a crash does not wait for the other ranks."""
    previous = sys.excepthook

    def hook(*args: object) -> None:
        global _crashed
        _crashed = True
        previous(*args)
        try:  # after the traceback: which rank stopped answering, if a collective failed
            from flexspeed.distributed.heartbeat import report_failure

            report_failure(args[1])
        except Exception:  # noqa: BLE001 - never hide the original error
            pass

    sys.excepthook = hook
    atexit.register(_destroy_at_exit)


def _destroy_at_exit() -> None:
    """Normal exit: wait (30 s at most) until every rank is done, then destroy the group."""
    from flexspeed.distributed.heartbeat import stop_heartbeat

    stop_heartbeat("failed" if _crashed else "exited")
    if dist.is_available() and dist.is_initialized():
        try:
            if dist.get_world_size() > 1 and dist.get_backend() == "gloo" and not _crashed:
                dist.monitored_barrier(timeout=timedelta(seconds=30))  # tear down only once every rank is done
            dist.destroy_process_group()
        except Exception:  # noqa: BLE001 - exiting anyway; never turn a clean exit into a traceback
            pass
