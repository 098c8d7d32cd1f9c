"""Spawn harness for multi-process tests and benchmarks: N ranks on 127.0.0.1 with gloo.

``run_ranks(fn, world_size=2, args=(...))`` starts ``world_size`` fresh processes, sets the
torchrun-style environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``), initialises a gloo process group, calls ``fn(rank, world_size, *args)`` and
returns the list of per-rank return values (which must be picklable). Every group has a
timeout: a hung or crashed rank terminates the whole group and raises ``RanksFailed`` with the
failing rank's traceback, so a test can never hang CI.

``run_cli("launch", "--nproc-per-node", "2", script, ...)`` runs ``python -m flexspeed ...`` (a launcher
and its workers, or ``flexspeed demo``) in its own session and returns its exit code and merged output;
past its timeout the whole session is killed and ``RanksFailed`` carries the output so far.
``start_cli``/``wait_cli`` are the two halves, for jobs that run side by side (two "nodes").
"""

from __future__ import annotations

import os
import pickle
import queue as queue_mod
import signal
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

__all__ = ["run_ranks", "free_port", "RanksFailed", "run_cli", "start_cli", "wait_cli", "kill_tree",
           "die_inside_save"]


class RanksFailed(RuntimeError):
    """One or more ranks raised, crashed or timed out."""


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, env: dict,
            threads: int, init_pg: bool, out: Any) -> None:
    os.environ.update({  # ``env`` may override these (e.g. LOCAL_RANK=0: several ranks sharing one GPU)
        "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
        "LOCAL_WORLD_SIZE": str(world_size), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        "GROUP_RANK": "0", **env,
    })
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    try:
        if init_pg:
            from datetime import timedelta

            dist.init_process_group("gloo", rank=rank, world_size=world_size,
                                    init_method=f"tcp://127.0.0.1:{port}", timeout=timedelta(seconds=120))
        result = fn(rank, world_size, *args)
        # plain pickle bytes: torch's queue would pass tensors as shared-memory fds, which die with the rank
        out.put((rank, True, pickle.dumps(result)))
    except BaseException:  # report everything, including SystemExit from a test helper
        out.put((rank, False, traceback.format_exc()))
    finally:
        if init_pg and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def run_ranks(fn: Callable, world_size: int = 2, args: tuple = (), *, timeout: float = 240.0,
              env: dict[str, str] | None = None, threads: int = 1, init_process_group: bool = True) -> list:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` spawned ranks; return their results.

    Args:
        fn: a module-level (picklable) function.
        world_size: number of ranks (2-4 in tests).
        args: extra positional arguments, picklable.
        timeout: seconds for the whole group; past it every rank is killed.
        env: extra environment variables for the ranks.
        threads: torch intra-op threads per rank.
        init_process_group: start gloo before calling ``fn`` (set False when ``fn`` does it,
            e.g. through ``flexspeed.init_distributed``; the env vars are set either way).
    Returns:
        the per-rank return values, indexed by rank.
    Raises:
        RanksFailed: a rank raised, died, or the group ran past ``timeout``.
    """
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_worker, args=(r, world_size, port, fn, tuple(args), dict(env or {}), threads,
                                          init_process_group, out), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    errors: list[str] = []
    deadline = time.monotonic() + timeout
    try:
        while len(results) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                errors.append(f"timed out after {timeout:.0f}s with ranks {sorted(set(range(world_size)) - set(results))} unfinished")
                break
            try:
                rank, ok, payload = out.get(timeout=min(remaining, 1.0))
            except queue_mod.Empty:
                dead = [i for i, p in enumerate(procs) if p.exitcode not in (None, 0) and i not in results]
                if dead:
                    # give a dying rank a moment to report its traceback
                    try:
                        rank, ok, payload = out.get(timeout=2.0)
                    except queue_mod.Empty:
                        errors.append(f"rank(s) {dead} exited with codes {[procs[i].exitcode for i in dead]} without a report")
                        break
                else:
                    continue
            if ok:
                results[rank] = pickle.loads(payload)
            else:
                errors.append(f"rank {rank} failed:\n{payload}")
                break  # peers are likely blocked in a collective; stop the group
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 0.5)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
    if errors:
        raise RanksFailed("\n".join(errors))
    return [results[r] for r in range(world_size)]


def _children() -> dict[int, list[int]]:
    """Parent pid -> child pids, from ``/proc`` (empty where there is none)."""
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue  # exited meanwhile
            out.setdefault(ppid, []).append(int(entry))
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid``, every process descended from it and their process groups (never the caller's group)."""
    children, tree, i = _children(), [pid], 0
    while i < len(tree):
        tree += children.get(tree[i], [])
        i += 1
    own = os.getpgrp()
    for p in tree:
        try:
            group = os.getpgid(p)
            if group != own:
                os.killpg(group, signal.SIGKILL)
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def start_cli(*argv: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start ``python -m flexspeed *argv`` in a new session, stdout and stderr merged into one text pipe.

    The child sees this process's environment with ``OMP_NUM_THREADS=1`` and ``PYTHONPATH`` set to this
    interpreter's ``sys.path`` (so it imports the same flexspeed), then ``env`` on top.
    """
    full = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path), **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "flexspeed", *argv], env=full, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_cli(proc: subprocess.Popen, timeout: float = 300.0) -> tuple[int, str]:
    """``(exit code, output)`` of a :func:`start_cli` job.

    Raises:
        RanksFailed: the job ran past ``timeout`` seconds; it and every process it started are killed first
            (torchrun starts each worker in a session of its own), and the message holds the output so far.
    """
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, _ = proc.communicate()
        raise RanksFailed(f"{' '.join(map(str, proc.args[1:]))} ran past {timeout:g} s:\n{out}") from None
    return proc.returncode, out


def run_cli(*argv: str, env: dict[str, str] | None = None, timeout: float = 300.0) -> tuple[int, str]:
    """Run ``python -m flexspeed *argv`` to the end: :func:`start_cli` then :func:`wait_cli`."""
    return wait_cli(start_cli(*argv, env=env), timeout)


def die_inside_save(step: int) -> None:
    """Make this process SIGKILL itself inside the save of ``global_step<step>``: after the tensors are
    written, before the commit (fault-injection for auto-resume tests)."""
    import signal

    from flexspeed.runtime import checkpoint

    real_hash = checkpoint.hash_state_files

    def hash_then_die(state_dir: str, *args: Any) -> Any:
        if f"-global_step{step}-" in state_dir:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_hash(state_dir, *args)

    checkpoint.hash_state_files = hash_then_die
