"""Schema validation: strict keys, types, unsupported features, incompatible settings."""

from __future__ import annotations

import sys
import warnings

import pytest

from flexspeed.config import ConfigError, FlexConfig, build_config, validate_config

WS = {"world_size": 2, "world_size_source": "--world-size 2"}


def build(raw: dict, **kw):
    return build_config(raw, **{**WS, **kw})


def error(raw: dict, **kw) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        build({"train_micro_batch_size_per_gpu": 1, **raw}, **kw)
    return info.value


def test_import_has_no_torch():
    import subprocess

    code = "import sys, flexspeed.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_attribute_names_are_deepspeed_keys():
    cfg = build({
        "train_batch_size": 16, "gradient_accumulation_steps": 2,
        "fp16": {"enabled": True, "initial_scale_power": 12},
        "zero_optimization": {"stage": 2, "reduce_bucket_size": 5e8, "offload_optimizer": {"device": "cpu"}},
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
    })
    assert cfg.zero_optimization.stage == 2
    assert cfg.zero_optimization.reduce_bucket_size == 500_000_000
    assert isinstance(cfg.zero_optimization.reduce_bucket_size, int)
    assert cfg.zero_optimization.offload_optimizer.device == "cpu"
    assert cfg.fp16.initial_scale_power == 12
    assert cfg.optimizer.params["lr"] == 1e-4
    assert (cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps) == (16, 4, 2)
    assert cfg.precision == "fp16"


def test_every_field_has_default_and_docstring():
    from pydantic import BaseModel

    def walk(model: type[BaseModel]):
        for name, field in model.model_fields.items():
            assert field.description, f"{model.__name__}.{name} has no docstring"
            assert not field.is_required(), f"{model.__name__}.{name} has no default"
            sub = getattr(field.annotation, "model_fields", None)
            if sub is not None:
                walk(field.annotation)

    walk(FlexConfig)


@pytest.mark.parametrize("raw, precision", [
    ({}, "fp32"),
    ({"bf16": {"enabled": True}}, "bf16"),
    ({"bfloat16": {"enabled": True}}, "bf16"),
    ({"fp16": {"enabled": True}}, "fp16"),
    ({"fp16": {"enabled": "auto"}, "bf16": {"enabled": "auto"}}, "fp32"),
])
def test_precision(raw, precision):
    assert build({"train_micro_batch_size_per_gpu": 1, **raw}).precision == precision


def test_unknown_nested_key_names_path_and_suggests():
    e = error({"zero_optimization": {"stag": 2}})
    assert e.key == "zero_optimization.stag"
    assert "Did you mean 'stage'?" in str(e)


def test_unknown_top_level_key_suggests():
    e = error({"train_batch_sizes": 8})
    assert e.key == "train_batch_sizes" and "Did you mean 'train_batch_size'?" in str(e)


def test_unknown_deep_key():
    e = error({"zero_optimization": {"offload_optimizer": {"device": "cpu", "pin_memroy": True}}})
    assert e.key == "zero_optimization.offload_optimizer.pin_memroy"
    assert "pin_memory" in str(e)


def test_seed_is_not_a_key():
    assert error({"seed": 1}).key == "seed"


