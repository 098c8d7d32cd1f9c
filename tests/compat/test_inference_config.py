"""Port of DeepSpeed's ``tests/unit/inference/test_inference_config.py``.

Cases: TestInferenceConfig.test_overlap_kwargs, test_overlap_kwargs_conflict, test_kwargs_and_config,
test_json_config, test_moe_backward_compat_bool (True, False).

Plumbing: one process. DeepSpeed's cases call ``init_inference(torch.nn.Module(), ...)`` with
``replace_with_kernel_inject: true``: DeepSpeed injects nothing into an empty module and goes on;
flexspeed refuses kernel injection for a model it has no fused blocks for (deliberate: the error
names the architectures it knows and the fix). The ports assert that error and then DeepSpeed's
assertions on the merged config, which ``init_inference`` builds with ``resolve_inference_config``
(the engine's ``_config``). flexspeed stores ``dtype`` by name (``"fp32"`` for ``torch.float32``).
DeepSpeed's ``DeepSpeedInferenceConfig(moe=...)`` class is flexspeed's ``InferenceConfig``; ``moe``
(``InferenceMoEConfig``) takes a bool as DeepSpeed's does; it is refused when enabled (no MoE
inference: deliberate).
"""

from __future__ import annotations

import pytest
import torch

import flexspeed as deepspeed
from flexspeed.config.errors import ConfigError
from flexspeed.inference.config import InferenceMoEConfig, canonical_dtype, resolve_inference_config
from tests.compat._ds_common import create_config_from_dict

NOT_RECOGNISED = r"\[replace_with_kernel_inject\] replace_with_kernel_inject=True but Module is not a recognised"


class TestInferenceConfig:
    def test_overlap_kwargs(self):
        config = {"replace_with_kernel_inject": True, "dtype": torch.float32}
        kwargs = {"replace_with_kernel_inject": True}
        with pytest.raises(ConfigError, match=NOT_RECOGNISED):
            deepspeed.init_inference(torch.nn.Module(), config=config, **kwargs)
        assert resolve_inference_config(config=config, **kwargs).replace_with_kernel_inject

    def test_overlap_kwargs_conflict(self):
        config = {"replace_with_kernel_inject": True}
        kwargs = {"replace_with_kernel_inject": False}
        with pytest.raises(ValueError):
            deepspeed.init_inference(torch.nn.Module(), config=config, **kwargs)

    def test_kwargs_and_config(self):
        config = {"replace_with_kernel_inject": True}
        kwargs = {"dtype": torch.float32}
        with pytest.raises(ConfigError, match=NOT_RECOGNISED):
            deepspeed.init_inference(torch.nn.Module(), config=config, **kwargs)
        merged = resolve_inference_config(config=config, **kwargs)
        assert merged.replace_with_kernel_inject
        assert merged.dtype == canonical_dtype(kwargs["dtype"]) == "fp32"

    def test_json_config(self, tmpdir):
        config = {"replace_with_kernel_inject": True, "dtype": "torch.float32"}
        config_json = create_config_from_dict(tmpdir, config)
        with pytest.raises(ConfigError, match=NOT_RECOGNISED):
            deepspeed.init_inference(torch.nn.Module(), config=config_json)
        assert resolve_inference_config(config=config_json).replace_with_kernel_inject

    @pytest.mark.parametrize("value", [True, False])
    def test_moe_backward_compat_bool(self, value):
        # DeepSpeed: `moe` accepts a bool (moe: Union[bool, DeepSpeedMoEConfig]) and builds the section
        if value:  # deliberate: MoE inference is refused when enabled
            with pytest.raises(ConfigError, match=r"\[moe\] .*mixture-of-experts inference is not supported"):
                resolve_inference_config(moe=value)
        else:
            config = resolve_inference_config(moe=value)
            assert isinstance(config.moe, InferenceMoEConfig)
            assert config.moe.enabled == value
