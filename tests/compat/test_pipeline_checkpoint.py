"""Port of DeepSpeed's ``tests/unit/checkpoint/test_pipeline.py``.

Cases: TestPipelineCheckpoint.test_checkpoint_pipe_engine (stages 0, 1). DeepSpeed's
test_checkpoint_pipe_module has an empty parameter list (every topology pair is commented out): no case.

Plumbing: 4 ranks (2 pipeline stages x 2 data-parallel replicas), in the session's spawned 4-rank
group; ``slow``. DeepSpeed enables fp16 at stage 1; on this CPU-only run flexspeed runs it too
(CPU autocast has float16). Its one micro-batch per step over two stages is a ConfigError under
flexspeed's default 1F1B schedule (deliberate); the round trip then runs with the fix the error
names, ``pipeline.schedule: "gpipe"``.
"""

from __future__ import annotations

import pytest
import torch

import flexspeed as deepspeed
from flexspeed.runtime.config import DeepSpeedConfigError

from tests.compat._ds_checkpoint import checkpoint_correctness_verification
from tests.compat._ds_common import LinearStackPipe
from tests.compat._ranks import expect, rank_case

ONE_CYCLE = {"type": "OneCycle", "params": {
    "cycle_first_step_size": 1000, "cycle_first_stair_count": 500, "cycle_second_step_size": 1000,
    "cycle_second_stair_count": 500, "decay_step_size": 1000, "cycle_min_lr": 0.0001, "cycle_max_lr": 0.0010,
    "decay_lr_rate": 0.001, "cycle_min_mom": 0.85, "cycle_max_mom": 0.99, "decay_mom_rate": 0.0}}


def case_checkpoint_pipe_engine(tmpdir, zero_stage):
    config_dict = {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "steps_per_print": 1,
                   "optimizer": {"type": "Adam", "params": {"lr": 1e-5}}, "zero_optimization": {"stage": zero_stage},
                   "fp16": {"enabled": zero_stage > 0}, "scheduler": ONE_CYCLE}
    models = [LinearStackPipe(num_stages=2) for _ in range(2)]
    # Deliberate difference: one micro-batch per step over two stages is refused under the default 1F1B
    # schedule (torch's Schedule1F1B needs one per stage); the error names the fix, which the round trip
    # then takes
    with pytest.raises(DeepSpeedConfigError, match=r"\[gradient_accumulation_steps\] pipeline.schedule='1f1b' "
                                                   r"needs at least one micro-batch per stage"):
        deepspeed.initialize(config=config_dict, model=models[0], model_parameters=models[0].parameters())
    config_dict["pipeline"] = {"schedule": "gpipe"}
    models = [LinearStackPipe(num_stages=2) for _ in range(2)]
    checkpoint_correctness_verification(config_dict=config_dict, models=models, hidden_dim=models[0].hidden_dim,
                                        tmpdir=tmpdir, load_optimizer_states=True, load_lr_scheduler_states=True,
                                        train_batch=True, dtype=torch.float16 if zero_stage > 0 else torch.float32)


for _s in (0, 1):
    rank_case(__name__, f"test_checkpoint_pipe_engine[{_s}]", case_checkpoint_pipe_engine, world_size=4, slow=True,
              zero_stage=_s)


@pytest.mark.slow
class TestPipelineCheckpoint:
    @pytest.mark.parametrize("zero_stage", [0, 1])
    def test_checkpoint_pipe_engine(self, ranks4, zero_stage):
        expect(ranks4, __name__, f"test_checkpoint_pipe_engine[{zero_stage}]")
