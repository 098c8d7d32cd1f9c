"""flexspeed's schedulers, driven through ``flexspeed.initialize``, against DeepSpeed 0.19.8's record.

The fixture was written by ``record_schedulers.py`` from DeepSpeed's own engine; every case in it
(its config, client optimizer, accumulation, resume and overflow plan) is replayed here through
flexspeed's engine, with the same model and optimizer code, and each optimizer step's lr and
betas/momentum must equal DeepSpeed's (relative 1e-12). DeepSpeed is not needed to run this.
Resume cases go through flexspeed's own ``save_checkpoint``/``load_checkpoint``. Overflow cases
use real fp16 overflows (an infinite loss at the planned steps), where DeepSpeed's record had
to simulate them (it refuses fp16 on CPU).
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

import flexspeed
from flexspeed.config.errors import ConfigError
from tests.compat.ds_reference import deepspeed_warmup_lr
from tests.compat.record_schedulers import ds_config, make_model, make_optimizer, snapshot

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "ds_0.19.8_schedulers.json"
RECORD = json.loads(FIXTURE.read_text())
CASES = {case["name"]: case for case in RECORD["cases"]}
SCHEDULER_TYPES = ("WarmupLR", "WarmupDecayLR", "WarmupCosineLR", "OneCycle", "LRRangeTest")


@pytest.fixture(autouse=True)
def _no_group_leak():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def _config(case: dict, params: dict | None = None) -> dict:
    cfg = ds_config(case, params)
    if case["overflow_steps"]:  # a small static start so only the planned steps overflow
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 4, "loss_scale_window": 1000}
    return cfg


def _engine(case: dict, params: dict | None = None) -> tuple[Any, list[dict]]:
    """flexspeed's engine for ``case`` and the list its optimizer steps are recorded into."""
    model = make_model()
    opt = make_optimizer(model, case["optimizer"])
    records: list[dict] = []
    opt.register_step_pre_hook(lambda o, args, kwargs: records.append(snapshot(o)))
    engine, _, _, _ = flexspeed.initialize(model=model, optimizer=opt, config=_config(case, params))
    return engine, records


def _train(engine: Any, records: list[dict], case: dict, boundaries: int) -> None:
    """``boundaries`` optimizer steps; a planned overflow step gets an infinite loss and is recorded
    with the values the optimizer held when it was skipped."""
    x = torch.linspace(-1.0, 1.0, 8).reshape(2, 4)
    for _ in range(boundaries):
        overflow = len(records) + 1 in case["overflow_steps"]
        held = snapshot(engine.optimizer, skipped=True)
        skipped_before = engine.skipped_steps
        for _ in range(engine.gradient_accumulation_steps()):
            loss = engine(x).float().pow(2).mean()
            engine.backward(loss * float("inf") if overflow else loss)
            engine.step()
        assert (engine.skipped_steps != skipped_before) == overflow, "overflow plan not followed"
        if overflow:
            records.append(held)


