"""``flexspeed launch``: start a training script on N processes per node, on PyTorch's elastic agent.

The processes are started, watched and restarted by ``torch.distributed.run`` (torchrun's
code, called in this process with translated arguments); flexspeed only decides *what* to run:

- one node: ``--nproc-per-node`` processes rendezvous on 127.0.0.1 and a free port;
- several nodes: run ``flexspeed launch`` once per node with the same ``--nnodes``,
  ``--master-addr`` and ``--master-port`` and each node's ``--node-rank``;
- a DeepSpeed hostfile (``host slots=N`` per line, ``#`` comments) with ``--include`` /
  ``--exclude`` (``host1:0,1@host2``): with only the local host listed it runs here (on the
  selected device slots, via ``CUDA_VISIBLE_DEVICES``); with other hosts it prints the
  command for each node (flexspeed does not log in to other machines) and exits;
- inside a Slurm job (``SLURM_JOB_ID``) without ``--nnodes``: the node count, this node's
  rank and the master address come from Slurm; run one launcher per node
  (``srun --ntasks-per-node=1 flexspeed launch ...``).

Every process gets torchrun's environment (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``,
``MASTER_ADDR``, ...). ``--local_rank=N`` is also passed on the command line, as DeepSpeed's
launcher does, when the script looks like it declares that option: its source contains the
string ``"--local_rank"`` or ``"--local-rank"`` in quotes (a heuristic; ``--no-local-rank``
turns it off). The flag goes first, before the script's own arguments.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import runpy
import shlex
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["add_parser", "run", "parse_hostfile", "select_hosts", "SlurmSettings", "slurm_settings",
           "local_rank_flag", "torchrun_argv", "is_local_host"]

_HOSTFILE_LINE = re.compile(r"^(?P<host>\S+)\s+slots\s*=\s*(?P<slots>\d+)$")
_EPILOG = """\
examples:
  flexspeed launch --nproc-per-node 2 train.py --deepspeed_config ds_config.json
  flexspeed launch --nnodes 2 --node-rank 0 --master-addr 10.0.0.1 --master-port 29500 \\
      --nproc-per-node 8 train.py          # then the same with --node-rank 1 on the other node
  flexspeed launch --max-restarts 3 --nproc-per-node 4 train.py   # restart the group on a failure
  flexspeed launch --nnodes 1:4 --max-restarts 3 --master-addr 10.0.0.1 train.py   # elastic: 1 to 4 nodes
  flexspeed launch --hostfile hosts.txt --include "node1:0,1@node2" --dry-run train.py
  srun --ntasks-per-node=1 flexspeed launch --nproc-per-node 4 train.py   # in a Slurm job

