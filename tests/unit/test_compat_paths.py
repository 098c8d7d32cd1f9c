"""The module paths DeepSpeed scripts import, each with DeepSpeed's behaviour, in one process:
``flexspeed.utils`` (RepeatingLoader, logging, safe_get/set_full_*), ``utils.zero_to_fp32``,
``accelerator``, ``runtime.lr_schedules``, ``ops.adam``, ``runtime.pipe.topology``,
``runtime.utils`` and ``runtime.config.DeepSpeedConfigError``. (tests/distributed/test_compat_paths.py
covers the collectives: ZeRO-1/2/3 on 2 ranks.)"""

from __future__ import annotations

import argparse
import json
import logging
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.tensor import DTensor

import flexspeed
from flexspeed.config.errors import ConfigError


@pytest.fixture(autouse=True)
def _no_group_leak():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))


def _cfg(stage: int = 0, **over) -> dict:
    return {"train_micro_batch_size_per_gpu": 4, "steps_per_print": 1000,
            "optimizer": {"type": "AdamW", "params": {"lr": 0.01}},
            "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0}, **over}


def _batch() -> torch.Tensor:
    return torch.randn(4, 6, generator=torch.Generator().manual_seed(1))


# ---- flexspeed.utils ------------------------------------------------------------------------------------
def test_repeating_loader_restarts():
    from flexspeed.utils import RepeatingLoader

    loader = RepeatingLoader([1, 2, 3])
    assert [next(loader) for _ in range(7)] == [1, 2, 3, 1, 2, 3, 1] and iter(loader) is loader


def test_log_dist_rank_rule(caplog):
    from flexspeed.utils import log_dist, logger

    assert logger is flexspeed.logger and logger.name == "flexspeed"
    with caplog.at_level(logging.INFO, logger="flexspeed"):
        log_dist("no group", ranks=[3])  # without a process group every rank logs
        flexspeed.init_distributed()
        log_dist("rank zero", ranks=[0])
        log_dist("every rank", ranks=[-1])
        log_dist("nobody", ranks=None)
        log_dist("other rank", ranks=[1], level=logging.WARNING)
    assert "[Rank -1] no group" in caplog.text and "[Rank 0] rank zero" in caplog.text
    assert "[Rank 0] every rank" in caplog.text
    assert "nobody" not in caplog.text and "other rank" not in caplog.text


@pytest.mark.parametrize("stage", [0, 3])
def test_safe_get_and_set_full(stage):
    """Stage 3 in one process makes the parameters, gradients and Adam moments DTensor shards of a
    one-rank mesh: the getters must return plain full tensors equal to stage 0's."""
    from flexspeed.utils import (safe_get_full_fp32_param, safe_get_full_grad, safe_get_full_optimizer_state,
                                 safe_get_local_fp32_param, safe_set_full_fp32_param, safe_set_full_grad,
                                 safe_set_full_optimizer_state)

    ref = _model()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=0.01, weight_decay=0.0)
    ref(_batch()).pow(2).mean().backward()
    ref_grads = [p.grad.clone() for p in ref.parameters()]
    engine, opt, *_ = flexspeed.initialize(model=_model(), config=_cfg(stage))
    params = list(engine.module.parameters())
    assert all(isinstance(p, DTensor) for p in params) == (stage == 3)
    assert all(safe_get_full_optimizer_state(p, "exp_avg") is None for p in params), "no state before a step"
    engine.backward(engine(_batch()).pow(2).mean())
    for p, g in zip(params, ref_grads):
        full = safe_get_full_grad(p)
        assert type(full) is torch.Tensor and full.shape == g.shape
        torch.testing.assert_close(full, g, rtol=1e-6, atol=1e-7)  # one rank: same fp32 sums
    safe_set_full_grad(params[0], torch.zeros_like(ref_grads[0]))
    assert torch.count_nonzero(safe_get_full_grad(params[0])) == 0
    engine.step()
    next(ref.parameters()).grad.zero_()  # the same edit, made on the reference
    ref_opt.step()
    for p, r in zip(params, ref.parameters()):
        torch.testing.assert_close(safe_get_full_fp32_param(p), r.detach(), rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(safe_get_full_optimizer_state(p, "exp_avg"), ref_opt.state[r]["exp_avg"],
                                   rtol=1e-6, atol=1e-7)
    assert safe_get_local_fp32_param(params[0]).numel() == params[0].numel()  # one rank holds it all
    new = torch.full_like(ref_grads[1], 0.5)
    safe_set_full_fp32_param(params[1], new)
    safe_set_full_optimizer_state(params[1], new * 2, "exp_avg_sq")
    assert torch.equal(safe_get_full_fp32_param(params[1]), new)
    assert torch.equal(safe_get_full_optimizer_state(params[1], "exp_avg_sq"), new * 2)
    with pytest.raises(ValueError, match="shape"):
        safe_set_full_fp32_param(params[1], torch.zeros(2))
    assert safe_get_full_optimizer_state(nn.Parameter(torch.zeros(2)), "exp_avg") is None, "not an engine's"


# ---- flexspeed.utils.zero_to_fp32 --------------------------------------------------------------------------
def _saved_checkpoint(tmp_path, stage: int) -> tuple[str, dict[str, torch.Tensor]]:
    model = _model()
    model[0].bias.requires_grad_(False)  # a frozen parameter
    engine, *_ = flexspeed.initialize(model=model, config=_cfg(stage))
    engine.backward(engine(_batch()).pow(2).mean())
    engine.step()
    ckpt = str(tmp_path / "ckpt")
    engine.save_checkpoint(ckpt)
    from flexspeed.utils import safe_get_full_fp32_param

    expect = {n: safe_get_full_fp32_param(p) for n, p in engine.module.named_parameters()}
    dist.destroy_process_group()
    return ckpt, expect


@pytest.mark.parametrize("stage", [0, 3])
def test_zero_to_fp32_state_dict(tmp_path, stage):
    from flexspeed.utils.zero_to_fp32 import (get_fp32_state_dict_from_zero_checkpoint,
                                              load_state_dict_from_zero_checkpoint)

    ckpt, expect = _saved_checkpoint(tmp_path, stage)
    state = get_fp32_state_dict_from_zero_checkpoint(ckpt)
    assert set(state) == set(expect)
    for name, tensor in expect.items():
        assert state[name].dtype == torch.float32 and torch.equal(state[name], tensor), name
    lazy = get_fp32_state_dict_from_zero_checkpoint(ckpt, tag="global_step1", lazy_mode=True)
    assert torch.equal(lazy["0.weight"].contiguous(), expect["0.weight"])
    trainable = get_fp32_state_dict_from_zero_checkpoint(ckpt, exclude_frozen_parameters=True)
    assert set(trainable) == set(expect) - {"0.bias"}
    model = load_state_dict_from_zero_checkpoint(_model(), ckpt)
    assert torch.equal(model[2].weight, expect["2.weight"])


def test_zero_to_fp32_convert_sharded_and_cli(tmp_path):
    from safetensors.torch import load_file

    from flexspeed.utils.zero_to_fp32 import convert_zero_checkpoint_to_fp32_state_dict, main

    ckpt, expect = _saved_checkpoint(tmp_path, 0)
    out = tmp_path / "out"
    convert_zero_checkpoint_to_fp32_state_dict(ckpt, out, max_shard_size=200, safe_serialization=True)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    loaded = {k: v for f in files for k, v in load_file(str(out / f)).items()}
    assert set(loaded) == set(expect) and all(torch.equal(loaded[k], expect[k]) for k in expect)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in expect.values())
    assert main([ckpt, str(tmp_path / "cli"), "--dtype", "bfloat16"]) == 0
    one = torch.load(tmp_path / "cli" / "pytorch_model.bin", weights_only=True)
    assert one["0.weight"].dtype == torch.bfloat16 and set(one) == set(expect)


