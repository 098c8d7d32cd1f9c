"""DeepSpeed-named LR schedulers: curves against DeepSpeed 0.19.8's formulas, stepping, state, errors.

The reference functions below are DeepSpeed's ``lr_schedules.py`` formulas at DeepSpeed's
iteration index i (written independently of flexspeed's implementation). Under DeepSpeed's
step semantics optimizer step k (1-based) runs at the value a fresh scheduler writes at
construction for k = 1 and at iteration k - 2 after that; ``_curve`` reads the lr each
optimizer step would run with. ``tests/compat/test_schedulers_vs_deepspeed.py`` checks the same
curves against values recorded from DeepSpeed's engine.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from flexspeed.config.errors import ConfigError
from flexspeed.runtime.schedulers import (
    LRRangeTest,
    OneCycle,
    WarmupCosineLR,
    WarmupDecayLR,
    WarmupLR,
    build_scheduler,
    scheduler_names,
    validate_scheduler_params,
)


def _opt(kind: str = "adamw", groups: int = 1, lr: float = 0.1) -> torch.optim.Optimizer:
    params = [{"params": [torch.nn.Parameter(torch.zeros(2))], "lr": lr * (k + 1)} for k in range(groups)]
    if kind == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.5)
    if kind == "adagrad":
        return torch.optim.Adagrad(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr)


def _curve(sched, opt, n: int, group: int = 0) -> list[float]:
    """The lr optimizer steps 1..n run with (read before each scheduler step)."""
    out = []
    for _ in range(n):
        out.append(opt.param_groups[group]["lr"])
        assert sched.get_last_lr()[group] == opt.param_groups[group]["lr"]
        sched.step()
    return out


def _at_steps(ref, n: int) -> list[float]:
    """What optimizer steps 1..n run with: ``ref(-1)`` (the construction value), then ref(0), ref(1), ..."""
    return [ref(k - 2) for k in range(1, n + 1)]


# -- DeepSpeed 0.19.8's formulas at iteration i (-1: the value written at construction) ----------

def ref_gamma(i: int, n: int, kind: str) -> float:
    n = max(2, n)
    if i >= n:
        return 1.0
    return math.log(i + 1) / math.log(n) if kind == "log" else i / n


def ref_warmup(i: int, lo: float, hi: float, n: int, kind: str) -> float:
    return lo if i < 0 else lo + (hi - lo) * ref_gamma(i, n, kind)


def ref_warmup_decay(i: int, lo: float, hi: float, n: int, total: int, kind: str) -> float:
    if i < max(2, n):
        return ref_warmup(i, lo, hi, n, kind)
    return lo + (hi - lo) * max(0.0, (total - i) / max(1, total - max(2, n)))


def ref_cosine(i: int, base: float, total: int, n: int, min_ratio: float, cos_min: float, kind: str) -> float:
    if i < 0:
        return 0.0
    n = max(2, n)
    if i < n:
        return base * (min_ratio + (1 - min_ratio) * ref_gamma(i, n, kind))
    progress = min(1.0, (i - n + 1) / max(1, total - n))
    return base * (cos_min + (1 - cos_min) * 0.5 * (1 + math.cos(math.pi * progress)))


def ref_onecycle(i, lo, hi, a, b, mlo, mhi, rate, dstep, mrate, stairs1=0, stairs2=0):
    """(lr, beta1) at iteration i; the cycle reads position j = i + 1 in [0, a + b]."""
    j = i + 1
    if i < a + b:
        if j <= a:
            s = math.floor(j * stairs1 / a) / stairs1 if stairs1 else j / a
        else:
            s = math.floor((a + b - j) * stairs2 / b) / stairs2 if stairs2 else 1 - (j - a) / b
        return lo + (hi - lo) * s, mhi - (mhi - mlo) * s
    d = (j - a - b) / dstep if dstep else 0.0
    return lo / (1 + rate * d), mhi * (1 + mrate * d)


def ref_range(i: int, lo: float, size: int, rate: float, staircase: bool) -> float:
    interval = (i + 1) / size
    return lo * (1 + rate * (math.floor(interval) if staircase else interval))


# -- curves --------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["log", "linear"])
def test_warmup_lr_curve(kind):
    opt = _opt()
    sched = WarmupLR(opt, warmup_min_lr=0.01, warmup_max_lr=0.5, warmup_num_steps=37, warmup_type=kind)
    got = _curve(sched, opt, 80)
    assert got == pytest.approx(_at_steps(lambda i: ref_warmup(i, 0.01, 0.5, 37, kind), 80), rel=1e-12, abs=1e-15)
    assert got[:2] == [0.01, 0.01] and got[-1] == 0.5  # DeepSpeed runs the minimum twice


def test_warmup_lr_defaults_match_deepspeed():
    opt = _opt()  # lr 0.1: DeepSpeed's warmup_max_lr defaults to the optimizer's lr
    sched = WarmupLR(opt)
    assert opt.param_groups[0]["lr"] == 0.0 and sched.last_batch_iteration == -1
    sched.step(999)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1)
    assert sched.last_batch_iteration == 999


def test_warmup_lr_per_group_lists():
    opt = _opt(groups=2)
    sched = WarmupLR(opt, warmup_min_lr=[0.0, 0.1], warmup_max_lr=[1.0, 0.2], warmup_num_steps=10,
                     warmup_type="linear")
    for i in range(-1, 15):
        assert sched.get_lr() == pytest.approx([ref_warmup(i, 0.0, 1.0, 10, "linear"),
                                                ref_warmup(i, 0.1, 0.2, 10, "linear")])
        assert [g["lr"] for g in opt.param_groups] == sched.get_last_lr()
        sched.step()


def test_warmup_one_step_is_two_and_zero_is_rejected():
    for kind in ("log", "linear"):
        opt = _opt()
        sched = WarmupLR(opt, warmup_min_lr=0.1, warmup_max_lr=1.0, warmup_num_steps=1, warmup_type=kind)
        assert _curve(sched, opt, 4) == pytest.approx(_at_steps(lambda i: ref_warmup(i, 0.1, 1.0, 2, kind), 4))
    with pytest.raises(ConfigError, match=">= 1") as err:
        WarmupLR(_opt(), warmup_num_steps=0)
    assert err.value.key == "scheduler.params.warmup_num_steps"


@pytest.mark.parametrize("kind", ["log", "linear"])
def test_warmup_decay_lr_curve(kind):
    opt = _opt()
    sched = WarmupDecayLR(opt, total_num_steps=100, warmup_min_lr=0.001, warmup_max_lr=0.3,
                          warmup_num_steps=20, warmup_type=kind)
    got = _curve(sched, opt, 130)
    want = _at_steps(lambda i: ref_warmup_decay(i, 0.001, 0.3, 20, 100, kind), 130)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
    assert got[101:] == pytest.approx([0.001] * 29)


@pytest.mark.parametrize("kind", ["log", "linear"])
def test_warmup_cosine_lr_curve_two_groups(kind):
    for group, base in ((0, 0.2), (1, 0.4)):
        opt = _opt(groups=2, lr=0.2)  # base lrs 0.2 and 0.4
        sched = WarmupCosineLR(opt, total_num_steps=90, warmup_min_ratio=0.05, warmup_num_steps=15,
                               cos_min_ratio=0.01, warmup_type=kind)
        got = _curve(sched, opt, 120, group)
        want = _at_steps(lambda i: ref_cosine(i, base, 90, 15, 0.05, 0.01, kind), 120)
        assert got == pytest.approx(want, rel=1e-12, abs=1e-15)
        assert got[0] == 0.0 and got[1] == pytest.approx(0.05 * base)  # DeepSpeed's lr 0 at the first step


def test_warmup_cosine_opt_out_of_the_zero_first_step():
    opt = _opt()
    sched = WarmupCosineLR(opt, total_num_steps=30, warmup_min_ratio=0.2, warmup_num_steps=10,
                           flexspeed_zero_lr_first_step=False)
    got = _curve(sched, opt, 40)
    want = _at_steps(lambda i: ref_cosine(i, 0.1, 30, 10, 0.2, 1e-4, "log"), 40)
    assert got[0] == pytest.approx(0.02) and got[1:] == pytest.approx(want[1:], rel=1e-12)


def test_one_cycle_lr_and_betas():
    opt = _opt()
    with pytest.warns(UserWarning, match="beta2 is replaced"):
        sched = OneCycle(opt, cycle_min_lr=0.01, cycle_max_lr=0.1, decay_lr_rate=0.2, cycle_first_step_size=10,
                         cycle_second_step_size=6, decay_step_size=4, cycle_min_mom=0.85, cycle_max_mom=0.95,
                         decay_mom_rate=0.001)
    group = opt.param_groups[0]
    assert group["lr"] == 0.01 and group["betas"] == (0.85, 0.99)  # DeepSpeed: min momentum, beta2 0.99
    for i in range(40):
        sched.step()
        lr, mom = ref_onecycle(i, 0.01, 0.1, 10, 6, 0.85, 0.95, 0.2, 4, 0.001)
        assert group["lr"] == pytest.approx(lr, rel=1e-12)
        assert group["betas"] == (pytest.approx(mom, rel=1e-12), 0.99)
        assert sched.get_mom()[0] == group["betas"]


def test_one_cycle_leaves_sgd_momentum_alone_with_a_warning():
    opt = _opt("sgd")
    with pytest.warns(UserWarning, match="SGD has none"):
        sched = OneCycle(opt, cycle_min_lr=0.01, cycle_max_lr=0.1, cycle_first_step_size=4)
    for _ in range(10):
        sched.step()
        assert opt.param_groups[0]["momentum"] == 0.5 and "betas" not in opt.param_groups[0]
    assert sched.get_mom() is None


@pytest.mark.parametrize("stairs", [(4, None), (4, 2), (3, 5)])
def test_one_cycle_stairs_and_no_decay(stairs):
    first, second = stairs[0], stairs[0] if stairs[1] is None else stairs[1]
    opt = _opt()
    sched = OneCycle(opt, cycle_min_lr=[0.0], cycle_max_lr=[1.0], cycle_first_step_size=8, cycle_second_step_size=6,
                     cycle_first_stair_count=stairs[0], cycle_second_stair_count=stairs[1], cycle_momentum=False)
    got = _curve(sched, opt, 25)
    want = _at_steps(lambda i: ref_onecycle(i, 0.0, 1.0, 8, 6, 0.8, 0.9, 0.0, 0, 0.0, first, second)[0], 25)
    assert got == pytest.approx(want, abs=1e-15)
    assert got[8] == 1.0 and got[14:] == [0.0] * 11  # peak at iteration 7 (j = 8), cycle ends at j = 14
    assert opt.param_groups[0]["betas"] == (0.9, 0.999)  # untouched with cycle_momentum false


@pytest.mark.parametrize("staircase", [False, True])
def test_lr_range_test_curve(staircase):
    opt = _opt(groups=2)
    sched = LRRangeTest(opt, lr_range_test_min_lr=[1e-4, 1e-3], lr_range_test_step_size=7,
                        lr_range_test_step_rate=2.5, lr_range_test_staircase=staircase)
    for i in range(-1, 50):
        assert sched.get_last_lr() == pytest.approx([ref_range(i, 1e-4, 7, 2.5, staircase),
                                                     ref_range(i, 1e-3, 7, 2.5, staircase)], rel=1e-12)
        sched.step()


# -- stepping and state --------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:flexspeed. OneCycle")
def test_step_moves_to_an_absolute_iteration():
    opt = _opt()
    sched = WarmupLR(opt, warmup_num_steps=100, warmup_type="linear", warmup_max_lr=1.0)
    sched.step(5)
    assert sched.last_batch_iteration == 5 and opt.param_groups[0]["lr"] == pytest.approx(0.05)
    sched.step(last_batch_iteration=50)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.5)
    sched.step(0)
    assert sched.last_batch_iteration == 0 and opt.param_groups[0]["lr"] == 0.0
    for bad in (-2, 1.5, True):
        with pytest.raises(ValueError, match="iteration to move to"):
            sched.step(bad)
    cycle = OneCycle(_opt(), cycle_min_lr=0.1, cycle_max_lr=1.0, cycle_first_step_size=4)
    cycle.step(batch_iteration=2)  # DeepSpeed's keyword for OneCycle and LRRangeTest
    assert cycle.last_batch_iteration == 2


def test_constructor_last_batch_iteration_leaves_the_optimizer_until_the_first_step():
    opt = _opt()
    sched = WarmupLR(opt, warmup_num_steps=10, warmup_type="linear", warmup_max_lr=1.0, last_batch_iteration=3)
    assert sched.last_batch_iteration == 3 and opt.param_groups[0]["lr"] == 0.1
    sched.step()
    assert sched.last_batch_iteration == 4 and opt.param_groups[0]["lr"] == pytest.approx(0.4)


_CASES = [
    ("WarmupLR", {"warmup_num_steps": 20, "warmup_min_lr": 0.01}),
    ("WarmupDecayLR", {"total_num_steps": 60, "warmup_num_steps": 20}),
    ("WarmupCosineLR", {"total_num_steps": 60, "warmup_num_steps": 20, "warmup_type": "linear"}),
    ("OneCycle", {"cycle_min_lr": 0.01, "cycle_max_lr": 0.1, "cycle_first_step_size": 9, "decay_step_size": 3,
                  "decay_lr_rate": 0.1}),
    ("LRRangeTest", {"lr_range_test_step_size": 5, "lr_range_test_staircase": True}),
    ("StepLR", {"step_size": 7, "gamma": 0.5}),
    ("CosineAnnealingLR", {"T_max": 30}),
]


@pytest.mark.filterwarnings("ignore:flexspeed. OneCycle")
@pytest.mark.parametrize("name,params", _CASES)
def test_state_dict_round_trip_resumes_identically(name, params):
    opt_a = _opt()
    sched_a = build_scheduler(name, params, opt_a)
    for _ in range(23):
        opt_a.step()
        sched_a.step()
    state = sched_a.state_dict()
    opt_b = _opt()
    sched_b = build_scheduler(name, params, opt_b)
    opt_b.load_state_dict(opt_a.state_dict())  # the optimizer's state carries the lr, as in DeepSpeed
    sched_b.load_state_dict(state)
    for _ in range(40):
        assert opt_b.param_groups[0]["lr"] == pytest.approx(opt_a.param_groups[0]["lr"], rel=1e-12)
        assert opt_b.param_groups[0]["betas"] == opt_a.param_groups[0]["betas"]
        opt_a.step()
        opt_b.step()
        sched_a.step()
        sched_b.step()


def test_load_state_dict_restores_the_counter_only_and_names_changed_hyperparameters():
    opt = _opt()
    sched = WarmupLR(opt, warmup_max_lr=1.0, warmup_num_steps=10, warmup_type="linear")
    sched.step(6)
    state = sched.state_dict()
    assert state["last_batch_iteration"] == 6 and state["hyperparameters"]["warmup_max_lr"] == 1.0
    opt2 = _opt()
    resumed = WarmupLR(opt2, warmup_max_lr=2.0, warmup_num_steps=10, warmup_type="linear")
    with pytest.warns(UserWarning, match=r"warmup_max_lr 1\.0 -> 2\.0") as caught:
        resumed.load_state_dict(state)
    assert len(caught) == 1 and "warmup_num_steps" not in str(caught[0].message)
    assert resumed.last_batch_iteration == 6 and opt2.param_groups[0]["lr"] == 0.0  # left as it was
    resumed.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(1.4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        WarmupLR(_opt(), warmup_max_lr=1.0, warmup_num_steps=10, warmup_type="linear").load_state_dict(state)
        WarmupLR(_opt()).load_state_dict({"last_batch_iteration": 3})  # DeepSpeed's own state_dict


def test_load_state_dict_rejects_foreign_state():
    sched = WarmupLR(_opt())
    with pytest.raises(KeyError, match="last_batch_iteration"):
        sched.load_state_dict({"last_epoch": 3})


def test_tensor_lr_is_updated_in_place():
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([p], lr=torch.tensor(0.1))
    lr_tensor = opt.param_groups[0]["lr"]
    sched = WarmupLR(opt, warmup_num_steps=4, warmup_type="linear", warmup_max_lr=1.0)
    sched.step()
    sched.step()
    assert opt.param_groups[0]["lr"] is lr_tensor and float(lr_tensor) == pytest.approx(0.25)


def test_total_below_warmup_is_accepted_with_a_warning_as_in_deepspeed():
    validate_scheduler_params("WarmupDecayLR", {"total_num_steps": 500})  # warmup defaults to 1000
    for name in ("WarmupDecayLR", "WarmupCosineLR"):
        with pytest.warns(UserWarning, match="less than warmup_num_steps"):
            build_scheduler(name, {"total_num_steps": 5, "warmup_num_steps": 10}, _opt())


# -- building and validation ---------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:flexspeed. OneCycle")
@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_build_names_are_case_insensitive_and_torch_classes_work():
    assert type(build_scheduler("warmuplr", {}, _opt())) is WarmupLR
    assert type(build_scheduler("ONECYCLE", {"cycle_min_lr": 0.1, "cycle_max_lr": 1.0}, _opt())) is OneCycle
    opt = _opt()
    sched = build_scheduler("StepLR", {"step_size": 2, "gamma": 0.5}, opt)
    assert isinstance(sched, torch.optim.lr_scheduler.StepLR)
    assert _curve(sched, opt, 5) == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])
    assert "CosineAnnealingLR" in scheduler_names() and "LambdaLR" not in scheduler_names()


@pytest.mark.parametrize("name,params,key,text", [
    ("WarmupLRR", {}, "scheduler.type", "Did you mean 'WarmupLR'"),
    ("Cosine", {}, "scheduler.type", "StepLR"),
    ("LambdaLR", {}, "scheduler.type", "lr_scheduler="),
    ("ReduceLROnPlateau", {}, "scheduler.type", "metric"),
    ("WarmupLR", {"warmup_nm_steps": 3}, "scheduler.params.warmup_nm_steps", "Did you mean 'warmup_num_steps'"),
    ("WarmupLR", {"total_num_steps": 3}, "scheduler.params.total_num_steps", "Accepted"),
    ("WarmupDecayLR", {}, "scheduler.params.total_num_steps", "add \"total_num_steps\""),
    ("WarmupCosineLR", {"warmup_num_steps": 5}, "scheduler.params.total_num_steps", "needs"),
    ("OneCycle", {"cycle_max_lr": 0.1}, "scheduler.params.cycle_min_lr", "needs"),
    ("OneCycle", {"cycle_min_lr": 0.1}, "scheduler.params.cycle_max_lr", "needs"),
    ("StepLR", {"gamma": 0.5}, "scheduler.params.step_size", "needs 'step_size'"),
    ("CosineAnnealingLR", {"tmax": 5}, "scheduler.params.tmax", "T_max"),
    ("WarmupLR", {"warmup_type": "lin"}, "scheduler.params.warmup_type", "Did you mean 'linear'"),
    ("WarmupLR", {"warmup_num_steps": 1.5}, "scheduler.params.warmup_num_steps", "whole number"),
    ("WarmupLR", {"warmup_num_steps": 0}, "scheduler.params.warmup_num_steps", ">= 1"),
    ("WarmupCosineLR", {"total_num_steps": 9, "flexspeed_zero_lr_first_step_": False},
     "scheduler.params.flexspeed_zero_lr_first_step_", "Did you mean 'flexspeed_zero_lr_first_step'"),
    ("WarmupLR", {"warmup_max_lr": "0.1"}, "scheduler.params.warmup_max_lr", "number"),
    ("WarmupCosineLR", {"total_num_steps": 9, "warmup_num_steps": 1, "cos_min_ratio": 2},
     "scheduler.params.cos_min_ratio", "[0, 1]"),
    ("OneCycle", {"cycle_min_lr": 0.1, "cycle_max_lr": 1, "cycle_first_step_size": 0},
     "scheduler.params.cycle_first_step_size", ">= 1"),
    ("OneCycle", {"cycle_min_lr": 0.1, "cycle_max_lr": 1, "cycle_momentum": 1},
     "scheduler.params.cycle_momentum", "true or false"),
    ("LRRangeTest", {"lr_range_test_staircase": "yes"}, "scheduler.params.lr_range_test_staircase", "true"),
])
def test_validation_errors_name_the_key(name, params, key, text):
    with pytest.raises(ConfigError) as err:
        validate_scheduler_params(name, params)
    assert err.value.key == key
    assert text in str(err.value)
    with pytest.raises(ConfigError):  # building fails the same way
        build_scheduler(name, params, _opt())


def test_validation_accepts_good_configs_and_auto():
    validate_scheduler_params("WarmupLR", None)
    validate_scheduler_params("WarmupDecayLR", {"total_num_steps": "auto", "warmup_num_steps": "auto",
                                                "warmup_max_lr": "auto"})
    validate_scheduler_params("warmupcosinelr", {"total_num_steps": 1e4, "warmup_num_steps": 100})
    validate_scheduler_params("OneCycle", {"cycle_min_lr": [0.1, 0.2], "cycle_max_lr": 1,
                                           "cycle_second_step_size": None})
    validate_scheduler_params("MultiStepLR", {"milestones": [3, 6]})
    with pytest.raises(ConfigError, match="auto") as err:
        build_scheduler("WarmupLR", {"warmup_max_lr": "auto"}, _opt())
    assert err.value.key == "scheduler.params.warmup_max_lr"


def test_per_group_list_length_must_match():
    with pytest.raises(ConfigError, match="3 values but the optimizer has 2") as err:
        WarmupLR(_opt(groups=2), warmup_max_lr=[0.1, 0.2, 0.3])
    assert err.value.key == "scheduler.params.warmup_max_lr"


def test_torch_constructor_errors_become_config_errors():
    with pytest.raises(ConfigError) as err:
        build_scheduler("OneCycleLR", {"max_lr": 0.1}, _opt())  # needs total_steps or epochs
    assert err.value.key == "scheduler.params"


def test_requires_an_optimizer():
    with pytest.raises(TypeError, match="param_groups"):
        WarmupLR(object())
