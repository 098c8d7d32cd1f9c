"""Long work says what it did: rank 0 logs initialize(), init_inference() and checkpoint save/load
with sizes and seconds through a default stderr handler; other ranks and FLEXSPEED_LOG_LEVEL=off stay
quiet; an application's own logging setup is kept. Run in subprocesses (pytest configures logging)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from flexspeed.utils.logging import human_bytes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = r"""
import copy, sys, tempfile, torch, flexspeed
from flexspeed.models import GPT
if len(sys.argv) > 1 and sys.argv[1] == "app-logging":
    import logging
    logging.basicConfig(level=logging.WARNING, format="APP %(message)s")
m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
e, *_ = flexspeed.initialize(model=m, model_parameters=m.parameters(),
                             config={"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}})
with tempfile.TemporaryDirectory() as d:
    e.save_checkpoint(d)
    e.load_checkpoint(d)
g = GPT(n_layer=1, n_embd=32, n_head=2, vocab_size=50, block_size=16)
flexspeed.init_inference(copy.deepcopy(g), dtype="fp32", replace_with_kernel_inject=True)
print("done")
"""


def run(env_extra: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "FLEXSPEED_LOG_LEVEL")}
    env.update(env_extra)
    res = subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True, cwd=ROOT, env=env,
                         timeout=300)
    assert res.returncode == 0 and "done" in res.stdout, res.stderr[-3000:]
    return res


def test_rank0_lines_with_sizes_and_seconds() -> None:
    err = run({}).stderr
    assert "[flexspeed] initialize: 58 parameters, ZeRO stage 0, fp32, world size 1" in err, err
    assert "[flexspeed] init_inference: GPT ready in" in err and "fused kernels" in err, err
    saved = next(line for line in err.splitlines() if "saved checkpoint" in line)
    assert " B " in saved or "kB" in saved or "MB" in saved, saved  # bytes written
    assert " s" in saved, saved
    assert any("loaded checkpoint" in line for line in err.splitlines()), err


@pytest.mark.parametrize("env", [{"FLEXSPEED_LOG_LEVEL": "off"}, {"FLEXSPEED_LOG_LEVEL": "warning"}])
def test_level_from_the_environment(env: dict[str, str]) -> None:
    assert "[flexspeed]" not in run(env).stderr


def test_an_application_logging_setup_is_kept() -> None:
    err = run({}, "app-logging").stderr
    assert "[flexspeed]" not in err  # no second handler; the app's WARNING level filters info lines


def test_human_bytes() -> None:
    assert [human_bytes(n) for n in (12, 1_500, 2_345_678, 1.6e9)] == ["12 B", "1.5 kB", "2.3 MB", "1.60 GB"]
