"""Automatic resume and retention (issue 16, item 2): a worker SIGKILLed at a random step (or inside a save) under
``flexspeed launch --max-restarts 1``, in a script that never calls load_checkpoint, ends with weights
bit-identical to an uninterrupted run; damaged newest tags fall back to the previous good one; keep_last;
leftovers of killed saves are cleaned. The default suite runs 3 kill trials, the slow tier
(``FLEXSPEED_SLOW=1`` or ``-m slow``) 12."""

from __future__ import annotations

import os
import random
import warnings
from pathlib import Path

import pytest
import torch

from flexspeed.testing import run_cli, run_ranks

SCRIPT = Path(__file__).with_name("_autoresume_script.py")
PIPE_SCRIPT = Path(__file__).with_name("_pipe_autoresume_script.py")
STEPS = 12


def _launch(out: Path, kill_step: int, kill_micro: int, stage: int, async_save: bool, script: Path = SCRIPT,
            nproc: int = 2) -> str:
    out.mkdir(parents=True, exist_ok=True)
    code, text = run_cli("launch", "--max-restarts", "1", "--nproc-per-node", str(nproc), str(script), str(out),
                         str(STEPS), str(kill_step), str(kill_micro), str(stage), "1" if async_save else "0")
    assert code == 0, text
    return text


def _trials(n: int, seed: int, configs: list[tuple[int, bool]]) -> list[tuple[int, int, int, bool]]:
    """``n`` (kill step, micro-step, ZeRO stage, async save) drawn from ``seed``, cycling through ``configs``."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        step, micro = rng.randrange(1, STEPS), rng.randrange(3)  # micro 2: inside the save of that step
        out.append((max(2, step - step % 2) if micro == 2 else step, micro, *configs[i % len(configs)]))
    return out


def _kill_and_compare(tmp_path: Path, trials: list[tuple[int, int, int, bool]], **launch: object) -> None:
    references: dict[tuple[int, bool], dict] = {}
    resumed = 0
    for i, (step, micro, stage, async_save) in enumerate(trials):
        key = (stage, async_save)
        if key not in references:
            _launch(tmp_path / f"ref{stage}{int(async_save)}", -1, 0, stage, async_save, **launch)
            references[key] = torch.load(tmp_path / f"ref{stage}{int(async_save)}" / "final.pt")
        out = tmp_path / f"trial{i}"
        log = _launch(out, step, micro, stage, async_save, **launch)
        assert (out / "attempts.txt").read_text() == "1", f"trial {i}: the worker was not restarted:\n{log}"
        # a resume from the newest committed tag (an asynchronous save still in flight at the kill never commits)
        resumed += "auto_resume: resumed from" in log
        assert "auto_resume: resumed from" in log or "auto_resume: no checkpoint" in log, log
        final = torch.load(out / "final.pt")
        for name, ref in references[key].items():
            assert torch.equal(final[name], ref), (
                f"trial {i} (killed at step {step} micro {micro}, stage {stage}, async {async_save}): {name} differs "
                f"by {(final[name] - ref).abs().max().item()}")
    assert resumed >= max(1, len(trials) // 2), f"only {resumed} of {len(trials)} trials resumed from a checkpoint"


def test_sigkill_at_random_steps_resumes_bit_identically(tmp_path):
    _kill_and_compare(tmp_path, _trials(3, 29, [(1, True)]))  # one reference run, three kills


@pytest.mark.slow
def test_sigkill_many_trials(tmp_path):
    if os.environ.get("FLEXSPEED_SLOW") != "1":
        pytest.skip("12 kill trials: run with FLEXSPEED_SLOW=1 or -m slow")
    _kill_and_compare(tmp_path, _trials(12, 1616, [(s, a) for s in (0, 1, 2, 3) for a in (False, True)]))


def _pipe_trials(n: int, seed: int, configs: list[tuple[int, bool]]) -> list[tuple[int, int, int, bool]]:
    """Pipeline kills: (kill step, mode 0 before the step / 1 inside its save, ZeRO stage, async save)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        mode = rng.randrange(2)
        step = rng.randrange(3, STEPS) if mode == 0 else rng.randrange(2, STEPS, 2)
        out.append((step, mode, *configs[i % len(configs)]))
    return out


@pytest.mark.slow  # the same auto-resume path as the data-parallel kill test above, through a pipeline
def test_pipeline_sigkill_resumes_bit_identically(tmp_path):
    """dp1 x pp2, ZeRO-1, asynchronous saves: killed before a step, resumed from the autosaver's newest tag."""
    _kill_and_compare(tmp_path, [(5, 0, 1, True)], script=PIPE_SCRIPT, nproc=2)


@pytest.mark.slow
def test_pipeline_sigkill_many_trials(tmp_path):
    if os.environ.get("FLEXSPEED_SLOW") != "1":
        pytest.skip("pipeline kill trials: run with FLEXSPEED_SLOW=1 or -m slow")
    configs = [(s, a) for s in (0, 1, 2, 3) for a in (False, True)]
    _kill_and_compare(tmp_path, _pipe_trials(4, 1617, configs), script=PIPE_SCRIPT, nproc=2)
    _kill_and_compare(tmp_path / "dp2", _pipe_trials(4, 1618, configs[::-1]), script=PIPE_SCRIPT, nproc=4)


