"""One pydantic model per section of a DeepSpeed ``ds_config.json``.

Attribute names are the JSON keys, so code reads ``cfg.zero_optimization.stage``. Defaults are
DeepSpeed's documented defaults. Fields typed ``... | Auto`` accept ``"auto"``, which
:func:`flexspeed.config.resolve_config` replaces (see ``docs/config.md`` for the table).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from flexspeed.config.errors import ConfigError
from flexspeed.config.fields import (
    Auto,
    Bool,
    Dtype,
    Float,
    Int,
    NonNegFloat,
    NonNegInt,
    PosFloat,
    PosInt,
    Section,
    Str,
)

__all__ = [
    "NonFiniteConfig",
    "OptimizerConfig",
    "SchedulerConfig",
    "Fp16Config",
    "Bf16Config",
    "OffloadOptimizerConfig",
    "OffloadParamConfig",
    "ZeroConfig",
    "ActivationCheckpointingConfig",
    "FlopsProfilerConfig",
    "TensorBoardConfig",
    "CsvMonitorConfig",
    "WandbConfig",
    "ParallelWriteConfig",
    "CheckpointConfig",
    "DataTypesConfig",
    "PipelineConfig",
    "ThroughputTimerConfig",
    "TimersConfig",
]

OffloadDevice = Literal["none", "cpu", "nvme"]


class OptimizerConfig(Section):
    """``"optimizer"``: which optimizer the engine builds and its constructor arguments."""

    type: Str | None = None
    """Optimizer name, e.g. ``"AdamW"``, ``"Adam"``, ``"SGD"``, ``"Lamb"`` (case-insensitive)."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for the optimizer (``lr``, ``betas``, ``eps``, ``weight_decay``...)."""
    legacy_fusion: Bool = False
    """DeepSpeed's legacy fused-optimizer switch; accepted, has no effect in flexspeed."""


class SchedulerConfig(Section):
    """``"scheduler"``: the learning-rate schedule, stepped on optimizer steps."""

    type: Str | None = None
    """Scheduler name: ``WarmupLR``, ``WarmupDecayLR``, ``WarmupCosineLR``, ``OneCycle``, ``LRRangeTest``."""
    params: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for the scheduler (``warmup_num_steps``, ``total_num_steps``...)."""


class Fp16Config(Section):
    """``"fp16"``: float16 mixed precision with dynamic (or static) loss scaling."""

    enabled: Bool | Auto = False
    """Train in float16 with fp32 master weights; ``"auto"`` resolves to false."""
    auto_cast: Bool = False
    """Cast the model's floating-point inputs to float16 in forward."""
    loss_scale: NonNegFloat = 0.0
    """Static loss scale; 0 selects dynamic loss scaling."""
    initial_scale_power: Annotated[Int, Field(ge=0, le=64)] = 16
    """Dynamic loss scaling starts at ``2 ** initial_scale_power`` (at most 2**64: a larger scale overflows
    every fp16 gradient, and each overflow only halves it)."""
    loss_scale_window: PosInt = 1000
    """Steps without overflow before the dynamic loss scale is doubled."""
    hysteresis: PosInt = 2
    """Overflows tolerated before the dynamic loss scale is halved."""
    consecutive_hysteresis: Bool = False
    """Refill the hysteresis budget after every step without overflow."""
    min_loss_scale: PosFloat = 1.0
    """The dynamic loss scale never drops below this."""
    fp16_master_weights_and_grads: Bool = False
    """Keep master weights and gradients in fp16 (DeepSpeed ZeRO-Offload experiment)."""


