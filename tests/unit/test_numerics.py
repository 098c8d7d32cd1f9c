"""Numerical guards: non-finite and absurd config values are ConfigErrors (never a hang or a deep
torch error), and non-finite losses/gradient norms in training are skipped or raise."""

from __future__ import annotations

import copy
import math

import pytest

from flexspeed.config import build_config
from flexspeed.config.errors import ConfigError

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
