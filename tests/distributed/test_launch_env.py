"""init_distributed() starts a real 2-process gloo group from Slurm's and Open MPI's variables
(no torchrun), and flexspeed.comm collectives work over it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from flexspeed.testing import free_port

SNIPPET = """
import torch, flexspeed, flexspeed.comm as comm
env = flexspeed.init_distributed()
t = torch.ones(1) * (comm.get_rank() + 1)
comm.all_reduce(t)
objs = [None] * comm.get_world_size()
comm.all_gather_object(objs, comm.get_rank())
print(f"rank={comm.get_rank()} world={comm.get_world_size()} local={comm.get_local_rank()} sum={t.item():.0f} "
      f"gathered={objs} source={env.source}", flush=True)
comm.destroy_process_group()
"""


def _clean() -> dict:
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_", "OMPI_", "TORCHELASTIC"))}


def _launch(per_rank_env) -> list[str]:
    procs = [subprocess.Popen([sys.executable, "-c", SNIPPET], env={**_clean(), **e}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for e in per_rank_env]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=120)
            assert p.returncode == 0, err[-2000:]
            outs.append(out.strip())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return outs


@pytest.mark.parametrize("launcher", ["slurm", "openmpi"])
def test_group_from_launcher_env(launcher):
    port = str(free_port())
    if launcher == "slurm":
        envs = [{"SLURM_PROCID": str(r), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(r),
                 "SLURM_JOB_NODELIST": "127.0.0.1", "MASTER_PORT": port} for r in range(2)]
    else:
        envs = [{"OMPI_COMM_WORLD_RANK": str(r), "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": str(r),
                 "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "MASTER_PORT": port} for r in range(2)]
    outs = _launch(envs)
    for r, line in enumerate(outs):
        assert f"rank={r} world=2 local={r} sum=3 gathered=[0, 1]" in line, line
        assert ("Slurm" if launcher == "slurm" else "Open MPI") in line
