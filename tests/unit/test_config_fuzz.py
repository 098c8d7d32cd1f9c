"""Property test: corrupting a valid config only ever raises ConfigError (or still succeeds)."""

from __future__ import annotations

import base64
import copy
import json
import warnings
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexspeed.config import ConfigError, FlexConfig, build_config
from flexspeed.config.loader import load_config, parse_config_text

EXAMPLES = [json.loads(p.read_text()) for p in sorted((Path(__file__).parents[2] / "examples").glob("*.json"))]
VALID = EXAMPLES + [
    {"train_micro_batch_size_per_gpu": 2, "fp16": {"enabled": True, "loss_scale": 128},
     "optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}},
     "scheduler": {"type": "OneCycle", "params": {"cycle_min_lr": 0.01, "cycle_max_lr": 0.1}},
     "pipeline": {"schedule": "interleaved_1f1b", "virtual_stages": 2},
     "checkpoint": {"tag_validation": "Fail", "parallel_write": {"pipeline_stage": True}},
     "tensorboard": {"enabled": True, "output_path": "tb"}, "amp": {"enabled": False},
     "activation_checkpointing": {"partition_activations": True, "number_checkpoints": 4}},
]

KEYS = sorted({"enabled", "stage", "device", "type", "params", "lr", "auto", "bfloat16", "bf16", "fp16",
               "offload_param", "offload_optimizer", "total_num_steps", "max_grad_norm", "cpu_offload",
               "train_batch_size", "virtual_stages", "schedule", "amp", "moe", "warmup_max_lr", "betas"}
              | set(FlexConfig.model_fields))
SCALARS = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats()
           | st.text(max_size=6) | st.sampled_from(["auto", "cpu", "nvme", "none", "bfp16", "fail", "1f1b"])
           | st.sampled_from([0, 1, 2, 3, -1, 0.5, 1e308, 5e8]))
VALUES = st.recursive(SCALARS, lambda kids: st.lists(kids, max_size=3)
                      | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=5), kids, max_size=3),
                      max_leaves=6)


def _dict_paths(value: Any, path: tuple = ()) -> list[tuple]:
    out = [path] if isinstance(value, dict) else []
    if isinstance(value, dict):
        for key, item in value.items():
            out += _dict_paths(item, path + (key,))
    return out


def _at(root: dict, path: tuple) -> dict:
    for key in path:
        root = root[key]
    return root


@st.composite
def corrupted(draw: st.DrawFn) -> dict:
    cfg = copy.deepcopy(draw(st.sampled_from(VALID)))
    for _ in range(draw(st.integers(1, 3))):
        paths = _dict_paths(cfg)
        target = _at(cfg, draw(st.sampled_from(paths)))
        op = draw(st.sampled_from(["delete", "rename", "set", "add", "nest", "listify"]))
        keys = list(target)
        if op == "add" or not keys:
            target[draw(st.sampled_from(KEYS) | st.text(max_size=8))] = draw(VALUES)
            continue
        key = draw(st.sampled_from(keys))
        if op == "delete":
            del target[key]
        elif op == "rename":
            target[draw(st.sampled_from(KEYS) | st.text(max_size=8))] = target.pop(key)
        elif op == "set":
            target[key] = draw(VALUES)
        elif op == "nest":
            target[key] = {draw(st.sampled_from(KEYS)): target[key]}
        else:
            target[key] = [target[key]]
    return cfg


def _build(cfg: Any, world: int, batch: int | None, hidden: int | None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            out = build_config(cfg, world_size=world, world_size_source="fuzz",
                               dataloader_batch_size=batch, hidden_size=hidden)
        except ConfigError as exc:
            assert str(exc)
            return
    assert isinstance(out, FlexConfig)
    assert all(type(getattr(out, k)) is int for k in
               ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"))


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(cfg=corrupted(), world=st.integers(1, 8), batch=st.none() | st.integers(1, 16),
       hidden=st.none() | st.integers(1, 4096))
def test_corrupted_dicts_raise_only_config_error(cfg, world, batch, hidden):
    _build(cfg, world, batch, hidden)


@settings(max_examples=100, deadline=None)
@given(cfg=st.sampled_from(VALID), data=st.data())
def test_corrupted_text_raises_only_config_error(cfg, data):
    text = json.dumps(cfg, indent=1)
    for _ in range(data.draw(st.integers(1, 3))):
        pos = data.draw(st.integers(0, len(text)))
        if data.draw(st.booleans()):
            text = text[:pos] + text[pos + 1:]
        else:
            text = text[:pos] + data.draw(st.sampled_from(list('{}[]:,"\\ 0a#\n')) | st.text(max_size=2)) + text[pos:]
    encoded = base64.b64encode(text.encode()).decode()
    for parse in (lambda: parse_config_text(text), lambda: load_config(config=encoded)):
        try:
            raw = parse()
        except ConfigError:
            continue
        _build(raw, 2, 4, 64)
