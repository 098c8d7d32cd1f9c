"""DeepSpeed's elastic batch-size arithmetic (issue 16, item 3): flexspeed.config.elasticity against
DeepSpeed's own ``compute_elastic_config``, recorded for 1,440 configs x world sizes in
tests/compat/fixtures/elasticity.json (tests/compat/record_elasticity.py), and the triad it sets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flexspeed.config import build_config, validate_config
from flexspeed.config.elasticity import compute_elastic_config
from flexspeed.config.errors import ConfigError

FIXTURE = Path(__file__).resolve().parents[1] / "compat" / "fixtures" / "elasticity.json"
CASES = json.loads(FIXTURE.read_text())["cases"]


def test_fixture_is_broad():
    assert len(CASES) >= 1000 and sum("error" in c for c in CASES) > 50
    assert {c["section"]["version"] for c in CASES} == {0.1, 0.2}


def test_matches_deepspeed_on_every_recorded_case(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("DEEPSPEED_ELASTICITY_CONFIG", raising=False)
    mismatches = []
    for case in CASES:
        try:
            got = list(compute_elastic_config(case["section"], case["world_size"]))
            got[1] = list(got[1])
        except ConfigError as e:
            got = f"error ({e})"
        want = case.get("result", "error")
        if (want == "error") != isinstance(got, str) or (want != "error" and got != want):
            mismatches.append((case, got))
    assert not mismatches, f"{len(mismatches)} of {len(CASES)} differ, e.g. {mismatches[:3]}"


def test_triad_from_elasticity_per_world_size():
    section = {"enabled": True, "max_train_batch_size": 16, "micro_batch_sizes": [2, 4], "min_gpus": 1,
               "max_gpus": 4}
    for world, micro, gas in ((1, 4, 4), (2, 4, 2), (4, 4, 1)):
        cfg = build_config({"elasticity": section}, world_size=world)
        assert (cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps) == \
            (16, micro, gas)


def test_elasticity_errors():
    section = {"enabled": True, "max_train_batch_size": 16, "micro_batch_sizes": [2, 4], "max_gpus": 4}
    with pytest.raises(ConfigError, match="ignore_non_elastic_batch_info"):  # DeepSpeed refuses these too
        build_config({"elasticity": section, "train_batch_size": 16}, world_size=2)
    cfg = build_config({"elasticity": {**section, "ignore_non_elastic_batch_info": True}, "train_batch_size": 8},
                       world_size=2)
    assert cfg.train_batch_size == 16
    with pytest.raises(ConfigError, match="elasticity.max_train_batch_size"):
        build_config({"elasticity": {"enabled": True, "micro_batch_sizes": [2]}}, world_size=1)
    with pytest.raises(ConfigError, match="elasticity"):  # version 0.1: world size 3 cannot run batch 16
        build_config({"elasticity": {**section, "version": 0.1}}, world_size=3)
    for bad in ({"min_gpus": 5, "max_gpus": 4}, {"version": 0.3}, {"model_parallel_size": 2},
                {"micro_batch_sizes": []}, {"micro_batch_sizes": [0]}, {"micro_batch_sizes": [2.5]}):
        with pytest.raises(ConfigError, match="elasticity"):
            build_config({"elasticity": {**section, **bad}}, world_size=1)
    validate_config({"elasticity": {"enabled": False}})  # disabled: accepted, nothing computed


def test_scheduler_environment_must_agree(monkeypatch):
    section = {"enabled": True, "max_train_batch_size": 16, "micro_batch_sizes": [2, 4], "max_gpus": 4}
    monkeypatch.setenv("DEEPSPEED_ELASTICITY_CONFIG", json.dumps({**section, "max_train_batch_size": 32}))
    with pytest.raises(ConfigError, match="DEEPSPEED_ELASTICITY_CONFIG"):
        build_config({"elasticity": section}, world_size=2)
    monkeypatch.setenv("DEEPSPEED_ELASTICITY_CONFIG", json.dumps(section))
    assert build_config({"elasticity": section}, world_size=2).train_batch_size == 16
