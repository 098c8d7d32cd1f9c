"""Port of DeepSpeed's ``tests/unit/checkpoint/test_lr_scheduler.py``.

Cases: TestLRSchedulerCheckpoint.test_checkpoint_lr_scheduler and .test_checkpoint_no_lr_scheduler, each
for (stage, cpu_offload) = (0, False), (1, False), (2, False), (2, True), (3, False), (3, True).

Plumbing: the 2-rank cases of this file run in one spawned gloo group (``_ranks.py``). DeepSpeed
skips the whole class on its CPU accelerator; it runs here, with bf16 as DeepSpeed's CPU branch
picks. ``cpu_offload`` on a CPU-only run: flexspeed says once that it has no effect.
"""

from __future__ import annotations

import pytest

import flexspeed as deepspeed
from tests.compat._ds_checkpoint import checkpoint_correctness_verification
from tests.compat._ranks import expect, rank_case
from tests.compat._ds_common import SimpleModel, half_precision_section

PARAMS = [(0, False), (1, False), (2, False), (2, True), (3, False), (3, True)]


def _config(zero_stage, use_cpu_offload, optimizer_params):
    config = {"train_batch_size": 2, "steps_per_print": 1, "optimizer": {"type": "Adam", "params": optimizer_params},
              "zero_optimization": {"stage": zero_stage, "cpu_offload": use_cpu_offload},
              "scheduler": {"type": "WarmupLR",
                            "params": {"warmup_min_lr": 0, "warmup_max_lr": 0.001, "warmup_num_steps": 1000}}}
    return half_precision_section(config)


def _models(config_dict, zero_stage, hidden_dim=10):
    if zero_stage == 3:
        with deepspeed.zero.Init(config_dict_or_path=config_dict):
            return [SimpleModel(hidden_dim, empty_grad=False) for _ in range(2)]
    return [SimpleModel(hidden_dim, empty_grad=False) for _ in range(2)]


def case_checkpoint_lr_scheduler(tmpdir, zero_stage, use_cpu_offload):
    config_dict = _config(zero_stage, use_cpu_offload,
                          {"lr": 0.00015, "betas": [0.8, 0.999], "eps": 1e-8, "weight_decay": 3e-7})
    checkpoint_correctness_verification(config_dict, _models(config_dict, zero_stage), 10, tmpdir,
                                        load_optimizer_states=False, load_lr_scheduler_states=True)


def case_checkpoint_no_lr_scheduler(tmpdir, zero_stage, use_cpu_offload):
    config_dict = _config(zero_stage, use_cpu_offload, {"lr": 1e-5})
    trained, loaded = checkpoint_correctness_verification(config_dict, _models(config_dict, zero_stage), 10, tmpdir,
                                                          load_optimizer_states=False, load_lr_scheduler_states=False)
    # the fresh engine's scheduler keeps its own position when its state is not loaded
    assert loaded.lr_scheduler.last_batch_iteration != trained.lr_scheduler.last_batch_iteration


def _case_id(name, stage, offload):
    return f"{name}[{stage}-{offload}]"


for _stage, _offload in PARAMS:
    for _name, _fn in (("test_checkpoint_lr_scheduler", case_checkpoint_lr_scheduler),
                       ("test_checkpoint_no_lr_scheduler", case_checkpoint_no_lr_scheduler)):
        rank_case(__name__, _case_id(_name, _stage, _offload), _fn, zero_stage=_stage, use_cpu_offload=_offload)


@pytest.mark.parametrize("zero_stage, use_cpu_offload", PARAMS)
class TestLRSchedulerCheckpoint:
    def test_checkpoint_lr_scheduler(self, ranks2, zero_stage, use_cpu_offload):
        expect(ranks2, __name__, _case_id("test_checkpoint_lr_scheduler", zero_stage, use_cpu_offload))

    def test_checkpoint_no_lr_scheduler(self, ranks2, zero_stage, use_cpu_offload):
        expect(ranks2, __name__, _case_id("test_checkpoint_no_lr_scheduler", zero_stage, use_cpu_offload))