# ---- flexspeed.accelerator ------------------------------------------------------------------------------
def test_accelerator_cpu(monkeypatch):
    import flexspeed.accelerator as acc_mod
    from flexspeed.accelerator import CpuAccelerator, get_accelerator, set_accelerator

    acc = get_accelerator()
    assert acc is flexspeed.get_accelerator() and isinstance(acc, CpuAccelerator)
    assert (acc.device_name(), acc.current_device_name(), acc.communication_backend_name()) == ("cpu", "cpu", "gloo")
    assert acc.is_available() and acc.is_bf16_supported() and acc.device_count() >= 1
    assert torch.float32 in acc.supported_dtypes() and torch.bfloat16 in acc.supported_dtypes()
    t = acc.FloatTensor([1.0, 2.0])
    assert t.dtype == torch.float32 and acc.on_accelerator(t) and acc.pin_memory(t) is t
    acc.manual_seed(5)
    state = acc.get_rng_state()
    a = torch.rand(3)
    acc.set_rng_state(state)
    assert torch.equal(torch.rand(3), a)
    acc.reset_peak_memory_stats()
    before = acc.max_memory_allocated()
    big = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    assert acc.max_memory_allocated() >= before + 32 * 2**20 and acc.memory_allocated() > 0
    del big
    assert acc.total_memory() > acc.available_memory() > 0
    acc.synchronize()
    acc.empty_cache()
    with pytest.raises(ValueError, match=r"create_op_builder\(class_name='FusedAdamBuilder'\).*native ops.*Fix"):
        acc.create_op_builder("FusedAdamBuilder")
    with pytest.raises(ValueError, match=r"class_name='CPUAdamBuilder'"):
        acc.get_op_builder("CPUAdamBuilder")
    with pytest.raises(TypeError):
        set_accelerator(object())
    monkeypatch.setattr(acc_mod, "_current", None)
    monkeypatch.setenv("DS_ACCELERATOR", "xpu")
    with pytest.raises(ValueError, match="DS_ACCELERATOR='xpu'"):
        get_accelerator()


