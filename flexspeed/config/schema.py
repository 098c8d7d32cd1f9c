"""The root of the DeepSpeed config schema, :class:`FlexConfig`, and the table of DeepSpeed
features flexspeed does not implement.

Build a ``FlexConfig`` with :func:`flexspeed.config.validate_config` (checks and translates
every error into a :class:`ConfigError`) or :func:`flexspeed.config.build_config` (also
resolves the batch triad and ``"auto"``), not with the constructor.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from flexspeed.config.tensor_parallel import TensorParallelConfig
from flexspeed.config.elasticity import ElasticityConfig
from flexspeed.config.fields import Auto, Bool, Dtype, Int, NonNegFloat, PosFloat, PosInt, Section
from flexspeed.config.sections import (
    ActivationCheckpointingConfig,
    Bf16Config,
    CheckpointConfig,
    CsvMonitorConfig,
    DistributedConfig,
    DataTypesConfig,
    FlopsProfilerConfig,
    Fp16Config,
    NonFiniteConfig,
    OptimizerConfig,
    PipelineConfig,
    SchedulerConfig,
    TensorBoardConfig,
    TimersConfig,
    WandbConfig,
    ZeroConfig,
)

__all__ = ["FlexConfig", "UNSUPPORTED_SECTIONS", "Precision"]

Precision = Literal["fp32", "bf16", "fp16"]

# DeepSpeed section -> (what it is, what to do instead). Present-but-disabled is accepted.
UNSUPPORTED_SECTIONS: dict[str, tuple[str, str]] = {
    "amp": ("NVIDIA Apex AMP", 'use "bf16": {"enabled": true} or "fp16": {"enabled": true}'),
    "sparse_attention": ("block-sparse attention kernels", "remove the section"),
    "compression_training": ("DeepSpeed Compression", "remove the section"),
    "curriculum_learning": ("curriculum learning", "order the data in your own sampler"),
    "data_efficiency": ("the data-efficiency library", "remove the section"),
    "autotuning": ("the autotuner", "remove the section"),
    "hybrid_engine": ("the RLHF hybrid engine", "use flexspeed.init_inference for generation"),
    "moe": ("mixture-of-experts layers", "remove the section"),
    "quantize_training": ("quantization-aware training (MoQ)", "remove the section"),
    "eigenvalue": ("eigenvalue computation", "remove the section"),
    "progressive_layer_drop": ("progressive layer drop", "remove the section"),
    "aio": ("asynchronous I/O for NVMe offload", 'remove the section and offload to "cpu"'),
    "nebula": ("Nebula checkpointing", "remove the section"),
    "comms_logger": ("the communication logger", "use the PyTorch profiler"),
    "comet": ("the Comet monitor", "use tensorboard, csv_monitor or wandb"),
    "compile": ("DeepCompile", "call torch.compile on your model"),
    "weight_quantization": ("weight quantization in training", "remove the section"),
}


class FlexConfig(Section):
    """A whole ds_config.json. Attribute names are DeepSpeed's JSON keys.

    After :func:`flexspeed.config.resolve_config` the batch triad holds plain ints and no
    ``"auto"`` is left outside ``pipeline.stages``.
    """

    json_aliases = {"bfloat16": "bf16"}

    train_batch_size: Int | Auto | None = None
    """Samples per optimizer step over all data-parallel ranks (micro * accumulation * world)."""
    train_micro_batch_size_per_gpu: Int | Auto | None = None
    """Samples per forward/backward on each rank."""
    gradient_accumulation_steps: Int | Auto | None = None
    """Micro-batches accumulated before each optimizer step."""
    optimizer: OptimizerConfig | None = None
    """The optimizer the engine builds (null = pass one to initialize())."""
    scheduler: SchedulerConfig | None = None
    """The learning-rate scheduler the engine builds (null = none or pass one)."""
    fp16: Fp16Config = Field(default_factory=Fp16Config)
    """float16 mixed precision."""
    bf16: Bf16Config = Field(default_factory=Bf16Config)
    """bfloat16 mixed precision (alias ``bfloat16``)."""
    gradient_clipping: NonNegFloat | Auto = 1.0
    """Clip the global gradient norm to this; 0 = off; absent = 1.0, DeepSpeed's default; ``"auto"`` = 1.0."""
    zero_optimization: ZeroConfig = Field(default_factory=ZeroConfig)
    """ZeRO sharding and offload."""
    zero_allow_untested_optimizer: Bool = False
    """Allow a client optimizer that is not one of the known optimizers with ZeRO."""
    zero_force_ds_cpu_optimizer: Bool = True
    """With optimizer offload, require a CPU-capable optimizer implementation."""
    steps_per_print: PosInt | None = 10
    """Log progress every this many optimizer steps; ``Infinity``/null = never (Accelerate writes inf)."""
    wall_clock_breakdown: Bool = False
    """Time forward, backward and step separately."""
    memory_breakdown: Bool = False
    """Log memory use at each step."""
    dump_state: Bool = False
    """Print the engine state after initialization."""
    prescale_gradients: Bool = False
    """Divide gradients by the world size before all-reduce rather than after."""
    gradient_predivide_factor: PosFloat = 1.0
    """Divide gradients by this before all-reduce, the rest after."""
    sparse_gradients: Bool = False
    """Reduce embedding gradients as sparse tensors (not implemented: must be false)."""
    gradient_allreduce_op: Literal["mean", "sum"] = "mean"
    """How gradients combine over data-parallel ranks (case-insensitive): ``"mean"``, DeepSpeed's default, or
    ``"sum"`` (a plain sum: no predivide factor; ZeRO stages 0-2, as in DeepSpeed)."""
    communication_data_type: Dtype | None = None
    """Data type of gradient reduction (null = the gradients' dtype); ``"bfp16"`` means bf16."""
    data_types: DataTypesConfig = Field(default_factory=DataTypesConfig)
    """Data types of engine buffers."""
    dataloader_drop_last: Bool = False
    """The engine's data loader drops the last incomplete batch."""
    flexspeed_nonfinite: NonFiniteConfig = Field(default_factory=NonFiniteConfig)
    """(flexspeed extension) Skip or raise on a non-finite gradient norm in fp32/bf16."""
    flexspeed_distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    """(flexspeed extension) Process-group timeout and the heartbeat that names a stopped rank."""
    activation_checkpointing: ActivationCheckpointingConfig = Field(
        default_factory=ActivationCheckpointingConfig
    )
    """Activation checkpointing (``flexspeed.checkpointing``)."""
    flops_profiler: FlopsProfilerConfig = Field(default_factory=FlopsProfilerConfig)
    """The FLOPs profiler."""
    tensorboard: TensorBoardConfig = Field(default_factory=TensorBoardConfig)
    """TensorBoard monitor."""
    csv_monitor: CsvMonitorConfig = Field(default_factory=CsvMonitorConfig)
    """CSV monitor."""
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    """Weights & Biases monitor."""
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    """Checkpoint options."""
    elasticity: ElasticityConfig = Field(default_factory=ElasticityConfig)
    """Elastic training: the batch triad chosen so the job runs at many world sizes (DeepSpeed's arithmetic)."""
    pipeline: PipelineConfig = Field(default_factory=PipelineConfig)
    """Pipeline-parallel options."""
    timers: TimersConfig = Field(default_factory=TimersConfig)
    """Engine timers."""
    tensor_parallel: TensorParallelConfig = Field(default_factory=TensorParallelConfig)
    """Automatic tensor parallelism in training (``autotp_size``); docs/training.md."""

    @field_validator("steps_per_print", mode="before")
    @classmethod
    def _never_print(cls, value: Any) -> Any:
        return None if isinstance(value, float) and value == float("inf") else value

    @field_validator("gradient_allreduce_op", mode="before")
    @classmethod
    def _lower_op(cls, value: Any) -> Any:
        # DeepSpeed lower-cases it ("SUM" is "sum").
        return value.lower() if isinstance(value, str) else value

    @field_validator("communication_data_type", mode="before")
    @classmethod
    def _bfp16(cls, value: Any) -> Any:
        # DeepSpeed spells bfloat16 "bfp16" here.
        return "bf16" if value == "bfp16" else value

    @property
    def precision(self) -> Precision:
        """``"bf16"``, ``"fp16"`` or ``"fp32"``: which mixed-precision mode is enabled."""
        if self.bf16.enabled is True:
            return "bf16"
        if self.fp16.enabled is True:
            return "fp16"
        return "fp32"

    @property
    def zero_stage(self) -> int:
        """Shorthand for ``zero_optimization.stage``."""
        return self.zero_optimization.stage