hostfile format (DeepSpeed's): one "HOST slots=N" per line, "#" starts a comment.
--include/--exclude: "HOST[:SLOT,SLOT...]" joined with "@", e.g. "node1:0,1@node2".
"""


# ---- hostfile ----------------------------------------------------------------------------------------
def parse_hostfile(text: str, source: str = "hostfile") -> dict[str, int]:
    """``{host: slots}`` from hostfile text, in file order.

    Raises:
        ValueError: a line is not ``HOST slots=N``, a host repeats, or nothing is listed.
    """
    hosts: dict[str, int] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        m = _HOSTFILE_LINE.match(line)
        if not m:
            raise ValueError(f"{source} line {lineno}: {raw.strip()!r} is not 'HOST slots=N' (e.g. 'node1 slots=8')")
        host, slots = m.group("host"), int(m.group("slots"))
        if host in hosts:
            raise ValueError(f"{source} line {lineno}: host {host!r} is listed twice; list each host once")
        if slots < 1:
            raise ValueError(f"{source} line {lineno}: {host} has slots={slots}; give at least 1 slot")
        hosts[host] = slots
    if not hosts:
        raise ValueError(f"{source} lists no hosts; add lines like 'localhost slots=2'")
    return hosts


def _parse_selection(spec: str, flag: str, available: Mapping[str, list[int]]) -> dict[str, list[int] | None]:
    """``"h1:0,1@h2"`` -> ``{"h1": [0, 1], "h2": None}`` (``None``: all slots), checked against ``available``."""
    out: dict[str, list[int] | None] = {}
    for part in filter(None, spec.split("@")):
        host, _, slots = part.partition(":")
        if host not in available:
            raise ValueError(f"{flag} {spec!r}: host {host!r} is not in the hostfile (hosts: {', '.join(available)})")
        if not slots:
            out[host] = None
            continue
        try:
            wanted = [int(s) for s in slots.split(",") if s.strip()]
        except ValueError as e:
            raise ValueError(f"{flag} {spec!r}: slots of {host!r} must be integers, as in 'node1:0,1'") from e
        bad = [s for s in wanted if s not in available[host]]
        if bad:
            raise ValueError(f"{flag} {spec!r}: {host} has no slot(s) {bad}; its slots are {available[host]}")
        out[host] = sorted(set(wanted) | set(out.get(host) or []))
    return out


def select_hosts(hosts: Mapping[str, int], include: str | None = None, exclude: str | None = None,
                 num_nodes: int | None = None, num_slots: int | None = None) -> dict[str, list[int]]:
    """The hosts and slot indices to use, DeepSpeed-style.

    Args:
        hosts: ``{host: slots}`` from :func:`parse_hostfile`.
        include: keep only these (``"h1:0,1@h2"``; a host without ``:`` keeps all its slots).
        exclude: drop these (a host without ``:`` is dropped entirely).
        num_nodes: keep the first N hosts (after include/exclude).
        num_slots: keep the first N slots of each host.
    Returns:
        ``{host: [slot, ...]}`` with empty hosts removed, in hostfile order.
    Raises:
        ValueError: both include and exclude, an unknown host or slot, or nothing left.
    """
    if include and exclude:
        raise ValueError("--include and --exclude cannot be combined; express the selection with one of them")
    avail = {h: list(range(n)) for h, n in hosts.items()}
    if include:
        sel = _parse_selection(include, "--include", avail)
        avail = {h: (sel[h] if sel[h] is not None else slots) for h, slots in avail.items() if h in sel}
    elif exclude:
        sel = _parse_selection(exclude, "--exclude", avail)
        avail = {h: [s for s in slots if sel.get(h, []) is not None and s not in (sel.get(h) or [])]
                 for h, slots in avail.items() if not (h in sel and sel[h] is None)}
    avail = {h: s for h, s in avail.items() if s}
    if num_nodes is not None:
        if num_nodes > len(avail):
            raise ValueError(f"--nnodes {num_nodes} but only {len(avail)} host(s) are selected: {', '.join(avail)}")
        avail = dict(list(avail.items())[:num_nodes])
    if num_slots is not None:
        short = [h for h, s in avail.items() if len(s) < num_slots]
        if short:
            raise ValueError(f"--nproc-per-node {num_slots} but host(s) {short} have fewer selected slots")
        avail = {h: s[:num_slots] for h, s in avail.items()}
    if not avail:
        raise ValueError("the hostfile selection leaves no host with a free slot; relax --include/--exclude")
    return avail


def is_local_host(host: str) -> bool:
    """True for names of this machine (localhost, loopback addresses, its hostname)."""
    if host in ("localhost", "127.0.0.1", "::1") or host.startswith("127."):
        return True
    return host in (socket.gethostname(), socket.getfqdn(), socket.gethostname().split(".")[0])


# ---- Slurm ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SlurmSettings:
    """What a launcher on one node of a Slurm allocation needs."""

    nnodes: int
    node_rank: int
    master_addr: str
    master_port: int
    gpus_per_node: int | None


def slurm_settings(env: Mapping[str, str] | None = None) -> SlurmSettings | None:
    """Node count, node rank and rendezvous address from a Slurm job's environment; ``None`` outside Slurm.

    The master port is ``MASTER_PORT`` if set, else ``29500 + SLURM_JOB_ID % 10000`` (the same on
    every node, different for concurrent jobs).

    Raises:
        ValueError: Slurm runs several tasks where one launcher per node is needed.
    """
    from flexspeed.distributed import first_slurm_host

    env = os.environ if env is None else env
    if "SLURM_JOB_ID" not in env:
        return None
    nnodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
    ntasks = int(env.get("SLURM_NTASKS") or nnodes)
    in_step = "SLURM_STEP_ID" in env or "SLURM_STEPID" in env
    if (in_step and ntasks != nnodes) or (not in_step and nnodes > 1):
        raise ValueError(
            f"Slurm job with SLURM_NNODES={nnodes} and SLURM_NTASKS={ntasks}"
            f"{' inside an srun step' if in_step else ' in the batch script (one node only)'}: flexspeed launch "
            "starts each node's processes itself, so run exactly one launcher per node: "
            "'srun --ntasks-per-node=1 flexspeed launch --nproc-per-node N script.py' (or run the script "
            "directly under srun with one task per process; flexspeed.init_distributed reads Slurm's variables)")
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
    master = env.get("MASTER_ADDR") or first_slurm_host(nodelist)
    digits = re.sub(r"\D", "", env["SLURM_JOB_ID"]) or "0"
    port = int(env.get("MASTER_PORT") or 29500 + int(digits) % 10000)
    gpus = env.get("SLURM_GPUS_ON_NODE")
    return SlurmSettings(nnodes=nnodes, node_rank=int(env.get("SLURM_NODEID", 0)), master_addr=master,
                         master_port=port, gpus_per_node=int(gpus) if gpus and gpus.isdigit() else None)


# ---- the command -----------------------------------------------------------------------------------------
def local_rank_flag(script: str, module: bool = False) -> str | None:
    """``"--local_rank"`` / ``"--local-rank"`` if the script's source mentions that option in quotes, else None."""
    path = script
    if module:
        try:
            spec = importlib.util.find_spec(script)
        except (ImportError, ValueError):
            return None
        path = spec.origin if spec and spec.origin else ""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            source = f.read()
    except OSError:
        return None
    m = re.search(r"""["'](--local[_-]rank)["']""", source)
    return m.group(1) if m else None


def torchrun_argv(*, nnodes: int | str, nproc_per_node: int, node_rank: int, master_addr: str, master_port: int,
                  max_restarts: int, rdzv_timeout: int | None, script: str, script_args: list[str],
                  module: bool = False, local_rank: str | None = None) -> list[str]:
    """The ``torch.distributed.run`` arguments that run ``script`` as described.

    Without restarts: the static rendezvous at ``master_addr:master_port``, which keeps the
    node ranks as given. With ``max_restarts > 0``: the c10d rendezvous at the same address
    (node 0 hosts it; node ranks are then assigned in the order nodes join), because the static
    rendezvous hands every restarted group the same store, where the new workers can read the
    addresses of the dead ones and fail to connect. :func:`run` also sets
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1`` then, so each restart gets a fresh worker store.
    """
    argv = [f"--nnodes={nnodes}", f"--nproc-per-node={nproc_per_node}", f"--max-restarts={max_restarts}"]
    if max_restarts > 0 or ":" in str(nnodes):  # restarts and MIN:MAX nodes need the c10d rendezvous
        conf = f"is_host={int(node_rank == 0)}" + (f",join_timeout={rdzv_timeout}" if rdzv_timeout else "")
        argv += ["--rdzv-backend=c10d", f"--rdzv-endpoint={master_addr}:{master_port}",
                 f"--rdzv-id=flexspeed-{master_port}", f"--rdzv-conf={conf}"]
    else:
        argv += [f"--node-rank={node_rank}", f"--master-addr={master_addr}", f"--master-port={master_port}"]
        if rdzv_timeout:
            argv.append(f"--rdzv-conf=timeout={rdzv_timeout}")
    if local_rank:
        # the shim at the bottom of this file adds --local_rank=$LOCAL_RANK and runs the script
        shim = ["--module"] if module else []
        return argv + ["-m", "flexspeed.cli.launch", f"--local-rank-flag={local_rank}", *shim, script, *script_args]
    return argv + (["-m"] if module else []) + [script, *script_args]


def parse_nnodes(text: str) -> int | str:
    """``--nnodes``: ``N``, or ``MIN:MAX`` for an elastic job (torchrun's c10d rendezvous admits MIN to MAX nodes)."""
    lo, sep, hi = text.partition(":")
    try:
        low, high = int(lo), int(hi if sep else lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not N or MIN:MAX (e.g. 2 or 1:4)") from None
    if not 1 <= low <= high:
        raise argparse.ArgumentTypeError(f"{text!r}: need 1 <= MIN <= MAX")
    return f"{low}:{high}" if sep and low != high else low


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Start SCRIPT on several processes (and nodes) with PyTorch's elastic agent\n"
                                   "(torch.distributed.run). Each process gets RANK, LOCAL_RANK, WORLD_SIZE,\n"
                                   "MASTER_ADDR and MASTER_PORT; a failed process stops (or restarts) the group.")
    p.add_argument("--nproc-per-node", "--nproc_per_node", "--num_gpus", "--num-gpus", type=int, default=None,
                   dest="nproc_per_node", metavar="N",
                   help="processes per node (default: the hostfile's slots, else the GPU count, else 1)")
    p.add_argument("--nnodes", "--num_nodes", "--num-nodes", type=parse_nnodes, default=None, dest="nnodes",
                   metavar="N",
                   help="number of nodes, or MIN:MAX for an elastic job (default 1, or from Slurm / the hostfile)")
    p.add_argument("--node-rank", "--node_rank", type=int, default=None, dest="node_rank", metavar="R",
                   help="this node's index, 0..nnodes-1 (default 0)")
    p.add_argument("--master-addr", "--master_addr", default=None, dest="master_addr", metavar="ADDR",
                   help="address of node 0, where the rendezvous runs (default 127.0.0.1)")
    p.add_argument("--master-port", "--master_port", type=int, default=None, dest="master_port", metavar="PORT",
                   help="rendezvous port on node 0 (default: a free port with one node, 29500 with several)")
    p.add_argument("--max-restarts", "--max_restarts", type=int, default=0, dest="max_restarts", metavar="K",
                   help="restart the whole process group up to K times when a process fails (default 0)")
    p.add_argument("--rdzv-timeout", type=int, default=None, metavar="SECONDS",
                   help="how long nodes wait for each other at the rendezvous (default: torch's, 600)")
    p.add_argument("--hostfile", "-H", default=None, metavar="FILE",
                   help="DeepSpeed hostfile: lines 'HOST slots=N'")
    p.add_argument("--include", "-i", default=None, metavar="SPEC",
                   help="use only these hosts/slots, e.g. 'node1:0,1@node2'")
    p.add_argument("--exclude", "-e", default=None, metavar="SPEC", help="leave out these hosts/slots")
    p.add_argument("--no-local-rank", "--no_local_rank", action="store_true", dest="no_local_rank",
                   help="never pass --local_rank to the script (it reads LOCAL_RANK from the environment)")
    p.add_argument("--module", "-m", action="store_true", help="SCRIPT is a module name, run as 'python -m'")
    p.add_argument("--dry-run", action="store_true", help="print what would run and exit")
    p.add_argument("--as-deepspeed", action="store_true", dest="as_deepspeed",
                   help="run the workers with flexspeed as their 'deepspeed' (import deepspeed and its package "
                        "metadata), for HF Trainer / Accelerate / Lightning scripts; see docs/integrations.md")
    p.add_argument("script", metavar="SCRIPT", help="the training script (or module with -m)")
    p.add_argument("script_args", nargs=argparse.REMAINDER, metavar="...", help="arguments for the script")
    return p


@dataclass
class _Plan:
    nodes: dict[str, list[int]]  # host -> device slots; one entry means "run here"
    nnodes: int | str  # "MIN:MAX" for an elastic job
    node_rank: int
    nproc: int
    master_addr: str
    master_port: int
    visible: str | None  # CUDA_VISIBLE_DEVICES for this node, or None to leave it alone


def _default_nproc() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def make_plan(args: argparse.Namespace) -> _Plan:
    """Resolve hostfile / Slurm / flags into what to run. Raises ValueError with the fix."""
    if isinstance(args.nnodes, str) and (args.hostfile or args.include or args.exclude):
        raise ValueError(f"--nnodes {args.nnodes} (elastic) cannot be combined with a hostfile selection")
    if args.hostfile or args.include or args.exclude:
        if args.hostfile:
            with open(args.hostfile) as f:
                hosts = parse_hostfile(f.read(), source=args.hostfile)
        else:  # DeepSpeed allows --include localhost:0,1 without a hostfile
            hosts = {"localhost": args.nproc_per_node or _default_nproc()}
        nodes = select_hosts(hosts, args.include, args.exclude, num_nodes=args.nnodes,
                             num_slots=args.nproc_per_node if args.hostfile else None)
        first = next(iter(nodes))
        master = args.master_addr or ("127.0.0.1" if len(nodes) == 1 and is_local_host(first) else first)
        port = args.master_port or (_free_port() if len(nodes) == 1 else 29500)
        slots = nodes[first]
        restricted = slots != list(range(len(slots))) or args.include or args.exclude
        visible = ",".join(map(str, slots)) if restricted else None
        return _Plan(nodes, len(nodes), 0, len(slots), master, port, visible)
    slurm = slurm_settings() if args.nnodes is None else None
    if slurm is not None:
        nproc = args.nproc_per_node or slurm.gpus_per_node or _default_nproc()
        return _Plan({"localhost": list(range(nproc))}, slurm.nnodes, slurm.node_rank, nproc,
                     args.master_addr or slurm.master_addr, args.master_port or slurm.master_port, None)
    nnodes, node_rank = args.nnodes or 1, args.node_rank or 0
    most = int(str(nnodes).split(":")[-1])  # MIN:MAX (elastic): up to MAX nodes
    if not 0 <= node_rank < most:
        raise ValueError(f"--node-rank {node_rank} is outside 0..{most - 1} for --nnodes {nnodes}")
    if most > 1 and not args.master_addr:
        raise ValueError(f"--nnodes {nnodes} needs --master-addr: the address of node 0, the same on every node")
    nproc = args.nproc_per_node or _default_nproc()
    port = args.master_port or (_free_port() if most == 1 else 29500)
    return _Plan({"localhost": list(range(nproc))}, nnodes, node_rank, nproc, args.master_addr or "127.0.0.1",
                 port, None)


def _free_port() -> int:
    from flexspeed.testing import free_port

    return free_port()


def _node_command(args: argparse.Namespace, plan: _Plan, node_rank: int, host: str) -> str:
    slots = plan.nodes[host]
    cmd = ["flexspeed", "launch", "--nnodes", str(plan.nnodes), "--node-rank", str(node_rank),
           "--nproc-per-node", str(len(slots)), "--master-addr", plan.master_addr, "--master-port",
           str(plan.master_port)]
    if args.max_restarts:
        cmd += ["--max-restarts", str(args.max_restarts)]
    if args.rdzv_timeout:
        cmd += ["--rdzv-timeout", str(args.rdzv_timeout)]
    if args.no_local_rank:
        cmd.append("--no-local-rank")
    if getattr(args, "as_deepspeed", False):
        cmd.append("--as-deepspeed")
    if args.module:
        cmd.append("-m")
    prefix = f"CUDA_VISIBLE_DEVICES={','.join(map(str, slots))} " if plan.visible is not None or len(
        plan.nodes) > 1 and slots != list(range(len(slots))) else ""
    return prefix + shlex.join(cmd + [args.script, *args.script_args])


def run(args: argparse.Namespace) -> int:
    try:
        plan = make_plan(args)
    except (ValueError, OSError) as e:
        print(f"flexspeed launch: {e}", file=sys.stderr)
        return 2
    if args.module is False and not os.path.isfile(args.script):
        print(f"flexspeed launch: script {args.script!r} does not exist (pass -m to run a module)", file=sys.stderr)
        return 2
    remote = len(plan.nodes) > 1 or not is_local_host(next(iter(plan.nodes)))
    if remote:
        print(f"# {plan.nnodes} nodes, {sum(map(len, plan.nodes.values()))} processes: flexspeed does not log in to "
              "other machines; run each line on its node (e.g. with ssh or pdsh)")
        for rank, host in enumerate(plan.nodes):
            print(f"# on {host}:\n{_node_command(args, plan, rank, host)}")
        return 0
    flag = None if args.no_local_rank else local_rank_flag(args.script, args.module)
    argv = torchrun_argv(nnodes=plan.nnodes, nproc_per_node=plan.nproc, node_rank=plan.node_rank,
                         master_addr=plan.master_addr, master_port=plan.master_port, max_restarts=args.max_restarts,
                         rdzv_timeout=args.rdzv_timeout, script=args.script, script_args=list(args.script_args),
                         module=args.module, local_rank=flag)
    env = {"CUDA_VISIBLE_DEVICES": plan.visible} if plan.visible is not None else {}
    if args.max_restarts > 0:
        env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] = "1"  # a fresh worker store per restart (see torchrun_argv)
    if args.dry_run:
        prefix = "".join(f"{k}={v} " for k, v in env.items())
        print(prefix + shlex.join([sys.executable, "-m", "torch.distributed.run", *argv]))
        if getattr(args, "as_deepspeed", False):
            print("# --as-deepspeed: each worker imports flexspeed's DeepSpeed compatibility layer as 'deepspeed'")
        return 0
    os.environ.update(env)
    if getattr(args, "as_deepspeed", False):  # the workers inherit it (PYTHONPATH, FLEXSPEED_AS_DEEPSPEED)
        from flexspeed.integrations.identity import activate

        activate()
    return _run_elastic(argv)


