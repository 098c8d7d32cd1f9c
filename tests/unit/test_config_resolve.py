"""The batch-size triad and "auto" resolution."""

from __future__ import annotations

import pytest

from flexspeed.config import ConfigError, build_config, resolve_batch_triad, resolve_config, validate_config
from flexspeed.config.resolve import OPTIMIZER_AUTO

N = None


@pytest.mark.parametrize("tbs, micro, gas, world, expected", [
    (32, 4, 2, 4, (32, 4, 2)),     # all three, consistent
    (32, 4, N, 4, (32, 4, 2)),     # tbs + micro -> gas
    (32, N, 2, 4, (32, 4, 2)),     # tbs + gas -> micro
    (N, 4, 2, 4, (32, 4, 2)),      # micro + gas -> tbs
    (32, N, N, 4, (32, 8, 1)),     # tbs only -> gas 1
    (N, 4, N, 4, (16, 4, 1)),      # micro only -> gas 1
    (8, N, N, 1, (8, 8, 1)),
    (N, 1, 1, 1, (1, 1, 1)),
    (64, 2, N, 8, (64, 2, 4)),
])
def test_triad_table(tbs, micro, gas, world, expected):
    assert resolve_batch_triad(tbs, micro, gas, world_size=world, world_size_source="test") == expected


@pytest.mark.parametrize("tbs, micro, gas, world, key", [
    (32, 4, 2, 2, "train_batch_size"),             # mismatch
    (30, 4, N, 2, "train_batch_size"),             # not divisible -> gas
    (30, N, 4, 2, "train_batch_size"),             # not divisible -> micro
    (33, N, N, 2, "train_batch_size"),             # not divisible by world
    (N, N, 4, 2, "train_micro_batch_size_per_gpu"),  # only gas
    (N, N, N, 2, "train_micro_batch_size_per_gpu"),  # nothing
    (0, N, N, 2, "train_batch_size"),
    (N, -1, N, 2, "train_micro_batch_size_per_gpu"),
    (N, 2, 0, 2, "gradient_accumulation_steps"),
])
def test_triad_errors(tbs, micro, gas, world, key):
    with pytest.raises(ConfigError) as info:
        resolve_batch_triad(tbs, micro, gas, world_size=world, world_size_source="WORLD_SIZE=2 from torchrun")
    assert info.value.key == key
    assert "Fix:" in str(info.value)


def test_triad_mismatch_message_shows_everything():
    raw = {"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}
    with pytest.raises(ConfigError) as info:
        build_config(raw, world_size=2, world_size_source="WORLD_SIZE=2 from torchrun")
    msg = str(info.value)
    for part in ("train_batch_size 32", "train_micro_batch_size_per_gpu 4", "gradient_accumulation_steps 2",
                 "world size 2", "WORLD_SIZE=2 from torchrun", "= 16", "set train_batch_size to 16"):
        assert part in msg, part


def test_resolved_triad_is_plain_ints():
    cfg = build_config({"train_batch_size": 16.0}, world_size=4, world_size_source="--world-size 4")
    triad = (cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps)
    assert triad == (16, 4, 1) and all(type(v) is int for v in triad)


def test_resolve_accepts_model_and_is_idempotent():
    cfg = validate_config({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3})
    once = resolve_config(cfg, world_size=2, world_size_source="test")
    twice = resolve_config(once, world_size=2, world_size_source="test")
    assert once == twice and once.train_batch_size == 12
    with pytest.raises(ConfigError, match="world size 4"):
        resolve_config(once, world_size=4, world_size_source="test")


@pytest.mark.parametrize("world", [0, -1, 1.5, True, "2"])
def test_bad_world_size(world):
    with pytest.raises(ConfigError) as info:
        build_config({"train_micro_batch_size_per_gpu": 1}, world_size=world, world_size_source="env")
    assert info.value.key == "world_size"


def test_auto_triad_from_dataloader():
    raw = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto"}
    cfg = build_config(raw, world_size=2, world_size_source="t", dataloader_batch_size=8)
    assert (cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps) == (16, 8, 1)
    cfg = build_config({**raw, "gradient_accumulation_steps": 4}, world_size=2, world_size_source="t",
                       dataloader_batch_size=8)
    assert cfg.train_batch_size == 64


def test_auto_micro_derived_from_others_without_dataloader():
    raw = {"train_batch_size": 32, "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": 2}
    cfg = build_config(raw, world_size=4, world_size_source="t")
    assert cfg.train_micro_batch_size_per_gpu == 4


def test_auto_micro_unresolvable():
    with pytest.raises(ConfigError) as info:
        build_config({"train_micro_batch_size_per_gpu": "auto"}, world_size=2, world_size_source="t")
    assert info.value.key == "train_micro_batch_size_per_gpu" and "dataloader_batch_size" in str(info.value)


def test_auto_precision_and_clipping():
    raw = {"train_micro_batch_size_per_gpu": 1, "fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"},
           "gradient_clipping": "auto"}
    cfg = build_config(raw, world_size=1, world_size_source="t")
    assert cfg.fp16.enabled is False and cfg.bf16.enabled is False and cfg.gradient_clipping == 1.0


