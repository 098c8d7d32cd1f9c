"""Port of DeepSpeed's ``tests/unit/runtime/test_ds_config_dict.py``.

Cases: TestBasicConfig.test_accelerator, TestBasicConfig.test_check_version, TestBatchConfig.test
(4 parametrisations), test_temp_config_json, test_gradient_allreduce_op (mean, SUM),
test_gradient_allreduce_op_default, test_invalid_gradient_allreduce_op,
test_sum_gradient_allreduce_rejects_zero3, test_sum_gradient_allreduce_rejects_zenflow,
test_sum_gradient_allreduce_rejects_deepcompile (stages 1, 2), test_gather_16bit_params_on_model_save
(2 keys), test_get_bfloat16_enabled (2 keys), test_quantized_eigenvalue_config_parses,
test_compression_training_without_legacy_quantize_training_uses_defaults, TestConfigLoad.test_dict /
test_json / test_hjson, TestDeprecatedDeepScaleConfig.test, TestDistInit.test, TestInitNoOptimizer.test,
TestArgs.test_none_args / test_no_args, TestNoModel.test.

Plumbing: world size 1 cases run in this process (``initialize()`` starts a one-rank gloo group);
TestBatchConfig needs only a world size of 2, which a ``fake`` process group gives without spawning.
DeepSpeed's private ``DeepSpeedConfig._configure_train_batch_size()`` on a mutated config is
replaced by building a ``DeepSpeedConfig`` from the same triad (the same fill-in rule, through
the public constructor). ``DeepSpeedZeroConfig`` / ``get_bfloat16_config`` (internal classes) are
reached through ``DeepSpeedConfig``. See PORTING.md for the deliberate differences.
"""

from __future__ import annotations

import argparse
import json
import os

import hjson
import pytest
import torch
import torch.distributed as dist

import flexspeed as deepspeed
from flexspeed.accelerator import get_accelerator
from flexspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError
from tests.compat._ds_common import (SimpleModel, create_config_from_dict, destroy_group, half_precision_section,
                                     random_dataloader)


@pytest.fixture(autouse=True)
def _clean_group():
    yield
    destroy_group()


class TestBasicConfig:
    def test_accelerator(self):
        assert get_accelerator().is_available()

    def test_check_version(self):
        assert hasattr(deepspeed, "__git_hash__")
        assert hasattr(deepspeed, "__git_branch__")
        assert hasattr(deepspeed, "__version__")
        assert hasattr(deepspeed, "__version_major__")
        assert hasattr(deepspeed, "__version_minor__")
        assert hasattr(deepspeed, "__version_patch__")


@pytest.fixture
def base_config():
    return {"train_batch_size": 1, "optimizer": {"type": "Adam", "params": {"lr": 0.00015}}}


# DeepSpeed's tests/unit/ds_batch_config.json, less its fp16 section (DeepSpeed's own CPU runs replace
# fp16 by bf16; the triad does not depend on it)
DS_BATCH_CONFIG = {"train_batch_size": 2, "gradient_accumulation_steps": 1,
                   "optimizer": {"type": "Adam", "params": {"lr": 0.00015}}, "gradient_clipping": 1.0}


def _run_batch_config(train_batch=None, micro_batch=None, gas=None):
    """DeepSpeed sets the three fields on a loaded config and re-runs its batch rule; here the same
    triad goes through the public constructor. Returns (success, config or None)."""
    cfg = {k: v for k, v in DS_BATCH_CONFIG.items() if k not in ("train_batch_size", "gradient_accumulation_steps")}
    for key, value in (("train_batch_size", train_batch), ("train_micro_batch_size_per_gpu", micro_batch),
                       ("gradient_accumulation_steps", gas)):
        if value is not None:
            cfg[key] = value
    try:
        return True, DeepSpeedConfig(cfg)
    except DeepSpeedConfigError:  # DeepSpeed: AssertionError (see PORTING.md)
        return False, None


def _batch_assert(status, ds_config, batch, micro_batch, gas, success):
    if not success:
        assert not status
        return
    assert ds_config.train_batch_size == batch
    assert ds_config.train_micro_batch_size_per_gpu == micro_batch
    assert ds_config.gradient_accumulation_steps == gas


@pytest.fixture
def fake_world_2():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", rank=0, world_size=2, store=FakeStore())
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("num_ranks,batch,micro_batch,gas,success",
                         [(2, 32, 16, 1, True), (2, 32, 8, 2, True), (2, 33, 17, 2, False), (2, 32, 18, 1, False)])