# ---- flexspeed.runtime.lr_schedules -------------------------------------------------------------------
def test_lr_schedules_module():
    from flexspeed.runtime import lr_schedules, schedulers

    assert lr_schedules.WarmupLR is schedulers.WarmupLR and lr_schedules.OneCycle is schedulers.OneCycle
    assert lr_schedules.VALID_LR_SCHEDULES == ["LRRangeTest", "OneCycle", "WarmupLR", "WarmupDecayLR",
                                               "WarmupCosineLR"]
    parser = lr_schedules.add_tuning_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--lr_schedule", "WarmupLR", "--warmup_num_steps", "5", "--warmup_max_lr", "0.1"])
    section, err = lr_schedules.get_config_from_args(args)
    assert err is None and section == {"type": "WarmupLR", "params": {
        "warmup_min_lr": 0, "warmup_max_lr": 0.1, "warmup_num_steps": 5, "warmup_type": "log"}}
    assert lr_schedules.get_lr_from_config(section) == (0.1, "")
    opt = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=1.0)
    assert schedulers.build_scheduler(section["type"], section["params"], opt).get_last_lr() == [0.0]
    defaults = parser.parse_args([])
    assert (defaults.cycle_min_lr, defaults.warmup_type, defaults.cycle_momentum) == (0.01, "log", False)
    assert lr_schedules.get_config_from_args(defaults) == (None, "--lr_schedule not specified on command line")


# ---- flexspeed.ops.adam ----------------------------------------------------------------------------------
def _trajectory(make_opt, steps: int = 3) -> list[torch.Tensor]:
    model = _model()
    opt = make_opt(model.parameters())
    for _ in range(steps):
        opt.zero_grad()
        model(_batch()).pow(2).mean().backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("cls,mode_kw", [("FusedAdam", "adam_w_mode"), ("DeepSpeedCPUAdam", "adamw_mode")])
def test_ops_adam_modes(cls, mode_kw):
    from flexspeed.ops import adam

    klass = getattr(adam, cls)
    for mode, reference in ((True, torch.optim.AdamW), (False, torch.optim.Adam)):
        got = _trajectory(lambda ps: klass(ps, lr=0.01, weight_decay=0.1, **{mode_kw: mode}))
        want = _trajectory(lambda ps: reference(ps, lr=0.01, weight_decay=0.1))
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="AMSGrad"):
        klass(_model().parameters(), amsgrad=True)
    with pytest.raises(ValueError, match="bias_correction"):
        klass(_model().parameters(), bias_correction=False)


