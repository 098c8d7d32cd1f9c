"""Port of DeepSpeed's ``tests/unit/runtime/test_data_efficiency.py``.

Cases: TestDataEfficiency.test_curriculum_learning, TestLegacyCurriculumScheduler.test_fixed_discrete /
test_fixed_linear, each for bf16 and fp16 (fp16 skipped as in DeepSpeed's CPU run: unsupported dtype).

Deliberate difference, all three: DeepSpeed's data-efficiency library and its legacy curriculum
scheduler are not implemented; ``data_efficiency`` / ``curriculum_learning`` enabled is a
ConfigError naming the section and the fix, and the Megatron-style ``mpu=`` these tests pass is
refused with its own error. DeepSpeed skips the three on its CPU accelerator; flexspeed's answer
does not depend on the device, so they run here (one rank: the errors come before any collective).
"""

from __future__ import annotations

import pytest
import torch

import flexspeed as deepspeed
from flexspeed.accelerator import get_accelerator
from flexspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError
from tests.compat._ds_common import SimpleModel, destroy_group, random_dataset


@pytest.fixture(autouse=True)
def _clean_group():
    yield
    destroy_group()


class MPU:
    """DeepSpeed's test MPU: tensor-parallel groups of ``tp_world_size`` consecutive ranks."""

    def __init__(self, tp_world_size):
        self.rank = deepspeed.comm.get_rank()
        self.world_size = deepspeed.comm.get_world_size()
        self.tp_world_size = tp_world_size

    def get_model_parallel_rank(self):
        return self.rank % self.tp_world_size

    def get_model_parallel_world_size(self):
        return self.tp_world_size

    def get_data_parallel_rank(self):
        return self.rank // self.tp_world_size

    def get_data_parallel_world_size(self):
        return self.world_size // self.tp_world_size


def _base(dtype):
    config = {"train_batch_size": 1, "steps_per_print": 1,
              "optimizer": {"type": "Adam", "params": {"lr": 0.00015, "weight_decay": 0.01}}, "gradient_clipping": 1.0}
    if dtype == torch.float16:
        config["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 8}
    else:
        config["bf16"] = {"enabled": True}
    return config


def _skip_unsupported(dtype):
    if dtype not in get_accelerator().supported_dtypes():
        pytest.skip(f"This test does not support {dtype=}.")


def _refused(config_dict, section, dtype, *, mpu):
    """The section is refused by the config (as initialize() reads it), and the script's mpu= too."""
    with pytest.raises(DeepSpeedConfigError, match=rf"\[{section}\] flexspeed does not implement"):
        DeepSpeedConfig(config_dict)
    model = SimpleModel(10)
    dataset = random_dataset(20, 10, torch.device("cpu"), dtype=dtype)
    with pytest.raises(DeepSpeedConfigError, match=rf"\[{section}\] flexspeed does not implement"):
        deepspeed.initialize(config=config_dict, model=model, training_data=dataset,
                             model_parameters=model.parameters())
    if mpu:
        deepspeed.init_distributed()
        with pytest.raises(ValueError, match=r"mpu= .*not supported"):
            deepspeed.initialize(config=config_dict, model=model, training_data=dataset,
                                 model_parameters=model.parameters(), mpu=MPU(1))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
class TestDataEfficiency:
    def test_curriculum_learning(self, dtype):
        _skip_unsupported(dtype)
        config_dict = _base(dtype)
        config_dict["data_efficiency"] = {
            "enabled": True, "seed": 1234,
            "data_sampling": {"enabled": True, "num_workers": 0, "curriculum_learning": {
                "enabled": True, "data_cluster_path": "/tmp", "curriculum_metrics": {"dummy_metric": {
                    "index_to_sample_path": "dummy", "index_to_metric_path": "dummy", "difficulty_type": "value",
                    "clustering_type": "single_cluster", "min_difficulty": 2, "max_difficulty": 10,
                    "schedule_type": "fixed_root",
                    "schedule_config": {"total_curriculum_step": 8, "difficulty_step": 2, "root_degree": 1}}}}}}
        _refused(config_dict, "data_efficiency", dtype, mpu=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
class TestLegacyCurriculumScheduler:
    def test_fixed_discrete(self, dtype):
        _skip_unsupported(dtype)
        config_dict = _base(dtype)
        config_dict["curriculum_learning"] = {
            "enabled": True, "curriculum_type": "seqlen", "min_difficulty": 1, "max_difficulty": 5,
            "schedule_type": "fixed_discrete", "schedule_config": {"difficulty": [1, 2, 3, 4, 5], "max_step": [2, 4, 6, 8]}}
        _refused(config_dict, "curriculum_learning", dtype, mpu=False)

    def test_fixed_linear(self, dtype):
        _skip_unsupported(dtype)
        config_dict = _base(dtype)
        config_dict["curriculum_learning"] = {
            "enabled": True, "curriculum_type": "seqlen", "min_difficulty": 2, "max_difficulty": 10,
            "schedule_type": "fixed_linear", "schedule_config": {"total_curriculum_step": 8, "difficulty_step": 2}}
        _refused(config_dict, "curriculum_learning", dtype, mpu=False)
