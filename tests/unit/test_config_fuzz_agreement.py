"""Config fuzzing (issue 16, item 4): mutated configs through check-config and initialize() raise only
ConfigErrors, never hang, and the two agree (benchmarks/config_fuzz.py). The default suite runs 60 seeded
configs; FLEXSPEED_SLOW=1 (or -m slow) runs 2,000."""

from __future__ import annotations

import importlib.util
import os
import random
import warnings
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location(
    "config_fuzz", Path(__file__).resolve().parents[2] / "benchmarks" / "config_fuzz.py")
fuzz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)


def _run(n: int, seed: int, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # relative save_dir / output paths of the configs land here
    rng = random.Random(seed)
    valid = fuzz._load_valid()
    findings, statuses = [], []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(n):
            cfg = fuzz.mutate(rng.choice(valid), rng)
            problem, status = fuzz.one(cfg, str(tmp_path))
            statuses.append(status)
            if problem:
                findings.append((i, problem, cfg))
    assert not findings, findings[:5]
    assert statuses.count("ok") >= n // 50, "the mutations should leave some configs valid"


def test_fuzz_sample(tmp_path, monkeypatch):
    _run(60, 16, tmp_path, monkeypatch)


@pytest.mark.slow
def test_fuzz_2000(tmp_path, monkeypatch):
    if os.environ.get("FLEXSPEED_SLOW") != "1":
        pytest.skip("2,000 configs: run with FLEXSPEED_SLOW=1 or -m slow")
    _run(2000, 0, tmp_path, monkeypatch)
