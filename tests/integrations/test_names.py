"""Under ``--as-deepspeed``, every name docs/integrations.md lists as provided resolves (engine names on a real
engine), the refused ones fail with the option and the fix, and the DeepSpeed features these libraries ask
for that flexspeed cannot do fail at start naming the option."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "integrations.md"


def table_rows() -> list[tuple[str, str]]:
    """(name, status) of each row of the name table."""
    rows = []
    for line in DOC.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0].startswith("`deepspeed"):
            rows.append((cells[0].strip("`"), cells[2]))
    return rows


def test_table_is_complete():
    rows = table_rows()
    assert len(rows) >= 40
    names = {n for n, _ in rows}
    for must in ("deepspeed.DeepSpeedEngine.set_gradient_accumulation_boundary", "deepspeed.zero.Init",
                 "deepspeed.checkpoint.utils.clone_tensors_for_torch_save", "deepspeed.ops.adam.DeepSpeedCPUAdam",
                 "deepspeed.runtime.lr_schedules.VALID_LR_SCHEDULES", "deepspeed.accelerator.get_accelerator"):
        assert must in names
    assert {s for _, s in rows} <= {"provided", "refused", "missing"}


WALK = textwrap.dedent('''
    import importlib, json, sys, torch
    import deepspeed
    rows = json.loads(sys.argv[1])
    model = torch.nn.Linear(4, 4)
    engine, *_ = deepspeed.initialize(model=model, config={"train_batch_size": 1, "steps_per_print": float("inf"),
                                                           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})

    def resolve(name):
        parts = name.split(".")
        if parts[:2] == ["deepspeed", "DeepSpeedEngine"] and len(parts) == 3:
            assert isinstance(engine, deepspeed.DeepSpeedEngine)
            return getattr(engine, parts[2])
        for cut in range(len(parts), 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            for attr in parts[cut:]:
                obj = getattr(obj, attr)
            return obj
        raise ImportError(name)

    out = {"missing": [], "refused": {}}
    for name, status in rows:
        if status == "provided":
            try:
                resolve(name)
            except Exception as e:
                out["missing"].append(f"{name}: {type(e).__name__}: {e}")
        elif status == "refused":
            try:
                parent, _, leaf = name.rpartition(".")
                holder = importlib.import_module(parent)
                # a function: calling it is what fails; a module: importing it is
                obj = getattr(holder, leaf) if hasattr(holder, leaf) else importlib.import_module(name)
                obj(model, 2, torch.float32) if callable(obj) else None
                out["refused"][name] = "no error"
            except Exception as e:
                out["refused"][name] = f"{type(e).__name__}: {e}"
    from flexspeed.config.errors import ConfigError
    try:
        deepspeed.initialize(model=torch.nn.Linear(2, 2), config={"train_batch_size": 1, "zero_optimization": {
            "stage": 3, "offload_param": {"device": "nvme"}}})
    except ConfigError as e:
        out["nvme"] = str(e)
    cfg = engine.config
    out["dict_like"] = [cfg.get("zero_optimization", {}).get("stage"), "optimizer" in cfg, "scheduler" in cfg,
                        cfg["optimizer"]["type"], cfg.get("no_such_key", "dflt")]
    print("RESULT" + json.dumps(out))
''')


def _run_walk(tmp_path) -> dict:
    script = tmp_path / "walk.py"
    script.write_text(WALK)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("FLEXSPEED_AS_DEEPSPEED", None)
    proc = subprocess.run([sys.executable, "-m", "flexspeed.as_deepspeed", str(script), json.dumps(table_rows())],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads([x for x in proc.stdout.splitlines() if x.startswith("RESULT")][-1][len("RESULT"):])


def test_provided_names_resolve_and_refused_ones_say_the_fix(tmp_path):
    out = _run_walk(tmp_path)
    assert out["missing"] == []
    tp = out["refused"]["deepspeed.tp_model_init"]
    assert tp.startswith("ConfigError: [tensor_parallel.autotp_size] tensor_parallel.autotp_size=") and "Fix" in tp
    sp = out["refused"]["deepspeed.runtime.sequence_parallel.ulysses_sp"]
    assert sp.startswith("ModuleNotFoundError") and "--as-deepspeed" in sp and "Fix" in sp
    assert "offload_param.device" in out["nvme"] and "Fix" in out["nvme"]
    assert out["dict_like"] == [0, True, False, "AdamW", "dflt"]
