"""Port of DeepSpeed's ``tests/unit/runtime/test_ds_config_model.py``.

Cases: test_only_required_fields, test_config_duplicate_key (ported); test_config_base,
test_config_base_deprecatedfield, test_config_base_aliasfield, test_config_base_literalfail (3),
test_config_base_deprecatedfail (not applicable: they test ``DeepSpeedConfigModel``, the pydantic base
class of DeepSpeed's own config sections, through a class the test defines; flexspeed's sections have
their own base, ``flexspeed.config.fields.Section``, which is not part of the DeepSpeed surface).
"""

from __future__ import annotations

import json
import os

import pytest

from flexspeed.runtime import config as ds_config


def test_only_required_fields(tmpdir):
    """Ensure that config containing only the required fields is accepted."""
    cfg_json = tmpdir.mkdir("ds_config_unit_test").join("minimal.json")
    with open(cfg_json, "w") as f:
        json.dump({"train_batch_size": 64}, f)
    run_cfg = ds_config.DeepSpeedConfig(str(cfg_json))
    assert run_cfg is not None
    assert run_cfg.train_batch_size == 64
    assert run_cfg.train_micro_batch_size_per_gpu == 64
    assert run_cfg.gradient_accumulation_steps == 1


def test_config_duplicate_key(tmpdir):
    config_dict = """
    {
        "train_batch_size": 24,
        "train_batch_size": 24,
    }
    """
    config_path = os.path.join(tmpdir, "temp_config.json")
    with open(config_path, "w") as jf:
        jf.write(config_dict)
    with pytest.raises(ValueError):
        ds_config.DeepSpeedConfig(config_path)
