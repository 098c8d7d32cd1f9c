"""Port of DeepSpeed's ``tests/unit/checkpoint/test_shared_weights.py``.

Cases: TestCheckpointSharedWeights.test_checkpoint_shared_weights.

Plumbing: 2 ranks, in the session's spawned group. The checkpoint is flexspeed's, read back by
``flexspeed.utils.zero_to_fp32`` (DeepSpeed's reads its own format).
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

import flexspeed as deepspeed
from flexspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from tests.compat._ranks import expect, rank_case


class ModelWithSharedWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer0 = nn.Linear(100, 100)
        self.layer1 = nn.Linear(200, 200)
        self.layer2 = nn.Linear(300, 300)
        # tie layer 1 and layer 2
        self.layer1.weight = self.layer2.weight


def case_checkpoint_shared_weights(tmpdir):
    config = {"train_micro_batch_size_per_gpu": 2, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": 2}}
    model = ModelWithSharedWeights()
    optimizer = torch.optim.Adam(model.parameters())
    deepspeed_engine, _, _, _ = deepspeed.initialize(config=config, model=model, optimizer=optimizer)
    filename = os.path.join(tmpdir, "checkpoint.pt")
    deepspeed_engine.save_checkpoint(filename, tag="checkpoint")
    model = ModelWithSharedWeights()
    state_dict = get_fp32_state_dict_from_zero_checkpoint(filename, tag="checkpoint")
    model.load_state_dict(state_dict, strict=True)


rank_case(__name__, "test_checkpoint_shared_weights", case_checkpoint_shared_weights)


class TestCheckpointSharedWeights:
    def test_checkpoint_shared_weights(self, ranks2):
        expect(ranks2, __name__, "test_checkpoint_shared_weights")
