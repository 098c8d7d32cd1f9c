"""The ``"tensor_parallel"`` section: DeepSpeed 0.19's automatic tensor-parallel training keys.

Every key DeepSpeed's ``TPTrainingConfig`` accepts is accepted here, so a DeepSpeed config
parses; the ones flexspeed does not implement are refused unless they hold DeepSpeed's default
(a ConfigError naming the key, its value and the fix). What runs is described in
docs/training.md ("Tensor parallelism (training)").
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from flexspeed.config.errors import ConfigError
from flexspeed.config.fields import Bool, Int, NonNegInt, Section, Str

__all__ = ["TensorParallelConfig", "TPInnerConfig", "normalize_tp_dtype"]

_DTYPE_NAMES = {"fp16": "fp16", "float16": "fp16", "half": "fp16", "torch.float16": "fp16",
                "bf16": "bf16", "bfloat16": "bf16", "torch.bfloat16": "bf16",
                "fp32": "fp32", "float32": "fp32", "float": "fp32", "torch.float32": "fp32"}


def normalize_tp_dtype(value: Any) -> str:
    """``torch.bfloat16`` / ``"bf16"`` / ``"bfloat16"`` -> ``"bf16"`` (likewise fp16, fp32)."""
    name = str(value).lower()
    if name not in _DTYPE_NAMES:
        raise ConfigError(f"dtype {value!r} is not one of torch.float16, torch.bfloat16, torch.float32 (or "
                          '"fp16", "bf16", "fp32")', key="tensor_parallel.dtype")
    return _DTYPE_NAMES[name]


class TPInnerConfig(Section):
    """``"tensor_parallel.tp"`` (alias ``tensor_parallel``): DeepSpeed's inference-style TP group settings."""

    tp_size: Int = 1
    """DeepSpeed's inference TP size; training reads ``autotp_size``. Must be 1 or equal to it."""
    tp_grain_size: Int = 1
    """Uneven-partition granularity (DeepSpeed has not activated it in training either); must be 1."""
    mpu: Any = None
    """A Megatron model-parallel unit; not supported (flexspeed builds its groups on DeviceMesh)."""
    tp_group: Any = None
    """A process group; not supported (flexspeed builds its groups on DeviceMesh)."""


class TensorParallelConfig(Section):
    """``"tensor_parallel"``: automatic tensor parallelism in training (DeepSpeed AutoTP's keys)."""

    json_aliases = {"tensor_parallel": "tp", "kernel_inject": "replace_with_kernel_inject"}

    autotp_size: NonNegInt = 0
    """Tensor-parallel degree; 0 or 1 = off. Must divide the world size (data-parallel size = world / autotp_size)."""
    dtype: Str = "fp16"
    """DeepSpeed's model dtype; flexspeed computes in the precision of the ``bf16``/``fp16`` sections and only
    checks this against ``tp_model_init(dtype=...)`` when both are given explicitly."""
    tp_overlap_comm: Bool = False
    """Overlap the all-reduce with compute; not implemented (must be false)."""
    vocab_parallel_lm_head: Bool | None = None
    """Shard the vocabulary of ``lm_head``; not implemented (null or false: ``lm_head`` stays replicated)."""
    vocab_parallel_ce_backend: Literal["torch", "liger"] = "torch"
    """Vocabulary-parallel cross-entropy backend; only ``"torch"`` (nothing is vocabulary-parallel)."""
    tp: TPInnerConfig = Field(default_factory=TPInnerConfig)
    """DeepSpeed's nested TP-group settings (alias ``tensor_parallel``)."""
    injection_policy_tuple: Any = None
    """DeepSpeed's per-class row-layer tuple; not supported in a config (pass ``plan=`` to ``tp_model_init``)."""
    partition_config: dict[str, Any] | None = None
    """DeepSpeed's regex layer specs; not supported (pass ``plan=`` to ``tp_model_init``)."""
    preset_model: Str | None = None
    """DeepSpeed's per-architecture preset; not needed (flexspeed derives the plan from the module tree)."""
    keep_module_on_host: Bool = False
    """DeepSpeed's host-side checkpoint loading for TP; not supported (must be false)."""
    replace_with_kernel_inject: Bool = False
    """Kernel injection (alias ``kernel_inject``); inference only (must be false)."""

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype(cls, value: Any) -> Any:
        return normalize_tp_dtype(value)

    @model_validator(mode="after")
    def _refuse_unimplemented(self) -> TensorParallelConfig:
        fix = "remove the key (or set it to DeepSpeed's default)"
        refuse = {
            "tp_overlap_comm": (self.tp_overlap_comm, "communication overlap is not implemented"),
            "vocab_parallel_lm_head": (self.vocab_parallel_lm_head,
                                       "lm_head and the embeddings stay replicated (no vocabulary-parallel loss)"),
            "vocab_parallel_ce_backend": (self.vocab_parallel_ce_backend != "torch",
                                          "there is no vocabulary-parallel cross-entropy to accelerate"),
            "tp.tp_grain_size": (self.tp.tp_grain_size != 1, "uneven partitioning is not implemented"),
            "tp.mpu": (self.tp.mpu is not None, "flexspeed builds its process groups on DeviceMesh"),
            "tp.tp_group": (self.tp.tp_group is not None, "flexspeed builds its process groups on DeviceMesh"),
            "injection_policy_tuple": (self.injection_policy_tuple is not None,
                                       "give a plan with flexspeed.tp_model_init(model, tp_size, dtype, plan={...})"),
            "partition_config": (self.partition_config is not None,
                                 "give a plan with flexspeed.tp_model_init(model, tp_size, dtype, plan={...})"),
            "preset_model": (self.preset_model is not None,
                             "flexspeed derives the plan from the module tree; remove the key"),
            "keep_module_on_host": (self.keep_module_on_host, "weights are sharded from the model as built"),
            "replace_with_kernel_inject": (self.replace_with_kernel_inject,
                                           "kernel injection is inference-only (flexspeed.init_inference)"),
        }
        for key, (bad, why) in refuse.items():
            if bad:
                value = getattr(self.tp, key[3:]) if key.startswith("tp.") else getattr(self, key)
                raise ConfigError(f"tensor_parallel.{key}={value!r} is not supported by flexspeed's tensor-parallel "
                                  f"training: {why}. Fix: {fix}", key=f"tensor_parallel.{key}")
        if self.tp.tp_size not in (1, self.autotp_size):
            raise ConfigError(f"tensor_parallel.tp.tp_size={self.tp.tp_size} differs from autotp_size="
                              f"{self.autotp_size}; training reads autotp_size. Fix: remove tp.tp_size or make them "
                              "equal", key="tensor_parallel.tp.tp_size")
        return self

    @property
    def size(self) -> int:
        """The tensor-parallel degree (1 when off)."""
        return max(1, int(self.autotp_size))