# ---- resume choices, retention and leftovers (one spawned group) ---------------------------------------
def _engine(root: str, **checkpoint: object):
    import flexspeed

    torch.manual_seed(0)
    cfg = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "Adam", "params": {"lr": 0.01}},
           "steps_per_print": 1000, "checkpoint": {"save_dir": root, **checkpoint}}
    engine, *_ = flexspeed.initialize(model=torch.nn.Linear(4, 2), config=cfg)
    return engine


def _train(engine, steps: int) -> None:
    for _ in range(steps):
        engine.backward(engine(torch.ones(2, 4) * (engine.global_steps + 1)).sum())
        engine.step()


def _resume_cases(rank: int, world: int, root: str) -> dict:
    import torch.distributed as dist

    out = {}
    engine = _engine(root, save_interval=2, keep_last=2, auto_resume=True)
    assert engine.global_steps == 0
    _train(engine, 7)  # saves at 2, 4, 6; keeps 4 and 6
    dist.barrier()
    out["tags"] = sorted(os.listdir(root))
    weights6 = None
    if rank == 0:  # damage the newest tag's tensors; leave leftovers of killed saves
        data = next(p for p in Path(root, "global_step6", "state").iterdir() if p.suffix == ".distcp")
        blob = bytearray(data.read_bytes())
        blob[len(blob) // 2] ^= 0xFF
        data.write_bytes(bytes(blob))
        Path(root, "latest.flexspeed-tmp-12345").write_text("global_step8")
        os.makedirs(Path(root, ".flexspeed-tmp-global_step8-abc", "rng"))
        os.makedirs(Path(root, ".flexspeed-old-global_step4-deadbeef"))
        (Path(root, ".flexspeed-old-global_step4-deadbeef") / "x").write_text("copy")
    dist.barrier()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = _engine(root, save_interval=2, keep_last=2, auto_resume=True)
    out["resumed_step"] = resumed.global_steps
    out["warnings"] = [str(w.message) for w in caught if "auto_resume" in str(w.message)]
    out["after_resume"] = sorted(os.listdir(root))
    ref = _engine(root + "-none", auto_resume=True)  # an empty directory: a fresh start
    out["fresh_step"] = ref.global_steps
    del weights6
    return out


def test_resume_fallback_retention_and_leftovers(tmp_path):
    root = str(tmp_path / "ckpt")
    res = run_ranks(_resume_cases, 2, (root,), timeout=240, init_process_group=False)
    r0 = res[0]
    assert r0["tags"] == ["global_step4", "global_step6", "latest"], r0
    assert r0["resumed_step"] == 4 and res[1]["resumed_step"] == 4
    assert any("'global_step6'" in w and "crc32" in w.lower() for w in r0["warnings"]), r0["warnings"]
    assert any("resumed from 'global_step4'" in w for w in r0["warnings"]), r0["warnings"]
    assert r0["after_resume"] == ["global_step4", "global_step6", "latest"], r0["after_resume"]
    assert r0["fresh_step"] == 0


def test_autosave_config_errors():
    from flexspeed.config import validate_config
    from flexspeed.config.errors import ConfigError

    cases = {"checkpoint.save_interval": {"save_interval": 10}, "checkpoint.auto_resume": {"auto_resume": True},
             "checkpoint.keep_last": {"save_dir": "c", "keep_last": 0}, "checkpoint.save_dir": {"save_dir": " "},
             "checkpoint.async_save": {"save_dir": "c", "async_save": True}}
    for key, section in cases.items():
        with pytest.raises(ConfigError) as e:
            validate_config({"checkpoint": section})
        assert e.value.key == key, (key, str(e.value))
    for bad in (-1, 1.5, "2", True):
        with pytest.raises(ConfigError, match="checkpoint.save_interval"):
            validate_config({"checkpoint": {"save_dir": "c", "save_interval": bad}})


def test_a_later_save_removes_leftovers(tmp_path):
    import torch.distributed as dist

    import flexspeed

    root = tmp_path / "ckpt"
    try:
        engine, *_ = flexspeed.initialize(model=torch.nn.Linear(4, 2), config={
            "train_batch_size": 2, "optimizer": {"type": "SGD", "params": {"lr": 0.1}}})
        engine.save_checkpoint(str(root), tag="a")
        (root / "latest.flexspeed-tmp-4242").write_text("a")  # a killed write_atomic of 'latest'
        os.makedirs(root / ".flexspeed-old-a-0123abcd" / "state")  # a killed re-save of tag 'a' (a is complete)
        os.makedirs(root / ".flexspeed-old-gone-0123abcd" / "state")  # its tag is missing: the copy stays
        os.makedirs(root / ".flexspeed-tmp-b-0123abcd" / "rng")
        engine.save_checkpoint(str(root), tag="b")
        assert sorted(os.listdir(root)) == [".flexspeed-old-gone-0123abcd", "a", "b", "latest"]
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
