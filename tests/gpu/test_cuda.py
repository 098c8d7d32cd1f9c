"""Training on one GPU with NCCL: ZeRO stages 0-3 x {fp32, bf16, fp16} x accumulation {1, 2},
CPU offload of optimizer and parameters, and a pipeline, against a plain PyTorch reference on the
same GPU (same seed, data and batches).

Tolerances are the CPU tier's (``tests/distributed/test_zero_parity.py``, which explains them):
fp32 losses and weights within 1e-5 absolute (TF32 is off, see ``conftest.py``); bf16 / fp16 losses
within 5e-4 / 2e-4 of a reference under the same autocast, weights within 10% of the reference's
own update; stage 1 within 1e-4 of stage 0 in loss (stage 3 gathers 16-bit weights as DeepSpeed does,
so it is held to the reference tolerance, as in the CPU tier).

    .venv/bin/python -m pytest tests/gpu -v
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

from tests.distributed._parity import global_batches, make_dataset, make_model
from tests.distributed.test_zero_parity import (LOSS_TOL, STAGE_LOSS_TOL_16BIT, UPDATE_REL_TOL_16BIT,
                                                WEIGHT_TOL_FP32, full_state, zero_config)
from tests.gpu.conftest import DEV, HAS_CUDA

STEPS, LR, CLIP = 4, 1e-3, 0.5
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def train(stage: int, precision: str, gas: int, micro: int = 4, **zero) -> dict:
    """``flexspeed.initialize`` on this GPU (world size 1); losses per step and the final weights."""
    import flexspeed

    model = make_model()
    cfg = zero_config(stage=stage, precision=precision, gas=gas, micro=micro, world=1, **zero)
    engine, _, loader, _ = flexspeed.initialize(model=model, model_parameters=model.parameters(),
                                               training_data=make_dataset(), config=cfg)
    assert engine.device.type == DEV.type
    losses, acc, it = [], 0.0, iter(loader)
    for _ in range(STEPS * gas):
        x, y = (t.to(engine.device) for t in next(it))  # as with DeepSpeed, the script moves its batch
        loss = engine(x, y)
        engine.backward(loss)
        acc += loss.item() / gas
        engine.step()
        if engine.micro_steps % gas == 0:
            losses.append(acc)
            acc = 0.0
    assert engine.global_steps == STEPS and engine.skipped_steps == 0
    state = {k: v.float().cpu() for k, v in full_state(engine.module).items()}
    return {"losses": losses, "state": state, "engine": engine}


def reference(precision: str, gas: int, micro: int = 4) -> tuple[list[float], dict]:
    """Plain PyTorch on the same device: AdamW on the whole batch per step, clipping, same autocast."""
    model = make_model().to(DEV)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    losses = []
    dtype = DTYPES[precision]
    for xs, ys in global_batches(make_dataset(), world=1, micro=micro, gas=gas, steps=STEPS):
        with torch.autocast(DEV.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(xs.to(DEV), ys.to(DEV))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses, {k: v.detach().float().cpu() for k, v in model.state_dict().items()}


def update_rel(state: dict, ref_state: dict) -> float:
    w0 = make_model().state_dict()
    num = sum(float((state[k] - v).double().norm() ** 2) for k, v in ref_state.items())
    den = sum(float((v - w0[k]).double().norm() ** 2) for k, v in ref_state.items())
    return (num / den) ** 0.5


def check(got: dict, ref: tuple[list[float], dict], precision: str, what: str) -> None:
    ref_losses, ref_state = ref
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref_losses), rtol=0,
                               atol=LOSS_TOL[precision], msg=lambda m: f"{what} losses: {m}")
    if precision == "fp32":
        for k, v in ref_state.items():
            torch.testing.assert_close(got["state"][k], v, rtol=0, atol=WEIGHT_TOL_FP32, msg=lambda m, k=k: f"{what} {k}: {m}")
    else:
        assert update_rel(got["state"], ref_state) < UPDATE_REL_TOL_16BIT, what


@pytest.mark.parametrize("precision", list(DTYPES))
def test_stages_and_accumulation_match_plain_pytorch(precision: str) -> None:
    """Stages 0-3 x accumulation 1 and 2 (clipping on) against the reference under the same precision."""
    for gas in (1, 2):
        ref = reference(precision, gas)
        stage0 = None
        for stage in (0, 1, 2, 3):
            got = train(stage, precision, gas)
            check(got, ref, precision, f"stage {stage} {precision} gas {gas}")
            if precision != "fp32":
                if stage0 is None:
                    stage0 = got["losses"]
                tol = STAGE_LOSS_TOL_16BIT if stage == 1 else LOSS_TOL[precision]  # as test_zero_parity.py
                torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(stage0), rtol=0, atol=tol)


@pytest.mark.cuda_only
def test_process_group_uses_nccl_for_cuda_tensors() -> None:
    train(0, "fp32", 1)
    assert "nccl" in str(dist.get_backend()), dist.get_backend()


@pytest.mark.cuda_only
def test_fp16_overflow_skips_the_step_and_halves_the_scale() -> None:
    """An inf in the gradients on the GPU: the step is skipped, the scale halves, the weights stay."""
    import flexspeed

    model = make_model()
    cfg = zero_config(stage=2, precision="fp16", gas=1, micro=4, world=1)
    cfg["fp16"].update(hysteresis=1)
    engine, _, loader, _ = flexspeed.initialize(model=model, model_parameters=model.parameters(),
                                               training_data=make_dataset(), config=cfg)
    x, y = (t.to(engine.device) for t in next(iter(loader)))
    before = {k: v.clone() for k, v in full_state(engine.module).items()}
    scale = engine.loss_scale
    loss = engine(x, y)
    engine.backward(loss * float("inf"))
    engine.step()
    assert engine.skipped_steps == 1 and engine.global_steps == 1
    for k, v in full_state(engine.module).items():
        assert torch.equal(v, before[k]), k
    assert engine.loss_scale == scale / 2
    loss = engine(x, y)  # and the next step trains
    engine.backward(loss)
    engine.step()
    assert engine.skipped_steps == 1 and engine.global_steps == 2


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("stage,zero", [(2, {"offload_optimizer": {"device": "cpu"}}),
                                        (3, {"offload_optimizer": {"device": "cpu", "pin_memory": True},
                                             "offload_param": {"device": "cpu", "pin_memory": True}})])
def test_cpu_offload_matches_plain_pytorch(stage: int, zero: dict, precision: str) -> None:
    """FSDP2's CPUOffloadPolicy: optimizer state (and at stage 3 the parameter shards) in host memory."""
    got = train(stage, precision, 2, **zero)
    check(got, reference(precision, 2), precision, f"offload stage {stage} {precision}")
    if HAS_CUDA:  # every sharded parameter and its Adam moments live in host memory; at stage 3 the
        # persistent parameters (under stage3_param_persistence_threshold, kept whole) stay on the device
        engine = got["engine"]
        sharded = [p for p in engine.module.parameters() if hasattr(p, "to_local")]
        assert sharded and all(p.to_local().device.type == "cpu" for p in sharded)
        moments = [t for p in sharded for t in engine.optimizer.state[p].values() if torch.is_tensor(t) and t.dim()]
        assert moments and all(t.to_local().device.type == "cpu" for t in moments)


def test_pipeline_engine_on_the_gpu(monkeypatch) -> None:
    """A one-stage PipelineModule (world size 1) through 1F1B on the GPU, against the CPU reference."""
    from tests.distributed import test_pipeline as tp

    monkeypatch.setenv("WORLD_SIZE", "1")
    got = tp.run_case("mlp", "1f1b", 1, 1)
    losses, states = tp.reference("mlp", [1] * tp.STEPS)
    got["state"] = {k: v.float().cpu() for k, v in got["state"].items()}
    tp.assert_matches(got, losses, states[-1], atol=1e-5, what="pipeline on " + DEV.type)
    assert os.environ["WORLD_SIZE"] == "1"