def test_ops_adam_signatures_and_zero():
    from flexspeed.ops.adam import DeepSpeedCPUAdam, FusedAdam

    opt = FusedAdam(_model().parameters(), 1e-3, True, (0.8, 0.9), 1e-6, False, 0.01, False, False)
    assert opt.defaults["betas"] == (0.8, 0.9) and not opt.adam_w_mode and not opt.set_grad_none
    p = opt.param_groups[0]["params"][0]
    p.grad = torch.ones_like(p)
    opt.zero_grad()
    assert p.grad is not None and torch.count_nonzero(p.grad) == 0, "set_grad_none=False zeroes in place"
    with pytest.raises(ValueError, match="fp32_optimizer_states"):
        DeepSpeedCPUAdam(_model().to(torch.bfloat16).parameters())
    model = _model()
    engine, used, *_ = flexspeed.initialize(model=model, optimizer=FusedAdam(model.parameters(), lr=0.01),
                                            config={**_cfg(1), "optimizer": None})
    assert isinstance(used, FusedAdam), "the sharded stages drive DeepSpeed's Adam classes"


# ---- pipe topology, runtime.utils, DeepSpeedConfigError ------------------------------------------------
def test_runtime_pipe_topology_reexports():
    import flexspeed.pipe.topology as impl
    from flexspeed.runtime.pipe import LayerSpec, PipelineModule
    from flexspeed.runtime.pipe.topology import PipeDataParallelTopology, PipeTopology

    assert PipeTopology is impl.PipeTopology and PipeDataParallelTopology is impl.PipeDataParallelTopology
    assert PipelineModule is flexspeed.pipe.PipelineModule is flexspeed.PipelineModule
    assert LayerSpec is flexspeed.pipe.LayerSpec
    topo = PipeDataParallelTopology(num_pp=2, num_dp=3)
    assert (topo.get_dim("pipe"), topo.get_dim("data"), topo.world_size) == (2, 3, 6)


def test_runtime_utils():
    from flexspeed.runtime import utils

    a, b = _model(), _model()
    for m in (a, b):
        m(_batch()).pow(2).sum().backward()
    want = torch.nn.utils.clip_grad_norm_(b.parameters(), 0.5)
    got = utils.clip_grad_norm_(a.parameters(), 0.5)
    torch.testing.assert_close(got, want)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    assert utils.get_grad_norm(a.parameters()) == pytest.approx(0.5, rel=1e-4)
    weights = torch.cat([p.detach().reshape(-1) for p in a.parameters()])
    assert utils.get_weight_norm(a.parameters()) == pytest.approx(float(weights.norm()), rel=1e-6)
    assert utils.get_global_norm([3.0, 4.0]) == 5.0 and utils.get_global_norm([1.0, float("nan")]) == float("inf")
    with pytest.raises(ValueError, match="mpu"):
        utils.get_grad_norm(a.parameters(), mpu=object())
    assert utils.partition_uniform(10, 3) == [0, 4, 7, 10] and utils.partition_uniform(2, 4) == [0, 1, 2, 2, 2]
    assert utils.prefix_sum_inc([3, 4, 5]) == [3, 7, 12]
    assert utils.call_to_str("f", 1, x="y") == "f(1, x='y')"
    utils.set_random_seed(3)
    first = torch.rand(2)
    utils.set_random_seed(3)
    assert torch.equal(torch.rand(2), first)
    moved = utils.move_to_device({"a": [torch.ones(1)], "b": 2}, "cpu")
    assert torch.equal(moved["a"][0], torch.ones(1)) and moved["b"] == 2
    utils.ensure_directory_exists(os.path.join("/tmp", "flexspeed-test-dir", "file"))
    assert os.path.isdir("/tmp/flexspeed-test-dir")


def test_deepspeed_config_error_catches_flexspeed_errors():
    from flexspeed.runtime.config import DeepSpeedConfigError

    assert DeepSpeedConfigError is ConfigError is flexspeed.DeepSpeedConfigError
    with pytest.raises(DeepSpeedConfigError, match="optimizer.type"):
        flexspeed.initialize(model=_model(), config={**_cfg(), "optimizer": {"type": "Adamm"}})