class NonFiniteConfig(Section):
    """``"flexspeed_nonfinite"`` (a flexspeed extension; DeepSpeed has no such key): what an fp32/bf16
    optimizer step with a non-finite (inf/NaN) global gradient norm does. fp16 has its loss scaler."""

    action: Literal["skip", "raise", "off"] = "skip"
    """``skip``: no optimizer/scheduler step, counted in ``skipped_steps`` and warned with the step;
    ``raise``: raise at the first one; ``off``: step anyway (DeepSpeed's behaviour: the weights turn NaN)."""
    max_consecutive_skips: PosInt = 10
    """With ``skip``: raise when this many optimizer steps in a row were non-finite."""


class DistributedConfig(Section):
    """``"flexspeed_distributed"`` (a flexspeed extension; DeepSpeed has no such section): how long a
    collective may wait, and the heartbeat that names a rank which stopped answering."""

    timeout_minutes: Annotated[Float, Field(ge=0.001, le=525600)] | None = None
    """Process-group timeout in minutes (fractions allowed), used when flexspeed starts the group.
    Precedence: ``init_distributed(timeout=)`` > this key > ``DEEPSPEED_TIMEOUT`` > 10 minutes."""
    heartbeat_interval: Annotated[Float, Field(ge=0, le=3600)] = 2.0
    """Seconds between heartbeats (each rank publishes what it is doing); 0 turns the heartbeat off."""


class Bf16Config(Section):
    """``"bf16"`` (alias ``"bfloat16"``): bfloat16 mixed precision, no loss scaling."""

    enabled: Bool | Auto = False
    """Train in bfloat16 with fp32 master weights; ``"auto"`` resolves to false."""
    immediate_grad_update: Bool = False
    """Apply gradients to the master weights as soon as they are reduced."""
    check_grad_overflow: Bool = False
    """Skip the optimizer step (and count it in ``skipped_steps``) when a gradient is inf/NaN, as fp16 does."""


class OffloadOptimizerConfig(Section):
    """``"zero_optimization.offload_optimizer"``: where optimizer state lives (ZeRO-Offload)."""

    device: OffloadDevice = "none"
    """``"none"``, ``"cpu"`` or ``"nvme"`` (nvme is not supported by flexspeed yet)."""
    nvme_path: Str | None = None
    """Directory for NVMe offload files."""
    buffer_count: PosInt = 4
    """Number of NVMe I/O buffers for optimizer state."""
    pin_memory: Bool = False
    """Use page-locked CPU memory for offloaded state (faster copies, less pageable memory)."""
    pipeline_read: Bool = False
    """Overlap NVMe reads of optimizer state with computation."""
    pipeline_write: Bool = False
    """Overlap NVMe writes of optimizer state with computation."""
    fast_init: Bool = False
    """Speed up optimizer initialization when offloading to NVMe."""
    ratio: Float = Field(default=1.0, ge=0.0, le=1.0)
    """Fraction of optimizer state updated on the CPU (partial offload), in [0, 1]."""


class OffloadParamConfig(Section):
    """``"zero_optimization.offload_param"``: where parameters live (ZeRO-3 only)."""

    device: OffloadDevice = "none"
    """``"none"``, ``"cpu"`` or ``"nvme"`` (nvme is not supported by flexspeed yet)."""
    nvme_path: Str | None = None
    """Directory for NVMe offload files."""
    buffer_count: PosInt = 5
    """Number of NVMe I/O buffers for parameters."""
    buffer_size: PosInt = 100_000_000
    """Size in elements of each NVMe parameter buffer."""
    max_in_cpu: NonNegInt = 1_000_000_000
    """Parameter elements kept in CPU memory when offloading to NVMe."""
    pin_memory: Bool = False
    """Use page-locked CPU memory for offloaded parameters."""