class TestBatchConfig:
    def test(self, fake_world_2, num_ranks, batch, micro_batch, gas, success):
        assert dist.get_world_size() == num_ranks, f"The test assumes a world size of {num_ranks}"
        status, ds_config = _run_batch_config(train_batch=batch, micro_batch=micro_batch, gas=gas)
        _batch_assert(status, ds_config, batch, micro_batch, gas, success)
        status, ds_config = _run_batch_config(train_batch=batch, micro_batch=micro_batch)
        _batch_assert(status, ds_config, batch, micro_batch, gas, success)
        if success:
            status, ds_config = _run_batch_config(train_batch=batch, gas=gas)
            _batch_assert(status, ds_config, batch, micro_batch, gas, success)
            status, ds_config = _run_batch_config(micro_batch=micro_batch, gas=gas)
            _batch_assert(status, ds_config, batch, micro_batch, gas, success)
            if gas == 1:
                status, ds_config = _run_batch_config(micro_batch=micro_batch)
                _batch_assert(status, ds_config, batch, micro_batch, gas, success)
                status, ds_config = _run_batch_config(train_batch=batch)
                _batch_assert(status, ds_config, batch, micro_batch, gas, success)
        else:
            status, ds_config = _run_batch_config(gas=gas)
            _batch_assert(status, ds_config, batch, micro_batch, gas, success)
            if gas != 1:
                status, ds_config = _run_batch_config(train_batch=batch, gas=gas)
                _batch_assert(status, ds_config, batch, micro_batch, gas, success)


def test_temp_config_json(tmpdir):
    config_path = create_config_from_dict(tmpdir, {"train_batch_size": 1})
    with open(config_path) as f:
        config_json = json.load(f)
    assert "train_batch_size" in config_json


@pytest.mark.parametrize("value,expected", [
    ("mean", "mean"),
    ("SUM", "sum"),
])
def test_gradient_allreduce_op(value, expected):
    config = DeepSpeedConfig({"train_batch_size": 1, "gradient_allreduce_op": value})
    assert config.gradient_allreduce_op == expected


def test_gradient_allreduce_op_default():
    config = DeepSpeedConfig({"train_batch_size": 1})
    assert config.gradient_allreduce_op == "mean"


def test_invalid_gradient_allreduce_op():
    # DeepSpeed's message: "Invalid gradient_allreduce_op. Supported operations: ..."; flexspeed's
    # names the key, the value and the allowed ones
    with pytest.raises(ValueError, match=r"\[gradient_allreduce_op\] got \"max\"; expected one of 'mean', 'sum'"):
        DeepSpeedConfig({"train_batch_size": 1, "gradient_allreduce_op": "max"})


def test_sum_gradient_allreduce_rejects_zero3():
    with pytest.raises(ValueError, match="not supported with ZeRO stage 3"):
        DeepSpeedConfig({"train_batch_size": 1, "gradient_allreduce_op": "sum", "zero_optimization": {"stage": 3}})


def test_sum_gradient_allreduce_rejects_zenflow():
    # flexspeed has no ZenFlow: the "zenflow" key itself is unknown, and that error comes first
    with pytest.raises(ValueError, match=r"\[zero_optimization.zenflow\] unknown key"):
        DeepSpeedConfig({"train_batch_size": 1, "gradient_allreduce_op": "sum",
                         "zero_optimization": {"stage": 2, "zenflow": {}}})


@pytest.mark.parametrize("zero_stage", [1, 2])
def test_sum_gradient_allreduce_rejects_deepcompile(zero_stage):
    # DeepCompile is refused on its own ("compile" names the fix: torch.compile)
    with pytest.raises(ValueError, match=r"\[compile\] flexspeed does not implement 'compile' \(DeepCompile\)"):
        DeepSpeedConfig({"train_batch_size": 1, "gradient_allreduce_op": "sum", "zero_optimization":
                         {"stage": zero_stage}, "compile": {"deepcompile": True}})


@pytest.mark.parametrize("gather_weights_key",
                         ["stage3_gather_16bit_weights_on_model_save", "stage3_gather_fp16_weights_on_model_save"])
def test_gather_16bit_params_on_model_save(gather_weights_key):
    config = DeepSpeedConfig({"train_batch_size": 1, "zero_optimization": {gather_weights_key: True}}).zero_config
    # DeepSpeedZeroConfig names the field gather_16bit_weights_on_model_save; flexspeed keeps the JSON key
    assert config.stage3_gather_16bit_weights_on_model_save is True


@pytest.mark.parametrize("bf16_key", ["bf16", "bfloat16"])
def test_get_bfloat16_enabled(bf16_key):
    cfg = {bf16_key: {"enabled": True}, "train_batch_size": 1}
    assert DeepSpeedConfig(cfg).bfloat16_enabled is True


