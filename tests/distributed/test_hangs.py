"""Bounded hangs with a named culprit (issue 16, item 4): the process-group timeout's precedence, a
stopped or sleeping rank under ``flexspeed launch`` (the job ends within timeout + 30 s and the output
names the rank and its last activity), and a save that fails on one rank failing every rank at once."""

from __future__ import annotations

import errno
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest

from flexspeed.config.errors import ConfigError
from flexspeed.distributed.timeout import DEFAULT_TIMEOUT, config_timeout, resolve_timeout
from flexspeed.testing import run_cli, run_ranks

SCRIPT = Path(__file__).with_name("_hang_script.py")
ACTIVITY_SCRIPT = Path(__file__).with_name("_activity_hang_script.py")
TIMEOUT_S = 10


def test_timeout_precedence():
    env = {"DEEPSPEED_TIMEOUT": "3"}
    assert resolve_timeout(timedelta(seconds=7), 0.5, env).value == timedelta(seconds=7)  # argument first
    assert resolve_timeout(None, 0.5, env).value == timedelta(seconds=30)  # then the config key
    got = resolve_timeout(None, None, env)
    assert got.value == timedelta(minutes=3) and "DEEPSPEED_TIMEOUT" in got.source  # then the environment
    assert resolve_timeout(None, None, {}).value == DEFAULT_TIMEOUT == timedelta(minutes=10)  # DeepSpeed's default


@pytest.mark.parametrize("text", ["1.5", "ten", "0", "-2"])
def test_deepspeed_timeout_read_as_deepspeed_does(text):
    # DeepSpeed 0.19.8: int(os.getenv("DEEPSPEED_TIMEOUT", default=10)) minutes - "1.5" does not parse
    with pytest.raises(ConfigError, match="DEEPSPEED_TIMEOUT"):
        resolve_timeout(None, None, {"DEEPSPEED_TIMEOUT": text})


def test_config_key_validated():
    assert config_timeout({"flexspeed_distributed": {"timeout_minutes": 0.25}}) == 0.25
    assert config_timeout({}) is None
    for bad in (0, -1, "5", True, float("inf"), 1e9):
        with pytest.raises(ConfigError, match="flexspeed_distributed.timeout_minutes"):
            config_timeout({"flexspeed_distributed": {"timeout_minutes": bad}})
    with pytest.raises(ConfigError, match="heartbeat_interval"):
        config_timeout({"flexspeed_distributed": {"heartbeat_interval": -1}})


def _launch_hang(tmp_path: Path, mode: str, script: Path = SCRIPT) -> tuple[str, float, float]:
    code, out = run_cli("launch", "--nproc-per-node", "2", str(script), mode, str(TIMEOUT_S), str(tmp_path),
                        timeout=180)
    ended = time.time()
    stopped = float((tmp_path / "stopped_at").read_text())
    assert code != 0, out
    return out, stopped, ended


def test_stopped_rank_is_named_and_job_ends_in_time(tmp_path):
    out, stopped, ended = _launch_hang(tmp_path, "stop")
    assert ended - stopped <= TIMEOUT_S + 30, f"ended {ended - stopped:.1f} s after the stop:\n{out}"
    # the live rank's error and the launcher's summary both name rank 1 and what it was doing
    assert "rank 1 stopped answering" in out and "forward step 2" in out, out
    summary = [line for line in out.splitlines() if line.startswith("flexspeed launch: flexspeed diagnosis")]
    assert summary and "rank 1 stopped answering" in summary[0], out


def test_sleeping_rank_is_named(tmp_path):
    out, stopped, ended = _launch_hang(tmp_path, "sleep")
    assert ended - stopped <= TIMEOUT_S + 30, f"ended {ended - stopped:.1f} s after the stop:\n{out}"
    assert "rank 1 is alive" in out and "did not reach the collective" in out and "forward step 2" in out, out
    summary = [line for line in out.splitlines() if line.startswith("flexspeed launch: flexspeed diagnosis")]
    assert summary and "rank 1 is alive" in summary[0], out