class ZeroConfig(Section):
    """``"zero_optimization"``: ZeRO partitioning of optimizer state, gradients and parameters."""

    json_aliases = {
        "stage3_gather_fp16_weights_on_model_save": "stage3_gather_16bit_weights_on_model_save",
    }

    stage: Literal[0, 1, 2, 3] = 0
    """0: replicate; 1: shard optimizer state; 2: + gradients; 3: + parameters."""
    contiguous_gradients: Bool = True
    """Copy gradients into one contiguous buffer as they are produced."""
    overlap_comm: Bool = False
    """Overlap gradient reduction with the backward pass."""
    reduce_scatter: Bool = True
    """Reduce gradients with reduce-scatter rather than all-reduce."""
    reduce_bucket_size: PosInt | Auto = 500_000_000
    """Elements reduced at a time; ``"auto"`` = hidden_size * hidden_size."""
    allgather_partitions: Bool = True
    """Gather updated parameters with all-gather rather than broadcasts."""
    allgather_bucket_size: PosInt = 500_000_000
    """Elements all-gathered at a time."""
    round_robin_gradients: Bool = False
    """Stage 1/2 with offload: spread gradient copies across ranks in round-robin order."""
    offload_optimizer: OffloadOptimizerConfig | None = None
    """Optimizer-state offload (stage >= 1)."""
    offload_param: OffloadParamConfig | None = None
    """Parameter offload (stage 3 only)."""
    sub_group_size: PosInt = 1_000_000_000
    """Stage 3: parameters are updated in groups of this many elements."""
    stage3_max_live_parameters: NonNegInt = 1_000_000_000
    """Stage 3: most parameter elements kept gathered per rank at once."""
    stage3_max_reuse_distance: NonNegInt = 1_000_000_000
    """Stage 3: keep a gathered parameter if it is reused within this many elements."""
    stage3_prefetch_bucket_size: NonNegInt | Auto = 50_000_000
    """Stage 3: elements prefetched ahead of use; ``"auto"`` = 0.9 * hidden_size ** 2."""
    stage3_param_persistence_threshold: NonNegInt | Auto = 100_000
    """Stage 3: parameters smaller than this stay unpartitioned; ``"auto"`` = 10 * hidden_size."""
    stage3_model_persistence_threshold: NonNegInt = 2**63 - 1
    """Stage 3: cap on the total elements of unpartitioned (persistent) parameters."""
    stage3_gather_16bit_weights_on_model_save: Bool = False
    """Stage 3: gather full 16-bit weights when saving the model (alias ``..._fp16_...``)."""
    elastic_checkpoint: Bool = False
    """Save optimizer state so it can be loaded at another world size."""
    ignore_unused_parameters: Bool = True
    """Stage 3: tolerate parameters that receive no gradient."""
    legacy_stage1: Bool = False
    """Use DeepSpeed's legacy stage-1 implementation; accepted, has no effect."""
    load_from_fp32_weights: Bool = True
    """Restore master weights from the checkpoint's fp32 copy rather than the 16-bit model."""
    zero_hpz_partition_size: PosInt = 1
    """ZeRO++ hierarchical partitioning: secondary shard group size (1 = off)."""
    zero_quantized_weights: Bool = False
    """ZeRO++: quantize weights for all-gather."""
    zero_quantized_nontrainable_weights: Bool = False
    """ZeRO++: keep frozen weights quantized."""
    zero_quantized_gradients: Bool = False
    """ZeRO++: quantize gradients for reduce-scatter."""
    mics_shard_size: Int = -1
    """MiCS: shard parameters within groups of this many ranks (-1 = off)."""
    mics_hierarchical_params_gather: Bool = False
    """MiCS: gather parameters hierarchically across nodes."""
    memory_efficient_linear: Bool = True
    """Stage 3: use the memory-efficient linear autograd function."""
    pipeline_loading_checkpoint: Bool = False
    """Stage 3: load checkpoint shards pipelined with partitioning."""
    override_module_apply: Bool = True
    """Stage 3: gather parameters around ``nn.Module.apply``."""
    cpu_offload: Bool = False
    """Deprecated: same as ``"offload_optimizer": {"device": "cpu"}``."""
    cpu_offload_param: Bool = False
    """Deprecated: same as ``"offload_param": {"device": "cpu"}``."""
    cpu_offload_use_pin_memory: Bool = False
    """Deprecated: same as ``"pin_memory": true`` in the offload sections."""


