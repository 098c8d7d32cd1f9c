"""DeepSpeed names added for Accelerate's dynamo path and Lightning's checkpoint utilities: ``engine.compile``,
``deepspeed.utils.zero_to_fp32.get_model_state_file``/``get_optim_files`` (through Lightning's own
``convert_zero_checkpoint_to_fp32_state_dict``), ``deepspeed.runtime.base_optimizer.DeepSpeedOptimizer`` and
``deepspeed.utils.groups``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import flexspeed

ROOT = Path(__file__).resolve().parents[2]
CFG = {"train_batch_size": 2, "steps_per_print": float("inf"), "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}}


def _engine(seed: int = 0, stage: int = 0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
    engine, *_ = flexspeed.initialize(model=model, config={**CFG, "zero_optimization": {"stage": stage}})
    return engine


@pytest.mark.parametrize("stage", [0, 3])
def test_engine_compile_trains_like_eager(stage):
    x, y = torch.randn(2, 4, generator=torch.Generator().manual_seed(1)), torch.randn(2, 2)
    losses = []
    for compiled in (False, True):
        engine = _engine(stage=stage)
        if compiled:
            engine.compile(backend="eager", compile_kwargs={"backend": "ignored", "fullgraph": False})
            assert engine.is_compiled and engine.module._compiled_call_impl is not None
            engine.compile(backend="eager")  # a second call is a no-op, as DeepSpeed's
        else:
            assert not engine.is_compiled
        run = []
        for _ in range(3):
            loss = torch.nn.functional.mse_loss(engine(x), y)
            engine.backward(loss)
            engine.step()
            run.append(loss.item())
        losses.append(run)
    assert losses[0] == pytest.approx(losses[1], abs=1e-6)
    assert losses[0][0] != losses[0][-1]  # it trained


def test_engine_compile_refuses_what_it_cannot_do():
    engine = _engine()
    with pytest.raises(ValueError, match=r"engine.compile\(schedule=\[\(0, \[\]\)\]\).*Fix"):
        engine.compile(schedule=[(0, [])])
    with pytest.raises(ValueError, match=r"compiled_autograd_enabled=True\).*Fix: leave compiled_autograd_enabled"):
        engine.compile(compiled_autograd_enabled=True)
    with pytest.raises(TypeError, match="compile_kwargs"):
        engine.compile(compile_kwargs=["x"])
    assert not engine.is_compiled


def test_model_state_and_optim_files_on_flexspeed_layout(tmp_path):
    from flexspeed.runtime.checkpoint_io import safe_torch_load
    from flexspeed.utils.zero_to_fp32 import get_model_state_file, get_optim_files

    engine = _engine()
    engine.save_checkpoint(str(tmp_path), tag="t1", client_state={"epoch": 3})
    tag = tmp_path / "t1"
    model_file = get_model_state_file(tag, 0)
    assert Path(model_file).name == "client_state.pt" and safe_torch_load(model_file)["epoch"] == 3
    [optim] = get_optim_files(tag)
    assert safe_torch_load(optim)["optimizer_state_dict"]["zero_stage"] == engine.zero_optimization_stage()
    with pytest.raises(FileNotFoundError, match="doesn't exist"):
        get_optim_files(tmp_path / "nope")
    with pytest.raises(ValueError, match="zero_stage"):
        get_model_state_file(tag, 4)
    os.replace(tag / "client_state.pt", tag / "client_moved.pt")
    os.symlink(tag / "client_moved.pt", tag / "client_state.pt")
    with pytest.raises(Exception, match="symbolic link"):
        get_model_state_file(tag, 0)

LIGHTNING = textwrap.dedent('''
    import json, sys, torch, torch.distributed as dist
    import deepspeed
    from deepspeed.runtime.base_optimizer import DeepSpeedOptimizer
    from deepspeed.utils import groups
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict
    out_dir = sys.argv[1]
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    engine, opt, *_ = deepspeed.initialize(model=model, config={"train_batch_size": 1, "steps_per_print": 1e9,
        "zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}})
    engine.backward(engine(torch.ones(1, 3)).sum()); engine.step()
    engine.save_checkpoint(out_dir, client_state={"epoch": 7, "state_dict": None})
    state = convert_zero_checkpoint_to_fp32_state_dict(out_dir, out_dir + "/lightning.pt")
    whole = {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}
    res = {"epoch": state["epoch"], "keys": sorted(state["state_dict"]),
           "equal": all(torch.equal(state["state_dict"][k], whole[k].full_tensor() if hasattr(whole[k], "full_tensor")
                                    else whole[k]) for k in whole),
           "optimizer_isinstance": isinstance(opt, (torch.optim.Optimizer, DeepSpeedOptimizer)),
           "dp": [groups._get_data_parallel_world_size(), groups._get_data_parallel_rank(),
                  groups._get_sequence_parallel_world_size(), groups._get_sequence_parallel_rank(),
                  groups._get_sequence_data_parallel_world_size(), groups._get_model_parallel_world_size()]}
    try:
        groups._get_sequence_parallel_group()
    except KeyError as e:
        res["sp_group"] = str(e)
    print("RESULT" + json.dumps(res))
''')


def test_lightning_convert_and_groups_under_identity(tmp_path):
    script = tmp_path / "conv.py"
    script.write_text(LIGHTNING)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("FLEXSPEED_AS_DEEPSPEED", None)
    proc = subprocess.run([sys.executable, "-m", "flexspeed.as_deepspeed", str(script), str(tmp_path / "ck")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads([x for x in proc.stdout.splitlines() if x.startswith("RESULT")][-1][len("RESULT"):])
    assert res["epoch"] == 7 and res["keys"] == ["bias", "weight"] and res["equal"]
    assert res["optimizer_isinstance"]
    assert res["dp"] == [1, 0, 1, 0, 1, 1]
    assert "sequence parallel" in res["sp_group"] and "Fix" in res["sp_group"]


def test_save_after_destroy_is_refused(tmp_path):
    """destroy() releases the optimizer state (Accelerate's teardown): a later save would not resume, so it says so."""
    engine = _engine()
    engine.backward(engine(torch.ones(2, 4)).sum())
    engine.step()
    engine.destroy()
    with pytest.raises(RuntimeError, match="after engine.destroy"):
        engine.save_checkpoint(str(tmp_path))
    assert not any(tmp_path.iterdir())
