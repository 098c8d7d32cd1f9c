"""Port of DeepSpeed's ``tests/unit/runtime/half_precision/test_zero_optim_overflow.py``.

Cases: TestZeROFloat16.test_no_overflow / test_all_overflow / test_some_overflow and TestZeROBFloat16.
test_no_overflow / test_detect_grad_overflow / test_ignore_grad_overflow, each for ZeRO stage 1, 2 x
optimizer offload off/on.

Plumbing: 2 ranks in the session's spawned group. DeepSpeed skips the fp16 class on its CPU
accelerator; flexspeed runs fp16 on a CPU, so it runs here. ``offload_optimizer`` to "cpu" on a
CPU-only run has no effect (flexspeed says so once). DeepSpeed reads the loss scaler on its ZeRO
optimizer wrapper (``optim.loss_scaler``, ``optim.dynamic_loss_scale``); flexspeed's engine holds it
(``engine.loss_scaler``, ``engine.dynamic_loss_scale()``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flexspeed as deepspeed
from flexspeed.utils import safe_set_full_grad
from tests.compat._ds_common import SimpleModel, random_dataloader
from tests.compat._ranks import expect, rank_case


def has_inf_or_nan(x):
    float_x = x.float()
    return float_x.isnan().logical_or(float_x.isinf()).float().max()


def run_model_step(model, x_sample, y_label, grad_value):
    loss = model(x_sample, y_label)
    model.backward(loss)
    for p in model.parameters():
        grad = torch.empty_like(p, dtype=p.dtype)
        grad.fill_(grad_value)
        safe_set_full_grad(p, grad)
    model.step()


def _config(zero_stage, offload_optimizer, precision):
    config_dict = {"train_micro_batch_size_per_gpu": 1, "steps_per_print": 1,
                   "optimizer": {"type": "Adam", "params": {"lr": 0.00015}}, "zero_optimization": {"stage": zero_stage}}
    config_dict.update(precision)
    if offload_optimizer:
        config_dict["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
    return config_dict


def _engine(config_dict):
    model = SimpleModel(10)
    model, _, _, _ = deepspeed.initialize(config=config_dict, model=model, model_parameters=model.parameters())
    return model


def _loader(model, n, dtype):
    return random_dataloader(model=model, total_samples=n, hidden_dim=10, device=model.device, dtype=dtype)


def fp16_no_overflow(tmpdir, zero_stage, offload_optimizer):
    model = _engine(_config(zero_stage, offload_optimizer, {"fp16": {
        "enabled": True, "loss_scale": 0, "initial_scale_power": 8, "loss_scale_window": 2}}))
    expected_loss_scale, expected_scale_window = 2**8, 2
    loss_scaler = model.loss_scaler
    assert model.dynamic_loss_scale() is True
    assert loss_scaler.cur_scale == expected_loss_scale
    assert loss_scaler.scale_window == expected_scale_window
    grad_values = np.random.uniform(-0.1, 0.1, 10)
    for i, (batch, grad_value) in enumerate(zip(_loader(model, 10, torch.float16), grad_values)):
        run_model_step(model, batch[0], batch[1], grad_value)
        assert loss_scaler.cur_scale == expected_loss_scale
        assert loss_scaler.cur_iter == (i + 1)
        if loss_scaler.cur_iter % expected_scale_window == 0:
            expected_loss_scale *= 2


def fp16_all_overflow(tmpdir, zero_stage, offload_optimizer):
    overflow_gradients = [float("inf"), float("-inf")] + [float("nan")] * 6
    initial_scale_power = len(overflow_gradients)
    model = _engine(_config(zero_stage, offload_optimizer, {"fp16": {
        "enabled": True, "loss_scale": 0, "initial_scale_power": initial_scale_power, "loss_scale_window": 2,
        "hysteresis": 1}}))
    expected_loss_scale = 2**initial_scale_power
    loss_scaler = model.loss_scaler
    assert model.dynamic_loss_scale() is True
    assert loss_scaler.cur_scale == expected_loss_scale
    assert loss_scaler.scale_window == 2
    for i, (batch, grad_value) in enumerate(zip(_loader(model, len(overflow_gradients), torch.float16),
                                                overflow_gradients)):
        run_model_step(model, batch[0], batch[1], grad_value)
        expected_loss_scale = max(expected_loss_scale / 2, 1)
        assert loss_scaler.cur_scale == expected_loss_scale
        assert loss_scaler.cur_iter == (i + 1)


def fp16_some_overflow(tmpdir, zero_stage, offload_optimizer):
    model = _engine(_config(zero_stage, offload_optimizer, {"fp16": {
        "enabled": True, "loss_scale": 0, "initial_scale_power": 8, "loss_scale_window": 2, "hysteresis": 1}}))
    expected_loss_scale, expected_scale_window, expected_iteration = 2**8, 2, 0
    loss_scaler = model.loss_scaler
    assert model.dynamic_loss_scale() is True
    assert loss_scaler.cur_scale == expected_loss_scale
    assert loss_scaler.scale_window == expected_scale_window
    for gradients, change in (([float("inf"), float("nan")], 0.25),
                              (list(np.random.uniform(-0.1, 0.1, expected_scale_window + 1)), 2),
                              ([float("inf")], 0.5)):
        # overflows decrease the scale; scale_window + 1 clean steps increase it once
        expected_iteration += len(gradients)
        for batch, grad_value in zip(_loader(model, len(gradients), torch.float16), gradients):
            run_model_step(model, batch[0], batch[1], grad_value)
        expected_loss_scale *= change
        assert loss_scaler.cur_scale == expected_loss_scale
        assert loss_scaler.cur_iter == expected_iteration


def bf16_no_overflow(tmpdir, zero_stage, offload_optimizer):
    model = _engine(_config(zero_stage, offload_optimizer, {"bf16": {"enabled": True}}))
    grad_values = np.random.uniform(-0.1, 0.1, 10)
    for batch, grad_value in zip(_loader(model, 10, torch.bfloat16), grad_values):
        run_model_step(model, batch[0], batch[1], grad_value)
    assert model.skipped_steps == 0
    assert all([not has_inf_or_nan(p) for p in model.parameters()])


OVERFLOWS = [float("inf"), float("-inf")] + [float("nan")] * 6


def bf16_detect_grad_overflow(tmpdir, zero_stage, offload_optimizer):
    model = _engine(_config(zero_stage, offload_optimizer, {"bf16": {"enabled": True, "check_grad_overflow": True}}))
    for i, (batch, grad_value) in enumerate(zip(_loader(model, len(OVERFLOWS), torch.bfloat16), OVERFLOWS)):
        run_model_step(model, batch[0], batch[1], grad_value)
        assert model.skipped_steps == (i + 1)
    assert all([not has_inf_or_nan(p) for p in model.parameters()])


def bf16_ignore_grad_overflow(tmpdir, zero_stage, offload_optimizer):
    # flexspeed's non-finite guard skips such steps by default (docs/training.md); "off" is DeepSpeed's behaviour,
    # which this DeepSpeed test asserts (the weights turn inf/NaN)
    model = _engine(_config(zero_stage, offload_optimizer, {"bf16": {"enabled": True, "check_grad_overflow": False},
                                                            "flexspeed_nonfinite": {"action": "off"}}))
    for batch, grad_value in zip(_loader(model, len(OVERFLOWS), torch.bfloat16), OVERFLOWS):
        run_model_step(model, batch[0], batch[1], grad_value)
    assert model.skipped_steps == 0
    with deepspeed.zero.GatheredParameters(list(model.parameters())) as full:  # whole tensors at stage 2
        assert all([has_inf_or_nan(p) for p in full])


PARAMS = [(s, o) for o in (False, True) for s in (1, 2)]
CASES = {"TestZeROFloat16.test_no_overflow": fp16_no_overflow, "TestZeROFloat16.test_all_overflow": fp16_all_overflow,
         "TestZeROFloat16.test_some_overflow": fp16_some_overflow, "TestZeROBFloat16.test_no_overflow": bf16_no_overflow,
         "TestZeROBFloat16.test_detect_grad_overflow": bf16_detect_grad_overflow,
         "TestZeROBFloat16.test_ignore_grad_overflow": bf16_ignore_grad_overflow}
for _name, _fn in CASES.items():
    for _s, _o in PARAMS:
        rank_case(__name__, f"{_name}[{_s}-{_o}]", _fn, zero_stage=_s, offload_optimizer=_o)


def _check(ranks2, name, zero_stage, offload_optimizer):
    expect(ranks2, __name__, f"{name}[{zero_stage}-{offload_optimizer}]")


@pytest.mark.parametrize("zero_stage, offload_optimizer", PARAMS)
class TestZeROFloat16:
    def test_no_overflow(self, ranks2, zero_stage, offload_optimizer):
        _check(ranks2, "TestZeROFloat16.test_no_overflow", zero_stage, offload_optimizer)

    def test_all_overflow(self, ranks2, zero_stage, offload_optimizer):
        _check(ranks2, "TestZeROFloat16.test_all_overflow", zero_stage, offload_optimizer)

    def test_some_overflow(self, ranks2, zero_stage, offload_optimizer):
        _check(ranks2, "TestZeROFloat16.test_some_overflow", zero_stage, offload_optimizer)


@pytest.mark.parametrize("zero_stage, offload_optimizer", PARAMS)
class TestZeROBFloat16:
    def test_no_overflow(self, ranks2, zero_stage, offload_optimizer):
        _check(ranks2, "TestZeROBFloat16.test_no_overflow", zero_stage, offload_optimizer)

    def test_detect_grad_overflow(self, ranks2, zero_stage, offload_optimizer):
        _check(ranks2, "TestZeROBFloat16.test_detect_grad_overflow", zero_stage, offload_optimizer)

    def test_ignore_grad_overflow(self, ranks2, zero_stage, offload_optimizer):
        _check(ranks2, "TestZeROBFloat16.test_ignore_grad_overflow", zero_stage, offload_optimizer)