@pytest.mark.parametrize("where, activity", [
    pytest.param("p2p", "pipeline step 2: 1f1b schedule, stage 1 of 2 (forward/backward with p2p send/recv between stages)",
                 marks=pytest.mark.slow),  # the same note mechanism as gradnorm, which stays in the default tier
    ("gradnorm", "step 2: global gradient norm for clipping (all_reduce)")])
def test_rank_stopped_inside_a_collective_is_named_with_it(tmp_path, where, activity):
    """The notes at collective boundaries (pipeline p2p, the gradient-norm all_reduce) name where rank 1 stopped."""
    out, stopped, ended = _launch_hang(tmp_path, where, ACTIVITY_SCRIPT)
    assert ended - stopped <= TIMEOUT_S + 30, f"ended {ended - stopped:.1f} s after the stop:\n{out}"
    assert "rank 1 stopped answering" in out and f"its last activity was {activity!r}" in out, out


# ---- a save that fails on one rank --------------------------------------------------------------------
def _save_fails_on_rank1(rank: int, world: int, root: str) -> str:
    import torch

    import flexspeed
    from flexspeed.runtime import checkpoint, checkpoint_io

    cfg = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "Adam", "params": {"lr": 0.01}},
           "flexspeed_distributed": {"timeout_minutes": 2}}  # a hang would outlast the test's 60 s
    engine, *_ = flexspeed.initialize(model=torch.nn.Linear(4, 2), config=cfg)
    engine.backward(engine(torch.randn(2, 4)).sum())
    engine.step()
    engine.save_checkpoint(root, tag="good")
    real = checkpoint_io.write_atomic

    def full_disk(path: str, data: object) -> None:
        if rank == 1 and "/rng/" in path.replace(os.sep, "/"):
            raise OSError(errno.ENOSPC, "No space left on device", path)
        real(path, data)

    checkpoint.write_atomic = full_disk
    started = time.monotonic()
    try:
        engine.save_checkpoint(root, tag="bad")
    except checkpoint_io.CheckpointError as e:
        return f"{time.monotonic() - started:.1f}|{e}"
    finally:
        checkpoint.write_atomic = real
    return "no error"


def test_save_failing_on_one_rank_fails_all_ranks_fast(tmp_path):
    results = run_ranks(_save_fails_on_rank1, 2, (str(tmp_path),), timeout=60, init_process_group=False)
    for rank, res in enumerate(results):
        seconds, _, message = res.partition("|")
        assert message, f"rank {rank} saved without error"
        assert "rank 1" in message and "No space left on device" in message and "rng" in message, message
        assert float(seconds) < 20, res
    assert (tmp_path / "latest").read_text() == "good"
    assert not (tmp_path / "bad").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".flexspeed-tmp-")]


def _timeouts_in_process(rank: int, world: int, explicit: bool) -> list:
    import torch
    import torch.distributed as dist

    import flexspeed
    from flexspeed.distributed import group_timeout

    def actual() -> float:
        backend = dist.distributed_c10d._get_default_group()._get_backend(torch.device("cpu"))
        return backend.options._timeout.total_seconds()

    out = []
    # without timeout=: the default (DEEPSPEED_TIMEOUT unset here); with it: the argument
    flexspeed.init_distributed(timeout=timedelta(seconds=45) if explicit else None)
    out.append((group_timeout().source, actual()))
    cfg = {"train_batch_size": 2, "flexspeed_distributed": {"timeout_minutes": 0.5}}
    flexspeed.initialize(model=torch.nn.Linear(2, 2), config=cfg)  # the config's key, unless the argument was given
    out.append((group_timeout().source, actual()))
    return out


def test_timeout_applied_to_the_group(monkeypatch):
    monkeypatch.delenv("DEEPSPEED_TIMEOUT", raising=False)
    got = run_ranks(_timeouts_in_process, 2, (False,), timeout=180, init_process_group=False)[0]
    assert got == [("the default, DeepSpeed's 10 minutes", 600.0), ("flexspeed_distributed.timeout_minutes", 30.0)]
    got = run_ranks(_timeouts_in_process, 2, (True,), timeout=180, init_process_group=False)[0]
    assert got == [("init_distributed(timeout=...)", 45.0)] * 2