class ActivationCheckpointingConfig(Section):
    """``"activation_checkpointing"``: recompute activations in backward to save memory."""

    partition_activations: Bool = False
    """Shard checkpointed activations across model-parallel ranks."""
    cpu_checkpointing: Bool = False
    """Offload checkpointed activations to CPU memory."""
    contiguous_memory_optimization: Bool = False
    """Copy checkpointed activations into one contiguous buffer."""
    number_checkpoints: PosInt | None = None
    """Number of checkpoints (needed for contiguous_memory_optimization)."""
    synchronize_checkpoint_boundary: Bool = False
    """Synchronize the device at each checkpoint boundary."""
    profile: Bool = False
    """Time the forward and backward of each checkpointed region."""


class FlopsProfilerConfig(Section):
    """``"flops_profiler"``: count FLOPs and parameters per module at one step."""

    enabled: Bool = False
    """Run the profiler."""
    recompute_fwd_factor: NonNegFloat = 0.0
    """Extra forward FLOPs from activation recomputation, as a fraction of forward."""
    profile_step: PosInt = 1
    """Training step at which to profile."""
    module_depth: Int = -1
    """Depth of the module tree to print (-1 = all)."""
    top_modules: PosInt = 1
    """Number of top modules to list by cost."""
    detailed: Bool = True
    """Print the per-module breakdown."""
    output_file: Str | None = None
    """Write the report here instead of stdout."""


class TensorBoardConfig(Section):
    """``"tensorboard"``: write training scalars as TensorBoard events."""

    enabled: Bool = False
    """Write TensorBoard events."""
    output_path: Str = ""
    """Directory for the event files."""
    job_name: Str = "DeepSpeedJobName"
    """Subdirectory name of this run."""


class CsvMonitorConfig(Section):
    """``"csv_monitor"``: write training scalars as CSV files."""

    enabled: Bool = False
    """Write CSV files."""
    output_path: Str = ""
    """Directory for the CSV files."""
    job_name: Str = "DeepSpeedJobName"
    """Subdirectory name of this run."""


class WandbConfig(Section):
    """``"wandb"``: log training scalars to Weights & Biases."""

    enabled: Bool = False
    """Log to Weights & Biases."""
    group: Str | None = None
    """W&B run group."""
    team: Str | None = None
    """W&B team (entity)."""
    project: Str = "deepspeed"
    """W&B project."""


class ParallelWriteConfig(Section):
    """``"checkpoint.parallel_write"``: how checkpoint files are written in parallel."""

    pipeline_stage: Bool = False
    """Each pipeline stage writes its own part of the checkpoint."""


