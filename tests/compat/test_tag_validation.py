"""Port of DeepSpeed's ``tests/unit/checkpoint/test_tag_validation.py``.

Cases: TestCheckpointValidationTag.test_checkpoint_unique_tag (FAIL, WARN, IGNORE),
TestCheckpointValidationTag.test_checkpoint_unknown_tag_validation, TestSaveCheckpointInvalidDir.
test_save_checkpoint_empty_dir (None, "").

Plumbing: the 2-rank cases run in the session's spawned gloo group (``_ranks.py``); each rank
passes its own tag, as in DeepSpeed.
"""

from __future__ import annotations

import pytest
import torch.distributed as dist

import flexspeed as deepspeed
from tests.compat._ds_common import SimpleModel, args_from_dict
from tests.compat._ranks import expect, rank_case

CONFIG = {"train_batch_size": 2, "steps_per_print": 1, "optimizer": {"type": "Adam", "params": {"lr": 0.00015}}}


def case_checkpoint_unique_tag(tmpdir, valid_mode):
    config_dict = dict(CONFIG, checkpoint={"tag_validation": valid_mode})
    model = SimpleModel(10)
    model, _, _, _ = deepspeed.initialize(config=config_dict, model=model, model_parameters=model.parameters())
    if valid_mode == "FAIL":
        with pytest.raises(AssertionError):
            model.save_checkpoint(save_dir=tmpdir, tag=f"tag-{dist.get_rank()}")
    else:
        model.save_checkpoint(save_dir=tmpdir, tag=f"tag-{dist.get_rank()}")


def case_checkpoint_unknown_tag_validation(tmpdir):
    config_dict = dict(CONFIG, checkpoint={"tag_validation": "foo"})
    args_from_dict(tmpdir, config_dict)
    model = SimpleModel(10)
    with pytest.raises(deepspeed.DeepSpeedConfigError):
        deepspeed.initialize(config=config_dict, model=model, model_parameters=model.parameters())


def case_save_checkpoint_empty_dir(tmpdir, save_dir):
    model = SimpleModel(10)
    model, _, _, _ = deepspeed.initialize(config=dict(CONFIG), model=model, model_parameters=model.parameters())
    with pytest.raises(ValueError):
        model.save_checkpoint(save_dir=save_dir)


MODES = ["FAIL", "WARN", "IGNORE"]
DIRS = [None, ""]
for _mode in MODES:
    rank_case(__name__, f"test_checkpoint_unique_tag[{_mode}]", case_checkpoint_unique_tag, valid_mode=_mode)
rank_case(__name__, "test_checkpoint_unknown_tag_validation", case_checkpoint_unknown_tag_validation)
for _dir in DIRS:
    rank_case(__name__, f"test_save_checkpoint_empty_dir[{_dir!r}]", case_save_checkpoint_empty_dir, save_dir=_dir)


class TestCheckpointValidationTag:
    @pytest.mark.parametrize("valid_mode", MODES)
    def test_checkpoint_unique_tag(self, ranks2, valid_mode):
        expect(ranks2, __name__, f"test_checkpoint_unique_tag[{valid_mode}]")

    def test_checkpoint_unknown_tag_validation(self, ranks2):
        expect(ranks2, __name__, "test_checkpoint_unknown_tag_validation")


class TestSaveCheckpointInvalidDir:
    @pytest.mark.parametrize("save_dir", DIRS)
    def test_save_checkpoint_empty_dir(self, ranks2, save_dir):
        expect(ranks2, __name__, f"test_save_checkpoint_empty_dir[{save_dir!r}]")