def test_auto_buckets_from_hidden_size():
    raw = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {
        "stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
        "stage3_param_persistence_threshold": "auto"}}
    zero = build_config(raw, world_size=1, world_size_source="t", hidden_size=1024).zero_optimization
    assert zero.reduce_bucket_size == 1024 * 1024
    assert zero.stage3_prefetch_bucket_size == int(0.9 * 1024 * 1024)
    assert zero.stage3_param_persistence_threshold == 10 * 1024


def test_auto_buckets_need_hidden_size():
    raw = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3, "stage3_prefetch_bucket_size": "auto"}}
    with pytest.raises(ConfigError) as info:
        build_config(raw, world_size=1, world_size_source="t")
    assert info.value.key == "zero_optimization.stage3_prefetch_bucket_size" and "hidden_size" in str(info.value)


def test_auto_stage3_keys_below_stage3_use_defaults():
    raw = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {
        "stage": 2, "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto"}}
    zero = build_config(raw, world_size=1, world_size_source="t").zero_optimization
    assert zero.stage3_prefetch_bucket_size == 50_000_000 and zero.stage3_param_persistence_threshold == 100_000


def test_auto_optimizer_and_scheduler_params():
    raw = {"train_micro_batch_size_per_gpu": 1,
           "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}},
           "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto"}}}
    cfg = build_config(raw, world_size=1, world_size_source="t")
    assert cfg.optimizer.params == {k: OPTIMIZER_AUTO[k] for k in ("lr", "betas", "eps", "weight_decay")}
    assert cfg.scheduler.params == {"warmup_min_lr": 0.0, "warmup_max_lr": OPTIMIZER_AUTO["lr"]}
    raw["optimizer"]["params"]["lr"] = 3e-4
    assert build_config(raw, world_size=1, world_size_source="t").scheduler.params["warmup_max_lr"] == 3e-4


@pytest.mark.parametrize("section, key", [
    ("optimizer", "amsgrad"),
    ("scheduler", "total_num_steps"),
    ("scheduler", "warmup_num_steps"),
])
def test_auto_without_default_names_key(section, key):
    raw = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
           "scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 100}}}
    raw[section]["params"][key] = "auto"
    with pytest.raises(ConfigError) as info:
        build_config(raw, world_size=1, world_size_source="t")
    assert info.value.key == f"{section}.params.{key}" and "Fix:" in str(info.value)


def test_warmup_max_lr_auto_without_optimizer_lr():
    raw = {"train_micro_batch_size_per_gpu": 1, "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": "auto"}}}
    with pytest.raises(ConfigError) as info:
        build_config(raw, world_size=1, world_size_source="t")
    assert info.value.key == "scheduler.params.warmup_max_lr" and "optimizer.params.lr" in str(info.value)


def test_nested_auto_left_over_is_error():
    raw = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "AdamW", "params": {"betas": ["auto", 0.9]}}}
    with pytest.raises(ConfigError) as info:
        build_config(raw, world_size=1, world_size_source="t")
    assert info.value.key == "optimizer.params.betas[0]"


def test_pipeline_stages_auto_is_kept():
    cfg = build_config({"train_micro_batch_size_per_gpu": 1}, world_size=1, world_size_source="t")
    assert cfg.pipeline.stages == "auto"


def test_examples_all_build():
    from pathlib import Path

    for path in sorted(Path(__file__).parents[2].joinpath("examples").glob("*.json")):
        cfg = build_config(str(path), world_size=2, world_size_source="t", dataloader_batch_size=4, hidden_size=64)
        assert cfg.train_batch_size >= 1, path
