"""Port of DeepSpeed's ``tests/unit/runtime/half_precision/test_dynamic_loss_scale.py``.

Cases: TestFused.test_no_overflow / test_all_overflow / test_some_overflow (Adam), TestUnfused.test_no_overflow /
test_all_overflow / test_some_overflow (Lamb, with min_loss_scale).

Plumbing: world 1, in this process; DeepSpeed skips the file on its CPU accelerator (no fp16 there),
flexspeed runs fp16 on a CPU, so the cases run. Gradients are set by hand and ``engine.step()`` called,
as DeepSpeed's ``run_model_step`` does. DeepSpeed reads the scaler from its fp16 optimizer wrapper
(``optim.loss_scale_config``); flexspeed's optimizer is torch's and the engine holds the scaler
(``engine.loss_scaler``, the same ``cur_scale`` / ``cur_iter`` / ``scale_window`` / ``min_scale`` fields,
``dynamic`` for ``dynamic_loss_scale``): the assertions read it there.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import flexspeed as deepspeed
from tests.compat._ds_common import SimpleModel, destroy_group


@pytest.fixture(autouse=True)
def _clean_group():
    yield
    destroy_group()


def run_model_step(model, gradient_list):
    for value in gradient_list:
        for p in model.parameters():
            p.grad = torch.empty_like(p, dtype=p.dtype)
            p.grad.fill_(value)
        model.step()


def _engine(optimizer_type, initial_scale_power, **fp16_extra):
    config_dict = {"train_batch_size": 1, "steps_per_print": 1,
                   "optimizer": {"type": optimizer_type, "params": {"lr": 0.00015}},
                   "fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": initial_scale_power,
                            "loss_scale_window": 2, **fp16_extra}}
    model = SimpleModel(1)
    model, _, _, _ = deepspeed.initialize(config=config_dict, model=model, model_parameters=model.parameters())
    return model, model.loss_scaler


def _no_overflow(optimizer_type):
    model, scaler = _engine(optimizer_type, 8)
    expected_loss_scale, expected_scale_window = 2**8, 2
    # Ensure the dynamic loss scaler is correctly configured.
    assert scaler.dynamic is True
    assert scaler.cur_scale == expected_loss_scale
    assert scaler.scale_window == expected_scale_window
    for i, value in enumerate(np.random.uniform(-0.1, 0.1, 10)):
        run_model_step(model, [value])
        assert scaler.cur_scale == expected_loss_scale
        assert scaler.cur_iter == (i + 1)
        if scaler.cur_iter % expected_scale_window == 0:
            expected_loss_scale *= 2


def _all_overflow(optimizer_type, min_loss_scale=None):
    extra = {} if min_loss_scale is None else {"min_loss_scale": min_loss_scale}
    model, scaler = _engine(optimizer_type, 4, **extra)
    expected_loss_scale = 2**4
    floor = 1 if min_loss_scale is None else min_loss_scale
    assert scaler.dynamic is True
    assert scaler.cur_scale == expected_loss_scale
    if min_loss_scale is not None:
        assert scaler.min_scale == min_loss_scale
    overflow_gradients = [float("inf"), float("-inf")] + [float("nan")] * 6
    for i, value in enumerate(overflow_gradients):
        run_model_step(model, [value])
        expected_loss_scale = max(expected_loss_scale / 2, floor)
        assert scaler.cur_scale == expected_loss_scale
        assert scaler.cur_iter == (i + 1)


def _some_overflow(optimizer_type):
    model, scaler = _engine(optimizer_type, 8)
    expected_loss_scale, expected_scale_window, expected_iteration = 2**8, 2, 0
    assert scaler.dynamic is True
    assert scaler.cur_scale == expected_loss_scale
    assert scaler.scale_window == expected_scale_window
    # Run model with overflows to decrease scale
    overflow_gradients = [float("inf"), float("nan")]
    expected_iteration += len(overflow_gradients)
    run_model_step(model, overflow_gradients)
    expected_loss_scale /= 2 ** len(overflow_gradients)
    assert scaler.cur_scale == expected_loss_scale
    assert scaler.cur_iter == expected_iteration
    # Run model scale_window + 1 times to increase scale once
    normal_gradients = np.random.uniform(-0.1, 0.1, expected_scale_window + 1)
    expected_iteration += len(normal_gradients)
    run_model_step(model, normal_gradients)
    expected_loss_scale *= 2
    assert scaler.cur_scale == expected_loss_scale
    assert scaler.cur_iter == expected_iteration
    # Run model with overflows to decrease scale
    overflow_gradients = [float("inf")]
    expected_iteration += len(overflow_gradients)
    run_model_step(model, overflow_gradients)
    expected_loss_scale /= 2 ** len(overflow_gradients)
    assert scaler.cur_scale == expected_loss_scale
    assert scaler.cur_iter == expected_iteration


class TestFused:
    def test_no_overflow(self):
        _no_overflow("Adam")

    def test_all_overflow(self):
        _all_overflow("Adam")

    def test_some_overflow(self):
        _some_overflow("Adam")


class TestUnfused:
    def test_no_overflow(self):
        _no_overflow("Lamb")

    def test_all_overflow(self):
        _all_overflow("Lamb", min_loss_scale=2.0)

    def test_some_overflow(self):
        _some_overflow("Lamb")
