"""Port of DeepSpeed's ``tests/unit/checkpoint/test_other_optimizer.py``.

Cases: TestOtherOptimizerCheckpoint.test_checkpoint_unfused_optimizer (Lamb + OneCycle + clipping),
.test_checkpoint_fused_optimizer, .test_checkpoint_fp32_optimizer.

Plumbing: 2 ranks, in the session's spawned group. fp16 is unsupported on the CPU, so (as in
DeepSpeed's own CPU branch) the runs are fp32. DeepSpeed skips the fused-optimizer case on its CPU
accelerator and the Lamb case where its FusedLamb op is missing; both run here (flexspeed's Lamb
and Adam are PyTorch code).
"""

from __future__ import annotations

import torch

from flexspeed.accelerator import get_accelerator
from tests.compat._ds_checkpoint import checkpoint_correctness_verification
from tests.compat._ds_common import SimpleModel, args_from_dict
from tests.compat._ranks import expect, rank_case

ONE_CYCLE = {"type": "OneCycle", "params": {
    "cycle_first_step_size": 1000, "cycle_first_stair_count": 500, "cycle_second_step_size": 1000,
    "cycle_second_stair_count": 500, "decay_step_size": 1000, "cycle_min_lr": 0.0001, "cycle_max_lr": 0.0010,
    "decay_lr_rate": 0.001, "cycle_min_mom": 0.85, "cycle_max_mom": 0.99, "decay_mom_rate": 0.0}}
ADAM = {"type": "Adam", "params": {"lr": 0.00015, "betas": [0.8, 0.999], "eps": 1e-8, "weight_decay": 3e-7}}


def _both_ways(config_dict, tmpdir, dtype):
    args_from_dict(tmpdir, config_dict)
    models = [SimpleModel(10, empty_grad=False) for _ in range(2)]
    # Load & verify optimizer states
    checkpoint_correctness_verification(config_dict, models=models, hidden_dim=10, tmpdir=tmpdir,
                                        load_optimizer_states=True, dtype=dtype)
    # Ignore optimizer states
    checkpoint_correctness_verification(config_dict, models=models, hidden_dim=10, tmpdir=tmpdir,
                                        load_optimizer_states=False, dtype=dtype)


def case_checkpoint_unfused_optimizer(tmpdir):
    config_dict = {"train_batch_size": 2, "steps_per_print": 1, "optimizer": {"type": "Lamb", "params": {"lr": 0.00015}},
                   "gradient_clipping": 1.0, "scheduler": ONE_CYCLE}
    dtype = torch.float
    if get_accelerator().is_fp16_supported():
        config_dict["fp16"] = {"enabled": True}
        dtype = torch.float16
    _both_ways(config_dict, tmpdir, dtype)


def case_checkpoint_fused_optimizer(tmpdir):
    config_dict = {"train_batch_size": 2, "steps_per_print": 1, "optimizer": ADAM}
    dtype = torch.float
    if get_accelerator().is_fp16_supported():
        config_dict["fp16"] = {"enabled": True}
        dtype = torch.float16
    _both_ways(config_dict, tmpdir, dtype)


def case_checkpoint_fp32_optimizer(tmpdir):
    config_dict = {"train_batch_size": 2, "steps_per_print": 1, "optimizer": ADAM, "fp16": {"enabled": False}}
    args_from_dict(tmpdir, config_dict)
    models = [SimpleModel(10, empty_grad=False) for _ in range(2)]
    checkpoint_correctness_verification(config_dict, models=models, hidden_dim=10, tmpdir=tmpdir,
                                        dtype=torch.float32)


for _name, _fn in (("test_checkpoint_unfused_optimizer", case_checkpoint_unfused_optimizer),
                   ("test_checkpoint_fused_optimizer", case_checkpoint_fused_optimizer),
                   ("test_checkpoint_fp32_optimizer", case_checkpoint_fp32_optimizer)):
    rank_case(__name__, _name, _fn)


class TestOtherOptimizerCheckpoint:
    def test_checkpoint_unfused_optimizer(self, ranks2):
        expect(ranks2, __name__, "test_checkpoint_unfused_optimizer")

    def test_checkpoint_fused_optimizer(self, ranks2):
        expect(ranks2, __name__, "test_checkpoint_fused_optimizer")

    def test_checkpoint_fp32_optimizer(self, ranks2):
        expect(ranks2, __name__, "test_checkpoint_fp32_optimizer")
