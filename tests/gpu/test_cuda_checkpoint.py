"""Checkpoints cross devices: saved on the GPU (ZeRO-3), loaded on the CPU (ZeRO-1) in a process
that cannot see the GPU, trained a step and saved there, then loaded back on the GPU (ZeRO-2).

Each leg compares against the leg before it: weights loaded exactly (atol 0), and one more
optimizer step after loading agrees across devices within the fp32 tier's 1e-5 (the step uses
the loaded Adam moments: without them it would move every weight by ~lr). The CUDA RNG state
saved with a GPU checkpoint is restored by a load on the GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from flexspeed.runtime.checkpoint_io import LATEST, MANIFEST
from tests.distributed._parity import make_dataset, make_model
from tests.distributed.test_zero_parity import full_state, zero_config
from tests.gpu.conftest import DEV, HAS_CUDA

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def engine_for(stage: int):
    import flexspeed

    model = make_model()
    cfg = zero_config(stage=stage, precision="fp32", gas=1, micro=4, world=1)
    engine, _, loader, _ = flexspeed.initialize(model=model, model_parameters=model.parameters(),
                                               training_data=make_dataset(), config=cfg)
    return engine, loader


def one_step(engine, batch) -> float:
    x, y = (t.to(engine.device) for t in batch)
    loss = engine(x, y)
    engine.backward(loss)
    engine.step()
    return loss.item()


def fixed_batch(k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch ``k`` of the dataset, independent of any loader's (restored) position."""
    x, y = make_dataset().tensors
    return x[4 * k:4 * k + 4], y[4 * k:4 * k + 4]


def state_of(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu() for k, v in full_state(engine.module).items()}


def cpu_leg(directory: str) -> None:
    """Run in a process without CUDA: load the GPU's checkpoint at stage 1, step, save."""
    assert not torch.cuda.is_available()
    engine, _ = engine_for(1)
    path, client = engine.load_checkpoint(os.path.join(directory, "gpu"))
    loaded = state_of(engine)
    loss = one_step(engine, fixed_batch(3))
    engine.save_checkpoint(os.path.join(directory, "cpu"), client_state={"from": "cpu"})
    torch.save({"loaded": loaded, "after": state_of(engine), "loss": loss, "steps": engine.global_steps,
                "client": client}, os.path.join(directory, "cpu_leg.pt"))


def test_gpu_to_cpu_to_gpu_round_trip(tmp_path) -> None:
    engine, _ = engine_for(3)
    for k in range(3):
        one_step(engine, fixed_batch(k))
    engine.save_checkpoint(str(tmp_path / "gpu"), client_state={"from": "gpu"})
    saved = state_of(engine)
    gpu_loss = one_step(engine, fixed_batch(3))  # the step the CPU leg takes after loading
    gpu_after = state_of(engine)

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""))
    code = f"from tests.gpu.test_cuda_checkpoint import cpu_leg; cpu_leg({str(tmp_path)!r})"
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-4000:]
    cpu = torch.load(tmp_path / "cpu_leg.pt", weights_only=True)
    assert cpu["client"] == {"from": "gpu"} and cpu["steps"] == 4
    for k, v in saved.items():
        torch.testing.assert_close(cpu["loaded"][k], v, rtol=0, atol=0, msg=f"GPU -> CPU load: {k}")
    assert abs(cpu["loss"] - gpu_loss) < 1e-5
    for k, v in gpu_after.items():
        torch.testing.assert_close(cpu["after"][k], v, rtol=0, atol=1e-5, msg=f"step after load, CPU vs GPU: {k}")

    back, _ = engine_for(2)
    path, client = back.load_checkpoint(str(tmp_path / "cpu"))
    assert client == {"from": "cpu"} and back.global_steps == 4 and back.device.type == DEV.type
    for k, v in cpu["after"].items():
        torch.testing.assert_close(state_of(back)[k], v, rtol=0, atol=0, msg=f"CPU -> GPU load: {k}")
    opt_states = [t for s in back.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.dim()]
    assert opt_states and all(t.device.type == DEV.type for t in opt_states)  # moments moved to the GPU


@pytest.mark.cuda_only
def test_cuda_rng_state_is_saved_and_restored(tmp_path) -> None:
    engine, loader = engine_for(0)
    one_step(engine, next(iter(loader)))
    torch.cuda.manual_seed(1234)
    engine.save_checkpoint(str(tmp_path))
    want = torch.rand(4, device="cuda")
    torch.rand(100, device="cuda")  # move the generator on
    engine.load_checkpoint(str(tmp_path))
    got = torch.rand(4, device="cuda")
    assert torch.equal(got, want)
    with open(tmp_path / LATEST) as f:
        tag = f.read().strip()
    with open(tmp_path / tag / MANIFEST) as f:
        assert json.load(f)["world_size"] == 1
    assert HAS_CUDA
