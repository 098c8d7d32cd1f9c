"""``deepspeed.moe``: the names scripts import even when they run no mixture-of-experts layer.

flexspeed has no MoE layers: ``deepspeed.moe.layer.MoE`` raises with the fix, and
``split_params_into_different_moe_groups_for_optimizer`` (which DeepSpeedExamples' CIFAR script
imports unconditionally) returns the parameter groups unchanged, as DeepSpeed's does for a model
without expert parameters.
"""

from __future__ import annotations

from flexspeed.moe import layer, utils

__all__ = ["layer", "utils"]
