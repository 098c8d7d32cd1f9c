"""``flexspeed launch`` end to end on 127.0.0.1: two processes on one node, two single-process
"nodes" that rendezvous with each other, a group restarted after a worker kills itself, and the
``--local_rank`` argument passed only to scripts that declare it."""

from __future__ import annotations

import json
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from flexspeed.testing import RanksFailed, free_port, start_cli, wait_cli

# Each worker reports what it saw; every process group it joins has a timeout.
WORKER = textwrap.dedent('''
    import argparse, json, os, sys
    from datetime import timedelta
    import torch, torch.distributed as dist

    local_rank_ok = None
    LOCAL_RANK_ARG
    out = sys.argv[-1]
    attempt = int(os.environ["TORCHELASTIC_RESTART_COUNT"])
    if os.environ.get("DIE_ON_FIRST_ATTEMPT") and attempt == 0 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), 9)  # a worker dies hard; the agent must restart the whole group
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    t = torch.tensor([float(dist.get_rank() + 1)])
    dist.all_reduce(t)
    info = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR")}
    info.update(sum=t.item(), attempt=attempt, argv=sys.argv[1:], local_rank_ok=local_rank_ok)
    with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(info, f)
    dist.destroy_process_group()
''')


def _script(tmp_path: Path, declares_local_rank: bool = False) -> Path:
    arg = ('p = argparse.ArgumentParser(); p.add_argument("--local_rank", type=int); p.add_argument("out");'
           ' args = p.parse_args(); local_rank_ok = args.local_rank == int(os.environ["LOCAL_RANK"])'
           if declares_local_rank else "")
    path = tmp_path / "worker.py"
    path.write_text(WORKER.replace("LOCAL_RANK_ARG", arg))
    return path


def _launch(*argv: str, env: dict | None = None) -> subprocess.Popen:
    return start_cli("launch", *argv, env=env)


def _wait(proc: subprocess.Popen) -> tuple[int, str]:
    return wait_cli(proc, timeout=120)


def _reports(out_dir: Path, n: int) -> list[dict]:
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(n)]


def test_two_processes_one_node(tmp_path):
    script = _script(tmp_path, declares_local_rank=True)
    code, out = _wait(_launch("--nproc-per-node", "2", str(script), str(tmp_path)))
    assert code == 0, out
    reps = _reports(tmp_path, 2)
    assert [r["RANK"] for r in reps] == ["0", "1"] and all(r["WORLD_SIZE"] == "2" for r in reps)
    assert all(r["sum"] == 3.0 and r["MASTER_ADDR"] == "127.0.0.1" for r in reps)
    # the script declares --local_rank, so it arrives first on its command line
    assert [r["argv"][0] for r in reps] == ["--local_rank=0", "--local_rank=1"]
    # recorded in each rank's report, not printed: two ranks' stdout lines can interleave
    assert [r["local_rank_ok"] for r in reps] == [True, True], reps


def test_two_nodes_rendezvous_on_loopback(tmp_path):
    script = _script(tmp_path)
    port = str(free_port())
    common = ["--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", port,
              "--rdzv-timeout", "60"]
    nodes = [_launch(*common, "--node-rank", str(r), str(script), str(tmp_path)) for r in (0, 1)]
    results = [_wait(p) for p in nodes]
    for code, out in results:
        assert code == 0, out
    reps = _reports(tmp_path, 2)
    assert [r["GROUP_RANK"] for r in reps] == ["0", "1"] and all(r["WORLD_SIZE"] == "2" for r in reps)
    assert all(r["sum"] == 3.0 for r in reps)
    assert all(r["argv"] == [str(tmp_path)] for r in reps)  # no --local_rank: the script does not declare it


def test_max_restarts_restarts_the_group(tmp_path):
    script = _script(tmp_path)
    code, out = _wait(_launch("--nproc-per-node", "2", "--max-restarts", "1", str(script), str(tmp_path),
                              env={"DIE_ON_FIRST_ATTEMPT": "1"}))
    assert code == 0, out
    reps = _reports(tmp_path, 2)
    assert all(r["attempt"] == 1 and r["sum"] == 3.0 for r in reps), reps


def test_failure_without_restarts_is_reported(tmp_path):
    script = _script(tmp_path)
    code, out = _wait(_launch("--nproc-per-node", "2", str(script), str(tmp_path),
                              env={"DIE_ON_FIRST_ATTEMPT": "1"}))
    assert code != 0 and "worker failed" in out, out


def test_wait_cli_kills_the_launcher_and_its_workers_past_the_timeout(tmp_path):
    script = tmp_path / "sleeper.py"
    script.write_text("import os, sys, time\nopen(sys.argv[1], 'w').write(str(os.getpid()))\ntime.sleep(600)\n")
    pid_file = tmp_path / "pid"
    proc = start_cli("launch", "--nproc-per-node", "1", str(script), str(pid_file))
    deadline = time.monotonic() + 120
    while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.2)
    worker = int(pid_file.read_text())
    with pytest.raises(RanksFailed, match=r"launch --nproc-per-node 1 .* ran past 1 s"):
        wait_cli(proc, timeout=1)
    assert proc.returncode is not None  # the launcher is gone ...
    for _ in range(50):  # ... and so is its worker (or it is a zombie waiting for init to reap it)
        try:
            state = Path(f"/proc/{worker}/stat").read_text().split(")")[-1].split()[0]
        except FileNotFoundError:
            break
        if state == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"worker {worker} still running (state {state})")
