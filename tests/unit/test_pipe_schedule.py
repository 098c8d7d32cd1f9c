"""The order of actions each schedule runs per rank, checked in one process (no communication).

``execution_order`` drives torch's real schedule objects with recording stand-in stages, so
these tests pin what ``train_batch`` does, not a description of it.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from torch.distributed.pipelining import ScheduleGPipe, ScheduleInterleaved1F1B

from flexspeed.config.errors import ConfigError
from flexspeed.pipe.schedule import bubble_fraction, execution_order, format_order, validate_schedule


def _parse(action: str) -> tuple[int, str, int]:
    stage, rest = action.split("F") if "F" in action else action.split("B")
    return int(stage), "F" if "F" in action else "B", int(rest)


def _check_complete(order: dict[int, list[str]], pp: int, m: int, v: int) -> None:
    """Every rank runs F and B exactly once per local stage and micro-batch, F before its B."""
    for rank, actions in order.items():
        stages = {rank + k * pp for k in range(v)}
        expected = {f"{s}{kind}{i}" for s in stages for kind in "FB" for i in range(m)}
        assert sorted(actions) == sorted(expected), rank
        for s in stages:
            for i in range(m):
                assert actions.index(f"{s}F{i}") < actions.index(f"{s}B{i}")


def _max_in_flight(actions: list[str]) -> int:
    alive = peak = 0
    for a in actions:
        alive += 1 if "F" in a else -1
        peak = max(peak, alive)
    return peak


@pytest.mark.parametrize("pp,m", [(2, 4), (4, 8), (4, 4)])
def test_1f1b_warms_up_then_alternates(pp, m):
    order = execution_order("1f1b", pp, m)
    _check_complete(order, pp, m, 1)
    for rank, actions in order.items():
        warmup = min(m, pp - rank)
        assert all("F" in a for a in actions[:warmup]) and "B" in actions[warmup]
        assert _max_in_flight(actions) == warmup  # activations alive: pp - rank, not m
        steady = actions[warmup:warmup + 2 * (m - warmup)]
        assert [a[len(str(rank))] for a in steady] == ["B", "F"] * (m - warmup)


def test_1f1b_two_stages_exact():
    order = execution_order("1f1b", 2, 4)
    assert order[0] == ["0F0", "0F1", "0B0", "0F2", "0B1", "0F3", "0B2", "0B3"]
    assert order[1] == ["1F0", "1B0", "1F1", "1B1", "1F2", "1B2", "1F3", "1B3"]


@pytest.mark.parametrize("pp,m", [(2, 4), (4, 2)])
def test_gpipe_fills_then_drains(pp, m):
    order = execution_order("gpipe", pp, m)
    _check_complete(order, pp, m, 1)
    for rank, actions in order.items():
        assert actions == [f"{rank}F{i}" for i in range(m)] + [f"{rank}B{i}" for i in range(m)]
        assert _max_in_flight(actions) == m


@pytest.mark.parametrize("pp,m,v", [(2, 4, 2), (4, 8, 2), (2, 4, 3)])
def test_interleaved_runs_every_chunk_depth_first(pp, m, v):
    order = execution_order("interleaved_1f1b", pp, m, v)
    _check_complete(order, pp, m, v)
    for rank, actions in order.items():
        # forwards go chunk by chunk in rounds of pp micro-batches (depth first)
        fwd = [_parse(a) for a in actions if "F" in a]
        assert [s for s, _, _ in fwd[:pp]] == [rank] * pp
        assert fwd[pp][0] == rank + pp
        assert _max_in_flight(actions) < v * m  # not GPipe: backwards start before all forwards


def _compute_ir(schedule) -> dict[int, list[str]]:
    return {r: [str(a) for a in acts if a is not None and ("F" in str(a) or "B" in str(a))
                and "REDUCE" not in str(a)] for r, acts in schedule.pipeline_order.items()}


def test_execution_matches_torch_pipeline_order_ir():
    """For GPipe and interleaved 1F1B, torch's ``pipeline_order`` IR lists what actually runs."""
    stage = SimpleNamespace(num_stages=2, group_size=2, group_rank=0, stage_index=0)
    assert _compute_ir(ScheduleGPipe(stage, 4)) == execution_order("gpipe", 2, 4)
    stages = [SimpleNamespace(num_stages=4, group_size=2, group_rank=0, stage_index=s) for s in (0, 2)]
    assert _compute_ir(ScheduleInterleaved1F1B(stages, 4)) == execution_order("interleaved_1f1b", 2, 4, 2)


def test_format_order_is_a_grid():
    text = format_order(execution_order("gpipe", 2, 2))
    lines = text.splitlines()
    assert "rank 0" in lines[0] and "rank 1" in lines[0]
    assert lines[1].split() == ["0", "0F0", "1F0"] and len(lines) == 5


def test_bubble_fraction():
    assert bubble_fraction(2, 4) == pytest.approx(1 / 5)
    assert bubble_fraction(4, 8) == pytest.approx(3 / 11)
    assert bubble_fraction(4, 8, 2) == pytest.approx(3 / 19)
    assert bubble_fraction(1, 8) == 0


def test_validation_errors_name_the_key_value_and_fix():
    with pytest.raises(ConfigError, match=r"\[gradient_accumulation_steps\].*=2 < 4 stages.*'gpipe'"):
        validate_schedule("1f1b", 4, 1, 2)
    with pytest.raises(ConfigError, match=r"\[pipeline.schedule\].*'1fb1'.*Did you mean '1f1b'"):
        validate_schedule("1fb1", 2, 1, 4)
    with pytest.raises(ConfigError, match=r"\[pipeline.virtual_stages\].*interleaved_1f1b"):
        validate_schedule("gpipe", 2, 2, 4)
    with pytest.raises(ConfigError, match=r"\[gradient_accumulation_steps\].*not a multiple of its 2 rounds"):
        validate_schedule("interleaved_1f1b", 2, 2, 5)
    validate_schedule("gpipe", 4, 1, 1)  # GPipe runs with fewer micro-batches than stages