def _resume(case: dict, engine: Any, records: list[dict], tmp_path: Path) -> list[dict]:
    spec = case["resume"]
    state = copy.deepcopy(engine.lr_scheduler.state_dict())
    if spec["how"] != "scheduler_state_dict":
        engine.save_checkpoint(str(tmp_path), tag="k")
    engine2, records2 = _engine(case, spec.get("params"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if spec["how"] == "scheduler_state_dict":
            engine2.lr_scheduler.load_state_dict(state)
        else:
            engine2.load_checkpoint(str(tmp_path), tag="k", load_optimizer_states=spec["how"] == "checkpoint",
                                    load_lr_scheduler_states=True)
    # torch.distributed.checkpoint creates missing optimizer state with one zero-lr step() while
    # loading; that is not a training step (DeepSpeed's loader has none), so it is not recorded.
    records2.clear()
    changed = [str(w.message) for w in caught if "hyperparameters differ" in str(w.message)]
    if spec.get("params"):
        assert len(changed) == 1, changed
        for key in spec["params"]:
            assert key in changed[0]
    else:
        assert changed == []
    _train(engine2, records2, case, case["steps"] - spec["at"])
    return records + records2


def _flat(values: list) -> list[float]:
    return [v for item in values for v in (item if isinstance(item, list) else [item])]


def _assert_same(got: list[dict], want: list[dict]) -> None:
    assert len(got) == len(want)
    for k, (g, w) in enumerate(zip(got, want), start=1):
        assert g.keys() == w.keys(), f"step {k}"
        assert g["skipped"] == w["skipped"], f"step {k}"
        for key in ("lr", "betas", "momentum"):
            if key in w:
                assert _flat(g[key]) == pytest.approx(_flat(w[key]), rel=1e-12, abs=0.0), \
                    f"step {k} {key}: flexspeed {g} vs DeepSpeed {w}"


def test_fixture_covers_every_scheduler_and_feature():
    assert RECORD["deepspeed_version"] == "0.19.8"
    cases = RECORD["cases"]
    assert {c["scheduler"]["type"] for c in cases} == set(SCHEDULER_TYPES)
    params = {k for c in cases for k in c["scheduler"]["params"]}
    assert params >= {"warmup_type", "warmup_min_ratio", "cos_min_ratio", "cycle_momentum", "cycle_first_stair_count",
                      "cycle_second_stair_count", "cycle_second_step_size", "decay_lr_rate", "decay_mom_rate",
                      "decay_step_size", "lr_range_test_staircase", "last_batch_iteration"}
    assert any(c["gradient_accumulation_steps"] > 1 for c in cases)
    assert {c["resume"]["how"] for c in cases if c["resume"]} == {
        "checkpoint", "checkpoint_without_optimizer", "scheduler_state_dict"}
    assert any(c["overflow_steps"] for c in cases) and any(c["optimizer"]["group_lrs"] for c in cases)


@pytest.mark.filterwarnings("ignore:flexspeed. OneCycle")
@pytest.mark.filterwarnings("ignore:flexspeed. Warmup")
@pytest.mark.parametrize("name", list(CASES))
def test_schedule_equals_deepspeed(name, tmp_path):
    case = CASES[name]
    engine, records = _engine(case)
    _train(engine, records, case, case["resume"]["at"] if case["resume"] else case["steps"])
    if case["resume"]:
        records = _resume(case, engine, records, tmp_path)
    _assert_same(records, case["record"])


def test_warmup_cosine_opt_out_of_the_zero_first_step():
    case = copy.deepcopy(CASES["cosine_linear_ratios"])
    engine, records = _engine(case, {"flexspeed_zero_lr_first_step": False})
    _train(engine, records, case, case["steps"])
    want = case["record"]
    assert want[0]["lr"] == [0.0] and records[0]["lr"] == pytest.approx(want[1]["lr"], rel=1e-12)
    _assert_same(records[1:], want[1:])


def test_misspelt_opt_out_is_rejected():
    case = CASES["cosine_defaults"]
    with pytest.raises(ConfigError, match="Did you mean 'flexspeed_zero_lr_first_step'") as err:
        _engine(case, {"flexspeed_zero_lr_first_step_": False})
    assert err.value.key == "scheduler.params.flexspeed_zero_lr_first_step_"
    with pytest.raises(ConfigError, match="true or false"):
        _engine(case, {"flexspeed_zero_lr_first_step": "no"})


def test_onecycle_warns_about_what_deepspeed_changes_silently():
    with pytest.warns(UserWarning, match="beta2"):
        _engine(CASES["onecycle_default_momentum"])
    with pytest.warns(UserWarning, match="SGD has none"):
        _engine(CASES["onecycle_sgd_momentum"])


def test_reference_warmup_function_is_deepspeed():
    """The function parity loops take their lr from equals DeepSpeed's record (fresh WarmupLR runs)."""
    checked = 0
    for case in RECORD["cases"]:
        params = dict(case["scheduler"]["params"])
        if (case["scheduler"]["type"] != "WarmupLR" or case["resume"] or case["overflow_steps"]
                or "last_batch_iteration" in params or case["optimizer"]["group_lrs"]):
            continue
        params.setdefault("warmup_max_lr", case["optimizer"]["lr"])
        want = [r["lr"][0] for r in case["record"]]
        got = [deepspeed_warmup_lr(k, **params) for k in range(1, len(want) + 1)]
        assert got == pytest.approx(want, rel=1e-12, abs=0.0), case["name"]
        checked += 1
    assert checked >= 6