def test_quantized_eigenvalue_config_parses(tmpdir):
    # The sections of DeepSpeed's BingBertSquad eigenvalue/quantize config that the test is about.
    # Deliberate difference: both features are DeepSpeed-only and refused when enabled.
    config = {"train_batch_size": 24, "train_micro_batch_size_per_gpu": 3,
              "eigenvalue": {"enabled": True, "verbose": True, "max_iter": 50},
              "quantize_training": {"quantize_bits": {"start_bits": 12, "target_bits": 4},
                                    "quantize_eigenvalue": True}}
    with pytest.raises(DeepSpeedConfigError, match=r"\[(eigenvalue|quantize_training)\] flexspeed does not implement"):
        DeepSpeedConfig(create_config_from_dict(tmpdir, config))


def test_compression_training_without_legacy_quantize_training_uses_defaults():
    config_dict = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "Adam", "params": {"lr": 1e-4}},
                   "compression_training": {"weight_quantization": {"shared_parameters": {"enabled": True},
                                                                    "different_groups": {}}}}
    # Deliberate difference: DeepSpeed Compression is refused when enabled
    with pytest.raises(DeepSpeedConfigError, match=r"\[compression_training\] flexspeed does not implement"):
        DeepSpeedConfig(config_dict)


class TestConfigLoad:
    def test_dict(self, base_config):
        half_precision_section(base_config)
        model = SimpleModel(10)
        model, _, _, _ = deepspeed.initialize(config=base_config, model=model, model_parameters=model.parameters())

    def test_json(self, base_config, tmpdir):
        half_precision_section(base_config)
        config_path = os.path.join(tmpdir, "config.json")
        with open(config_path, "w") as fp:
            json.dump(base_config, fp)
        model = SimpleModel(10)
        model, _, _, _ = deepspeed.initialize(config=config_path, model=model, model_parameters=model.parameters())

    def test_hjson(self, base_config, tmpdir):
        half_precision_section(base_config)
        config_path = os.path.join(tmpdir, "config.json")
        with open(config_path, "w") as fp:
            hjson.dump(base_config, fp)
        model = SimpleModel(10)
        model, _, _, _ = deepspeed.initialize(config=config_path, model=model, model_parameters=model.parameters())


def _train_five(model, hidden_dim=10):
    for batch in random_dataloader(model=model, total_samples=5, hidden_dim=hidden_dim, device=model.device):
        loss = model(batch[0], batch[1])
        model.backward(loss)
        model.step()


class TestDeprecatedDeepScaleConfig:
    def test(self, base_config, tmpdir):
        half_precision_section(base_config)
        config_path = create_config_from_dict(tmpdir, base_config)
        args = argparse.ArgumentParser().parse_args(args="")
        args.deepscale_config = config_path
        args.local_rank = 0
        model = SimpleModel(10)
        model, _, _, _ = deepspeed.initialize(args=args, model=model, model_parameters=model.parameters())
        _train_five(model)


class TestDistInit:
    def test(self, base_config):
        half_precision_section(base_config)
        model = SimpleModel(10)
        model, _, _, _ = deepspeed.initialize(config=base_config, model=model, model_parameters=model.parameters(),
                                              dist_init_required=True)
        _train_five(model)


class TestInitNoOptimizer:
    def test(self, base_config):
        # DeepSpeed skips this on its CPU accelerator (a timeout of its own); it runs here.
        dtype = torch.float
        if get_accelerator().is_fp16_supported():
            dtype = torch.float16
            base_config["fp16"] = {"enabled": True}
        del base_config["optimizer"]
        hidden_dim = 10
        model = SimpleModel(hidden_dim=hidden_dim)
        model, _, _, _ = deepspeed.initialize(config=base_config, model=model)
        data_loader = random_dataloader(model=model, total_samples=5, hidden_dim=hidden_dim, device=model.device,
                                        dtype=dtype)
        for batch in data_loader:
            loss = model(batch[0], batch[1])
            with pytest.raises(AssertionError):
                model.backward(loss)
            with pytest.raises(AssertionError):
                model.step()


class TestArgs:
    def test_none_args(self, base_config):
        half_precision_section(base_config)
        model = SimpleModel(hidden_dim=10)
        model, _, _, _ = deepspeed.initialize(args=None, model=model, config=base_config)
        for batch in random_dataloader(model=model, total_samples=5, hidden_dim=10, device=model.device):
            model(batch[0], batch[1])

    def test_no_args(self, base_config):
        half_precision_section(base_config)
        model = SimpleModel(hidden_dim=10)
        model, _, _, _ = deepspeed.initialize(model=model, config=base_config)
        for batch in random_dataloader(model=model, total_samples=5, hidden_dim=10, device=model.device):
            model(batch[0], batch[1])


class TestNoModel:
    def test(self, base_config):
        half_precision_section(base_config)
        model = SimpleModel(hidden_dim=10)
        with pytest.raises(AssertionError):
            model, _, _, _ = deepspeed.initialize(model=None, config=base_config)
        with pytest.raises(AssertionError):
            model, _, _, _ = deepspeed.initialize(model, config=base_config)
