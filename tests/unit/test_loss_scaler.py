"""``LossScaler``: DeepSpeed's fp16 loss-scale semantics (static; dynamic with hysteresis, window,
consecutive hysteresis and a floor)."""

from __future__ import annotations

import pytest
import torch

from flexspeed.runtime.precision import LossScaler


def _run(scaler: LossScaler, overflows: list[bool]) -> list[float]:
    """The scale after each step."""
    out = []
    for overflow in overflows:
        scaler.update_scale(overflow)
        out.append(scaler.loss_scale)
    return out


def test_static_scale_never_moves():
    s = LossScaler(loss_scale=128.0)
    assert not s.dynamic and s.loss_scale == 128.0
    assert float(s.scale(torch.tensor(0.5))) == 64.0
    assert _run(s, [True, False, True, False]) == [128.0] * 4


def test_dynamic_starts_at_two_to_the_initial_power():
    assert LossScaler().loss_scale == 2.0**16
    s = LossScaler(initial_scale_power=5)
    assert s.dynamic and s.loss_scale == 32.0
    assert float(s.scale(torch.tensor(1.0))) == 32.0


def test_hysteresis_delays_the_first_cut():
    s = LossScaler(initial_scale_power=10, hysteresis=2, loss_scale_window=1000)
    # first overflow spends the hysteresis; each later one halves (not refilled without consecutive mode)
    assert _run(s, [True, True, True]) == [1024.0, 512.0, 256.0]


def test_hysteresis_of_one_halves_at_once():
    s = LossScaler(initial_scale_power=10, hysteresis=1)
    assert _run(s, [True, True]) == [512.0, 256.0]


def test_consecutive_hysteresis_refills_on_a_clean_step():
    refill = LossScaler(initial_scale_power=10, hysteresis=2, consecutive_hysteresis=True, loss_scale_window=1000)
    assert _run(refill, [True, False, True, False, True, True]) == [1024.0] * 5 + [512.0]
    plain = LossScaler(initial_scale_power=10, hysteresis=2, consecutive_hysteresis=False, loss_scale_window=1000)
    assert _run(plain, [True, False, True]) == [1024.0, 1024.0, 512.0]


# The sequences below are DeepSpeed 0.19.8's DynamicLossScaler's, run on the same inputs
# (deepspeed.runtime.fp16.loss_scaler, DS_BUILD_OPS=0, CPU): the scale doubles at the step after
# loss_scale_window clean steps since the last overflow.
def test_window_doubles_after_that_many_clean_steps():
    s = LossScaler(initial_scale_power=4, loss_scale_window=3)
    assert _run(s, [False] * 7) == [16.0, 16.0, 16.0, 32.0, 32.0, 32.0, 64.0]
    # an overflow restarts the count: after 3 clean steps following it, the scale doubles again
    s = LossScaler(initial_scale_power=4, loss_scale_window=3, hysteresis=1)
    assert _run(s, [True, False, False, False, False]) == [8.0, 8.0, 8.0, 8.0, 16.0]


def test_window_growth_refills_hysteresis():
    s = LossScaler(initial_scale_power=4, loss_scale_window=2, hysteresis=2)
    # overflow spends hysteresis (no cut); two clean steps are not yet a window since the overflow,
    # so the next overflow halves
    assert _run(s, [True, False, False, True]) == [16.0, 16.0, 16.0, 8.0]
    assert s.cur_hysteresis == 1
    s = LossScaler(initial_scale_power=4, loss_scale_window=2, hysteresis=2)
    # three clean steps grow the scale and refill the hysteresis: the next overflow only spends it
    assert _run(s, [True, False, False, False, True]) == [16.0, 16.0, 16.0, 32.0, 32.0]
    assert s.cur_hysteresis == 1


def test_min_scale_is_a_floor():
    s = LossScaler(initial_scale_power=3, hysteresis=1, min_loss_scale=4.0, raise_error_at_min_scale=False)
    assert _run(s, [True, True, True]) == [4.0, 4.0, 4.0]


def test_overflow_at_the_minimum_scale_raises_as_deepspeed_does():
    from flexspeed.runtime.precision import NumericalError

    s = LossScaler(initial_scale_power=3, hysteresis=1, min_loss_scale=4.0)
    assert _run(s, [True]) == [4.0]
    with pytest.raises(NumericalError, match=r"loss scale already at its minimum \(4, fp16.min_loss_scale\)"):
        s.update_scale(True)
    static = LossScaler(loss_scale=1.0)  # a static scale never raises (DeepSpeed's static scaler does not)
    assert _run(static, [True, True]) == [1.0, 1.0]


def test_state_dict_round_trip():
    s = LossScaler(initial_scale_power=6, hysteresis=2, loss_scale_window=5)
    _run(s, [True, False, True, False])
    t = LossScaler()
    t.load_state_dict(s.state_dict())
    assert t.state_dict() == s.state_dict()
    assert _run(t, [False] * 6) == _run(s, [False] * 6)