def _run_elastic(argv: list[str]) -> int:
    """Run ``torch.distributed.run`` in this process; the exit code of the first failed worker, or 0."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args
    from torch.distributed.run import run as elastic_run

    _continue_stopped_workers_on_shutdown()
    try:
        elastic_run(parse_args(argv))
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        print(f"flexspeed launch: worker failed:\n{e}", file=sys.stderr)
        culprit = _diagnosis(e)
        if culprit:
            print(f"flexspeed launch: {culprit}", file=sys.stderr)
        return failure.exitcode if failure.exitcode and failure.exitcode > 0 else 1
    return 0


def _diagnosis(err: Exception) -> str | None:
    """The heartbeat's sentence naming the rank that stopped answering, from the workers' error files."""
    from flexspeed.distributed.heartbeat import DIAGNOSIS_MARK

    for _, failure in sorted(getattr(err, "failures", {}).items()):
        message = failure.message if isinstance(failure.message, str) else (failure.message or {}).get("message", "")
        if isinstance(message, str) and DIAGNOSIS_MARK in message:
            return message[message.index(DIAGNOSIS_MARK):]
    return None


def _continue_stopped_workers_on_shutdown() -> None:
    """Let a stopped worker (SIGSTOP, a debugger) take the agent's SIGTERM at once.

    When one worker fails, torch's agent sends SIGTERM to the others and waits 30 s before SIGKILL; a
    stopped process ignores SIGTERM until it is continued, so a job with a stopped rank took 30 s longer to
    end. This process (the launcher, not the workers) sends SIGCONT to the workers right before that.
    """
    import signal

    from torch.distributed.elastic.multiprocessing.api import PContext

    original = PContext.close
    if getattr(original, "_flexspeed_continues", False):
        return

    def close(self: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            pids = list(self.pids().values())
        except Exception:  # noqa: BLE001 - no processes yet
            pids = []
        for pid in pids:
            try:
                os.kill(pid, signal.SIGCONT)
            except OSError:
                pass
        return original(self, *args, **kwargs)

    close._flexspeed_continues = True  # type: ignore[attr-defined]
    PContext.close = close


def _worker_main(argv: list[str]) -> None:
    """Inside each worker: put ``--local_rank=$LOCAL_RANK`` first in the script's arguments and run it."""
    shim = argparse.ArgumentParser(prog="python -m flexspeed.cli.launch", add_help=False)
    shim.add_argument("--local-rank-flag", required=True)
    shim.add_argument("--module", action="store_true")
    shim.add_argument("script")
    shim.add_argument("script_args", nargs=argparse.REMAINDER)
    ns = shim.parse_args(argv)
    sys.argv = [ns.script, f"{ns.local_rank_flag}={os.environ.get('LOCAL_RANK', '0')}", *ns.script_args]
    if ns.module:
        runpy.run_module(ns.script, run_name="__main__", alter_sys=True)
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(ns.script)))
        runpy.run_path(ns.script, run_name="__main__")


if __name__ == "__main__":
    _worker_main(sys.argv[1:])
