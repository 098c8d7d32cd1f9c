"""Port of DeepSpeed's ``tests/unit/checkpoint/test_latest_checkpoint.py``.

Cases: TestLatestCheckpoint.test_existing_latest, TestLatestCheckpoint.test_missing_latest.

Plumbing: world size 1, in this process (DeepSpeed skips the file where its FusedAdam op is not
built; flexspeed has no ops to build). A load without ``latest`` returns ``(None, None)`` as in
DeepSpeed, and flexspeed also warns that there was nothing to load.
"""

from __future__ import annotations

import pytest
import torch

import flexspeed as deepspeed
from tests.compat._ds_checkpoint import checkpoint_correctness_verification
from tests.compat._ds_common import SimpleModel, destroy_group


@pytest.fixture(autouse=True)
def _clean_group():
    yield
    destroy_group()


CONFIG = {"train_batch_size": 2, "steps_per_print": 1, "optimizer": {"type": "Adam", "params": {"lr": 0.00015}}}


class TestLatestCheckpoint:
    def test_existing_latest(self, tmpdir):
        hidden_dim = 10
        models = [SimpleModel(hidden_dim=hidden_dim) for _ in range(2)]
        checkpoint_correctness_verification(config_dict=dict(CONFIG), models=models, hidden_dim=hidden_dim,
                                            tmpdir=tmpdir, load_optimizer_states=True, load_lr_scheduler_states=False,
                                            empty_tag=True, dtype=torch.float)

    def test_missing_latest(self, tmpdir):
        model = SimpleModel(10)
        model, _, _, _ = deepspeed.initialize(config=dict(CONFIG), model=model, model_parameters=model.parameters())
        # should be no-op, since latest doesn't exist
        with pytest.warns(UserWarning, match="no 'latest' file"):
            assert model.load_checkpoint(tmpdir) == (None, None)