class CheckpointConfig(Section):
    """``"checkpoint"``: checkpoint tags, formats and writing."""

    tag_validation: Literal["Ignore", "Warn", "Fail"] = "Warn"
    """What to do when ranks save with different tags (case-insensitive)."""
    load_universal: Bool = False
    """Load a universal (world-size independent) checkpoint."""
    use_node_local_storage: Bool = False
    """Each node writes to its local disk (not a shared file system)."""
    parallel_write: ParallelWriteConfig = Field(default_factory=ParallelWriteConfig)
    """Parallel checkpoint writing options."""
    save_dir: Str | None = None
    """(flexspeed extension) Where the engine saves every ``save_interval`` steps and resumes from."""
    save_interval: Annotated[Int, Field(ge=1, le=2**31 - 1)] | None = None
    """(flexspeed extension) Save a ``global_step<N>`` tag into ``save_dir`` every this many optimizer steps."""
    keep_last: Annotated[Int, Field(ge=1, le=2**31 - 1)] | None = None
    """(flexspeed extension) Keep only the newest this many ``global_step<N>`` tags of ``save_dir`` (older ones
    are removed after a new one commits); null keeps all."""
    auto_resume: Bool = False
    """(flexspeed extension) ``initialize()`` loads the newest good tag of ``save_dir``, if any."""
    async_save: Bool = False
    """(flexspeed extension) Interval saves copy the state and write it on a background thread (still atomic and
    verified); training waits only for the copy, and for the previous save before the next one."""

    @model_validator(mode="after")
    def _autosave_needs_dir(self) -> CheckpointConfig:
        if self.save_dir is not None and not self.save_dir.strip():
            raise ConfigError("is an empty string (it would mean the working directory). Fix: name a directory, "
                              "e.g. \"save_dir\": \"checkpoints\", or remove the key", key="checkpoint.save_dir")
        wanted = [k for k, on in (("save_interval", self.save_interval is not None),
                                  ("keep_last", self.keep_last is not None), ("auto_resume", self.auto_resume),
                                  ("async_save", self.async_save)) if on]
        if wanted and self.save_dir is None:
            raise ConfigError(f"is set but checkpoint.save_dir is not: the engine has no directory to save into "
                              "or resume from. Fix: add \"save_dir\": \"checkpoints\" to the checkpoint section",
                              key=f"checkpoint.{wanted[0]}")
        if self.async_save and self.save_interval is None:
            raise ConfigError("applies to the engine's interval saves, and checkpoint.save_interval is not set. "
                              "Fix: set save_interval (steps), or remove async_save", key="checkpoint.async_save")
        return self

    @field_validator("tag_validation", mode="before")
    @classmethod
    def _capitalize(cls, value: Any) -> Any:
        # DeepSpeed compares case-insensitively; keep one canonical spelling.
        return value.capitalize() if isinstance(value, str) else value


class DataTypesConfig(Section):
    """``"data_types"``: data types of engine buffers."""

    grad_accum_dtype: Dtype | None = None
    """Data type of the gradient accumulation buffer (null = the parameters' dtype)."""


class PipelineConfig(Section):
    """``"pipeline"``: pipeline-parallel training (used with ``flexspeed.pipe.PipelineModule``)."""

    json_aliases = {"partition": "partition_method"}

    stages: PosInt | Auto = "auto"
    """Number of pipeline stages; ``"auto"`` = as given to PipelineModule."""
    schedule: Literal["1f1b", "gpipe", "interleaved_1f1b"] = "1f1b"
    """Micro-batch schedule."""
    virtual_stages: PosInt = 1
    """Model chunks per rank (> 1 only with the interleaved_1f1b schedule)."""
    partition_method: Str = "parameters"
    """How layers are split: ``"parameters"``, ``"uniform"`` or ``"type:REGEX"`` (alias ``partition``)."""
    seed_layers: Bool = False
    """Seed each layer's initialisation from its index."""
    activation_checkpoint_interval: NonNegInt = 0
    """Checkpoint every N layers (0 = no activation checkpointing)."""
    use_reentrant: Bool = True
    """DeepSpeed's choice between its reentrant and non-reentrant checkpoint functions. flexspeed's
    pipeline always recomputes with torch's non-reentrant checkpoint (the same gradients), so both
    values run the same (docs/compat.md)."""
    pipe_partitioned: Bool = True
    """Shard activations sent between stages across tensor-parallel ranks."""
    grad_partitioned: Bool = True
    """Shard gradients sent between stages across tensor-parallel ranks."""


class ThroughputTimerConfig(Section):
    """``"timers.throughput"``: the samples-per-second timer."""

    enabled: Bool = True
    """Measure throughput."""
    synchronized: Bool = True
    """Synchronize the device before reading the timer (accurate, slightly slower)."""


class TimersConfig(Section):
    """``"timers"``: engine timers."""

    throughput: ThroughputTimerConfig = Field(default_factory=ThroughputTimerConfig)
    """The throughput timer."""