@pytest.mark.parametrize("raw, key, expected", [
    ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage", "one of 0, 1, 2, 3"),
    ({"zero_optimization": {"stage": "2"}}, "zero_optimization.stage", "one of 0, 1, 2, 3"),
    ({"train_batch_size": "32"}, "train_batch_size", "an integer"),
    ({"train_batch_size": True}, "train_batch_size", "an integer"),
    ({"fp16": {"enabled": 1}}, "fp16.enabled", "true or false"),
    ({"fp16": {"loss_scale": -1}}, "fp16.loss_scale", ">= 0"),
    ({"zero_optimization": {"offload_optimizer": {"device": "gpu"}}},
     "zero_optimization.offload_optimizer.device", "'none', 'cpu', 'nvme'"),
    ({"zero_optimization": {"offload_optimizer": {"ratio": 2}}},
     "zero_optimization.offload_optimizer.ratio", "<= 1.0"),
    ({"communication_data_type": "fp8"}, "communication_data_type", "'fp32', 'fp16', 'bf16'"),
    ({"checkpoint": {"tag_validation": "Maybe"}}, "checkpoint.tag_validation", "'Ignore', 'Warn', 'Fail'"),
    ({"pipeline": {"schedule": "zb"}}, "pipeline.schedule", "'1f1b', 'gpipe', 'interleaved_1f1b'"),
    ({"gradient_clipping": float("nan")}, "gradient_clipping", "a number"),
    ({"zero_optimization": True}, "zero_optimization", "an object"),
    ({"optimizer": {"type": "Adam", "params": [1]}}, "optimizer.params", "an object"),
    ({"steps_per_print": 2.5}, "steps_per_print", "an integer"),
])
def test_wrong_value_names_key_value_and_allowed(raw, key, expected):
    e = error(raw)
    assert e.key == key
    assert expected in str(e)
    assert "got " in str(e) and "Fix:" in str(e)


def test_auto_refused_where_not_supported():
    e = error({"zero_optimization": {"allgather_bucket_size": "auto"}})
    assert e.key == "zero_optimization.allgather_bucket_size"
    assert 'does not accept "auto"' in str(e)


def test_integral_floats_accepted():
    cfg = build({"train_micro_batch_size_per_gpu": 2.0, "zero_optimization": {"allgather_bucket_size": 2e8}})
    assert cfg.train_micro_batch_size_per_gpu == 2 and cfg.zero_optimization.allgather_bucket_size == 200_000_000


def test_tag_validation_case_insensitive_and_bfp16():
    cfg = build({"train_micro_batch_size_per_gpu": 1, "checkpoint": {"tag_validation": "fail"},
                 "communication_data_type": "bfp16"})
    assert cfg.checkpoint.tag_validation == "Fail" and cfg.communication_data_type == "bf16"


@pytest.mark.parametrize("name", ["amp", "autotuning", "hybrid_engine", "comms_logger",
                                  "progressive_layer_drop", "eigenvalue", "data_efficiency", "nebula"])
def test_unsupported_enabled_is_error_disabled_is_fine(name):
    e = error({name: {"enabled": True}})
    assert e.key == name and "does not implement" in str(e) and '"enabled": false' in str(e)
    cfg = build({"train_micro_batch_size_per_gpu": 1, name: {"enabled": False, "anything": 3}})
    assert not hasattr(cfg, name)


def test_unsupported_without_enabled_switch():
    assert "does not implement" in str(error({"sparse_attention": {"mode": "fixed"}}))
    assert "does not implement" in str(error({"aio": {"block_size": 1048576}}))
    assert "does not implement" in str(error({"compression_training": {"weight_quantization": {
        "shared_parameters": {"enabled": True}}}}))
    build({"train_micro_batch_size_per_gpu": 1, "compression_training": {"weight_quantization": {
        "shared_parameters": {"enabled": False}}}, "sparse_attention": {}})


def test_bf16_alias_conflict():
    e = error({"bf16": {"enabled": True}, "bfloat16": {"enabled": False}})
    assert e.key == "bf16" and "bfloat16" in str(e) and "keep only 'bf16'" in str(e)
    assert build({"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
                  "bfloat16": {"enabled": True}}).precision == "bf16"


def test_gather_fp16_alias():
    cfg = build({"train_micro_batch_size_per_gpu": 1,
                 "zero_optimization": {"stage": 3, "stage3_gather_fp16_weights_on_model_save": True}})
    assert cfg.zero_optimization.stage3_gather_16bit_weights_on_model_save is True
    e = error({"zero_optimization": {"stage3_gather_fp16_weights_on_model_save": True,
                                     "stage3_gather_16bit_weights_on_model_save": False}})
    assert e.key == "zero_optimization.stage3_gather_16bit_weights_on_model_save"


