"""The demo's pieces without processes: the addition task's encoding and split, the config it
runs with (and that examples/ds_config_demo.json is the same config), and the help texts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from flexspeed.cli.demo import prepare_config
from flexspeed.cli.main import SUBCOMMANDS, main
from flexspeed.config import build_config
from flexspeed.demo.task import DEMO_CONFIG, EQUALS, PLUS, AdditionTask

ROOT = Path(__file__).resolve().parents[2]


def test_encoding_reverses_the_answer():
    task = AdditionTask(digits=2)
    assert task.prompt(7, 45) == [0, 7, PLUS, 4, 5, EQUALS]
    assert task.answer(7, 45) == [2, 5, 0]  # 052 written ones digit first
    assert task.decode_answer([2, 5, 0]) == 52 and task.decode_answer([2, PLUS, 0]) is None
    assert (task.prompt_len, task.answer_len, task.seq_len) == (6, 3, 8)


def test_examples_mask_the_prompt():
    task = AdditionTask(digits=2)
    data = task.train_data()
    x, y = data[0]
    a, b = task.operands(int(data.qids[0]))
    assert x.tolist() == task.prompt(a, b) + task.answer(a, b)[:-1]
    assert y[:5].tolist() == [-100] * 5 and y[5:].tolist() == task.answer(a, b)


def test_held_out_questions_never_train():
    task = AdditionTask(digits=2, seed=3)
    held = set(task.held_out_ids().tolist())
    train = set(task.train_data().qids.tolist())
    assert len(held) == 500 and not held & train and len(held | train) == 10_000
    assert torch.equal(task.held_out_ids(), AdditionTask(digits=2, seed=3).held_out_ids())  # seeded
    assert AdditionTask(digits=1).num_held_out == 20  # at most a fifth of the 100 questions
    with pytest.raises(ValueError, match="digits=9"):
        AdditionTask(digits=9)


def test_example_config_is_the_builtin_one():
    with open(ROOT / "examples" / "ds_config_demo.json") as f:
        assert json.load(f) == DEMO_CONFIG


def test_prepare_config(tmp_path):
    cfg = prepare_config(DEMO_CONFIG, steps=50, out_dir=str(tmp_path))
    assert cfg["scheduler"]["params"]["total_num_steps"] == 50
    assert cfg["scheduler"]["params"]["warmup_num_steps"] == 5
    assert cfg["csv_monitor"] == {"enabled": True, "output_path": str(tmp_path / "monitor"), "job_name": "addition"}
    assert DEMO_CONFIG["scheduler"]["params"]["total_num_steps"] == 600  # the original is untouched
    resolved = build_config(config=cfg, world_size=2)
    assert (resolved.train_batch_size, resolved.zero_optimization.stage, resolved.precision) == (128, 2, "bf16")


def test_demo_rejects_bad_numbers(capsys):
    assert main(["demo", "--steps", "0"]) == 2
    assert "--steps 0 must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["launch", "demo", "plot"])
def test_help_reads_well(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and f"flexspeed {name}" in out
    assert name in SUBCOMMANDS


def test_top_level_help_lists_the_commands(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    for name in ("launch", "demo", "plot"):
        assert f"    {name}" in out
