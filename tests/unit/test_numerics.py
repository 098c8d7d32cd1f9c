"""Numerical guards: non-finite and absurd config values are ConfigErrors (never a hang or a deep
torch error), and non-finite losses/gradient norms in training are skipped or raise."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from flexspeed.config import build_config
from flexspeed.config.errors import ConfigError

@pytest.fixture(autouse=True)
def _no_group_leak():
    """initialize() in one process starts a gloo group; later tests expect none."""
    yield
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


BASE = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 1e-3, "warmup_num_steps": 10}}}


def _with(path: str, value):
    cfg = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    node = cfg
    for key in parents:
        node = node.setdefault(key, {})
    node[last] = value
    return cfg


@pytest.mark.parametrize(("path", "value", "key"), [
    ("optimizer.params.lr", math.inf, "optimizer.params.lr"),
    ("optimizer.params.lr", math.nan, "optimizer.params.lr"),
    ("optimizer.params.lr", 1e308, "optimizer.params.lr"),
    ("optimizer.params.weight_decay", -math.inf, "optimizer.params.weight_decay"),
    ("optimizer.params.betas", [0.9, 0.99, 0.9], "optimizer.params.betas"),
    ("optimizer.params.betas", [0.9, 1.5], "optimizer.params.betas"),
    ("scheduler.params.warmup_max_lr", math.nan, "scheduler.params.warmup_max_lr"),
    ("scheduler.params.warmup_min_lr", math.inf, "scheduler.params.warmup_min_lr"),
    ("fp16.initial_scale_power", 2**63, "fp16.initial_scale_power"),
    ("fp16.initial_scale_power", 65, "fp16.initial_scale_power"),
    ("train_micro_batch_size_per_gpu", 2**63, "train_micro_batch_size_per_gpu"),
    ("gradient_accumulation_steps", 2**40, "gradient_accumulation_steps"),
])
def test_absurd_values_are_config_errors_naming_key_and_value(path, value, key):
    cfg = _with(path, value)
    if path.startswith("fp16"):
        cfg["fp16"]["enabled"] = True
    with pytest.raises(ConfigError) as info:
        build_config(cfg, world_size=1)
    text = str(info.value)
    assert info.value.key == key, text
    assert "fix" in text.lower(), text
    shown = str(value[-1]) if isinstance(value, list) else str(value)
    assert shown in text or shown.replace("inf", "Infinity") in text, text


def test_limits_themselves_are_accepted():
    cfg = _with("fp16.initial_scale_power", 64)
    cfg["fp16"]["enabled"] = True
    cfg["optimizer"]["params"]["betas"] = [0.0, 0.999]
    build_config(cfg, world_size=1)


# ---- training: non-finite gradient norms (fp32/bf16) and fp16 at the minimum scale ----------------
def _engine(**extra):
    from flexspeed.runtime.data import RepeatingLoader
    from tests.distributed._ckpt_common import build_local

    engine, loader = build_local(**extra)
    return engine, RepeatingLoader(loader)


def _step(engine, it, poison: bool) -> None:
    for _ in range(engine.gradient_accumulation_steps()):
        x, y = next(it)
        loss = engine(x, y)
        engine.backward(loss * float("nan") if poison else loss)
        engine.step()


def _weights(engine) -> dict:
    return {n: p.detach().clone() for n, p in engine.module.named_parameters()}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_nonfinite_steps_are_skipped_then_raise(precision, caplog):
    from flexspeed.runtime.precision import NumericalError

    extra = {"bf16": {"enabled": True}} if precision == "bf16" else {}
    engine, it = _engine(flexspeed_nonfinite={"max_consecutive_skips": 3}, **extra)
    _step(engine, it, poison=False)
    before, lr = _weights(engine), engine.get_lr()
    with caplog.at_level("WARNING", logger="flexspeed"):
        _step(engine, it, poison=True)
        _step(engine, it, poison=True)
    assert engine.skipped_steps == 2 and engine.global_steps == 3
    assert all(torch.equal(before[n], p) for n, p in engine.module.named_parameters())
    assert engine.get_lr() == lr  # the scheduler did not step either
    assert "at optimizer step 1" in caplog.text and "step skipped" in caplog.text
    _step(engine, it, poison=False)  # a finite step resets the count
    assert all(torch.isfinite(p).all() for p in engine.module.parameters())
    for _ in range(2):
        _step(engine, it, poison=True)
    with pytest.raises(NumericalError, match="3 steps in a row were non-finite"):
        _step(engine, it, poison=True)
    assert all(torch.isfinite(p).all() for p in engine.module.parameters())


def test_nonfinite_raise_and_off():
    from flexspeed.runtime.precision import NumericalError

    engine, it = _engine(flexspeed_nonfinite={"action": "raise"})
    with pytest.raises(NumericalError, match=r"global gradient norm is nan at optimizer step 0"):
        _step(engine, it, poison=True)
    engine, it = _engine(flexspeed_nonfinite={"action": "off"})  # DeepSpeed's behaviour
    _step(engine, it, poison=True)
    assert engine.skipped_steps == 0
    assert not all(torch.isfinite(p).all() for p in engine.module.parameters())


def test_fp16_persistent_overflow_raises_at_the_minimum_scale():
    from flexspeed.runtime.precision import NumericalError

    import flexspeed
    from flexspeed.runtime.data import RepeatingLoader
    from tests.distributed._ckpt_common import ckpt_config
    from tests.distributed._parity import make_dataset, make_model

    model = make_model(seed=0)
    engine, _, loader, _ = flexspeed.initialize(
        model=model, model_parameters=model.parameters(), training_data=make_dataset(),
        # ZeRO stage 1: DeepSpeed's ZeRO loss scaler raises there (its stage-0 fp16 optimizer keeps skipping)
        config=ckpt_config(1, 1, fp16={"enabled": True, "initial_scale_power": 2, "hysteresis": 1}))
    it = RepeatingLoader(loader)
    with pytest.raises(NumericalError, match="loss scale already at its minimum"):
        for _ in range(10):
            _step(engine, it, poison=True)
    assert engine.skipped_steps == 2  # 4 -> 2 -> 1, then the overflow at 1 raises