def test_pipeline_partition_alias():
    cfg = build({"train_micro_batch_size_per_gpu": 1, "pipeline": {"partition": "uniform"}})
    assert cfg.pipeline.partition_method == "uniform"


def test_fp16_and_bf16_both_enabled():
    e = error({"fp16": {"enabled": True}, "bf16": {"enabled": True}})
    assert "fp16.enabled and bf16.enabled" in str(e) and '"enabled": false' in str(e)


def test_offload_param_needs_stage3():
    e = error({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}}})
    assert e.key == "zero_optimization.offload_param" and '"stage": 3' in str(e)


def test_offload_optimizer_needs_stage1():
    e = error({"zero_optimization": {"stage": 0, "offload_optimizer": {"device": "cpu"}}})
    assert e.key == "zero_optimization.offload_optimizer" and '"stage": 2' in str(e)


@pytest.mark.parametrize("section", ["offload_optimizer", "offload_param"])
def test_nvme_not_supported_yet(section):
    e = error({"zero_optimization": {"stage": 3, section: {"device": "nvme", "nvme_path": "/nvme"}}})
    assert e.key == f"zero_optimization.{section}.device" and "not supported yet" in str(e)


def test_max_grad_norm_in_optimizer_params():
    e = error({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "max_grad_norm": 0.5}}})
    assert e.key == "optimizer.params.max_grad_norm" and '"gradient_clipping": 0.5' in str(e)


def test_optimizer_and_scheduler_need_type():
    assert error({"optimizer": {"params": {"lr": 1}}}).key == "optimizer.type"
    assert error({"scheduler": {"params": {}}}).key == "scheduler.type"


@pytest.mark.parametrize("sched, missing", [
    ("WarmupDecayLR", "total_num_steps"),
    ("WarmupCosineLR", "total_num_steps"),
    ("OneCycle", "cycle_min_lr"),
])
def test_scheduler_required_params(sched, missing):
    e = error({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "scheduler": {"type": sched, "params": {}}})
    assert e.key == f"scheduler.params.{missing}"


def test_sparse_gradients_rejected():
    assert error({"sparse_gradients": True}).key == "sparse_gradients"


def test_pipeline_virtual_stages_need_interleaved():
    assert error({"pipeline": {"virtual_stages": 2}}).key == "pipeline.virtual_stages"
    assert error({"pipeline": {"schedule": "interleaved_1f1b"}}).key == "pipeline.virtual_stages"
    cfg = build({"train_micro_batch_size_per_gpu": 1, "pipeline": {"schedule": "interleaved_1f1b", "virtual_stages": 2}})
    assert cfg.pipeline.virtual_stages == 2


def test_deprecated_cpu_offload():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cfg = build({"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2, "cpu_offload": True}})
        e = error({"zero_optimization": {"stage": 2, "cpu_offload": True, "offload_optimizer": {"device": "none"}}})
    assert cfg.zero_optimization.offload_optimizer.device == "cpu"
    assert any("deprecated" in str(w.message) for w in caught)
    assert e.key == "zero_optimization.cpu_offload"


def test_non_object_config():
    with pytest.raises(ConfigError, match="must be a JSON object"):
        validate_config([1, 2])  # type: ignore[arg-type]


def test_non_string_key():
    with pytest.raises(ConfigError, match="keys must be strings"):
        validate_config({1: 2})  # type: ignore[dict-item]


def test_validate_does_not_mutate_input():
    raw = {"train_micro_batch_size_per_gpu": 1, "bfloat16": {"enabled": True}, "amp": {"enabled": False},
           "zero_optimization": {"stage": 2, "cpu_offload": True}}
    snapshot = repr(raw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        build(raw)
    assert repr(raw) == snapshot
