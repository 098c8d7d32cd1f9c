"""A DeepSpeed-style script runs unchanged (apart from the import) under torchrun with 2
processes and as plain ``python script.py`` with no launcher and no environment."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "train_gpt.py"
CONFIG = ROOT / "examples" / "ds_config_zero0.json"


def _clean_env() -> dict:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "SLURM_", "OMPI_", "TORCHELASTIC"))}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _loss_line(out: str) -> tuple[int, float, float]:
    m = re.search(r"world_size=(\d+) steps=\d+ loss ([\d.]+) -> ([\d.]+)", out)
    assert m, out
    return int(m.group(1)), float(m.group(2)), float(m.group(3))


def test_plain_python_no_launcher():
    out = subprocess.run([sys.executable, str(SCRIPT), "--steps", "30", "--deepspeed", "--deepspeed_config",
                          str(CONFIG)], capture_output=True, text=True, timeout=180, env=_clean_env(), cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    world, first, last = _loss_line(out.stdout)
    assert world == 1 and last < first - 0.5


def test_torchrun_two_processes():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(SCRIPT),
           "--steps", "30", "--deepspeed", "--deepspeed_config", str(CONFIG)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=_clean_env(), cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    world, first, last = _loss_line(out.stdout)
    assert world == 2 and last < first - 0.5
