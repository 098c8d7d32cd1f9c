"""``PipelineEngine``: DeepSpeed's pipeline engine on ``torch.distributed.pipelining``.

One ``train_batch()`` pulls ``gradient_accumulation_steps`` micro-batches of
``(inputs, labels)``, runs them through the configured schedule (1F1B, GPipe or interleaved
1F1B; ``PipelineStage`` objects over this rank's ``StageModule`` chunks), then:

1. sums the gradients of tied weights over the stages holding them,
2. averages all gradients over the data-parallel (``dp``) mesh dimension,
3. (fp16) unscales and skips the step on overflow anywhere,
4. clips to the global norm over all stages,
5. steps the optimizer (ZeRO-1: only this rank's shard, then broadcasts it) and scheduler,

and returns the mean loss over the micro-batches and data-parallel replicas on every rank.
The loss is divided by the micro-batch count (and multiplied by the fp16 loss scale) inside
the schedule's loss function, so gradients equal those of one big batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.pipelining import PipelineStage

from flexspeed.config.errors import ConfigError
from flexspeed.pipe.module import PipelineModule
from flexspeed.pipe.schedule import build_schedule, validate_schedule
from flexspeed.pipe.sync import ZeroOneSharding, all_reduce_, broadcast_, grads_or_zeros
from flexspeed.runtime.engine import PassThroughToModule
from flexspeed.runtime.monitor import build_monitor
from flexspeed.runtime.precision import LossScaler, NonFiniteGuard, PrecisionPolicy, clip_grads_, unscale_and_check_

__all__ = ["PipelineEngine", "build_pipeline_engine"]

log = logging.getLogger("flexspeed")


def _as_tuple(x: Any, what: str) -> tuple[torch.Tensor, ...]:
    items = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    for t in items:
        if not torch.is_tensor(t):
            raise TypeError(f"pipeline {what} must be tensors (or a tuple of tensors), got {type(t).__name__}")
    return items


class PipelineEngine(PassThroughToModule, nn.Module):
    """Trains a ``PipelineModule`` with ``train_batch()`` (DeepSpeed's ``PipelineEngine`` API).

    Build it with ``flexspeed.initialize(model=pipeline_module, ...)`` (or
    ``build_pipeline_engine``). ``forward``, ``backward`` and ``step`` are not available: the
    schedule interleaves them across micro-batches, so one call, ``train_batch()``, does all.
    """

    def __init__(self, *, module: PipelineModule, config: Any, device: torch.device,
                 optimizer: torch.optim.Optimizer | None = None, lr_scheduler: Any = None,
                 training_dataloader: Any = None) -> None:
        super().__init__()
        self.module = module
        self._config = config
        self.device = device
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.training_dataloader = training_dataloader
        self.precision = PrecisionPolicy(mode=config.precision, device_type=device.type)
        self.loss_scaler = _loss_scaler(config) if config.precision == "fp16" else None
        guard = getattr(config, "flexspeed_nonfinite", None)
        self._nonfinite = NonFiniteGuard(guard.action, guard.max_consecutive_skips) \
            if guard is not None and self.loss_scaler is None else None  # fp16: the loss scaler decides
        self.global_steps = 0
        self.global_samples = 0
        self.skipped_steps = 0
        self.micro_batches = int(config.gradient_accumulation_steps)
        self._global_grad_norm: float | None = None
        self._data_iter: Iterator | None = None
        self._shapes: tuple | None = None
        self._loss_factor = 1.0
        self._compute_loss = True
        self.monitor = build_monitor(config, rank=dist.get_rank(), device=device)
        self._setup_topology()
        self._setup_schedule()
        self.zero = None
        if int(config.zero_optimization.stage) == 1 and self.dp_world_size > 1 and optimizer is not None:
            self.zero = ZeroOneSharding([p for p in module.parameters() if p.requires_grad], self.dp_group)
            self.zero.restrict(optimizer)
        self.zero_grad()

    # ---- set-up -----------------------------------------------------------------------------------
    def _setup_topology(self) -> None:
        module = self.module
        topo = module.topology
        self.parallel_dims = topo.dims({"pp": f"PipelineModule(num_stages={topo.num_stages})",
                                        "dp": "the world size / pipeline stages"})
        self.mesh = self.parallel_dims.build_mesh(self.device.type)
        self.pp_group = self.parallel_dims.group("pp", self.device.type)
        self.dp_group = self.parallel_dims.group("dp", self.device.type)
        self.num_stages = topo.num_stages
        self.stage_id = module.stage_id
        self.dp_world_size = topo.num_dp
        self.dp_rank = module.dp_index
        # tie groups: for each key held by several stages, one group per data-parallel replica;
        # every rank creates every group (new_group is collective), keeping only its own
        self._tie_groups: dict[str, dist.ProcessGroup] = {}
        self._tie_counted: set[str] = set()  # keys whose norm this rank counts (lowest owner)
        for key, owners in sorted(module.tied_stage_owners().items()):
            if self.stage_id == owners[0]:
                self._tie_counted.add(key)
            if len(owners) < 2:
                continue
            for d in range(topo.num_dp):
                ranks = [topo.rank_of(s, d) for s in owners]
                group = dist.new_group(ranks)
                if dist.get_rank() in ranks:
                    self._tie_groups[key] = group
        # identical replicas: dp rank 0's values everywhere, tied copies from their lowest stage
        with torch.no_grad():
            broadcast_(list(module.parameters()) + list(module.buffers()), self.dp_group, group_src=0)
            tied = module.tied_parameters()
            for key, group in self._tie_groups.items():
                broadcast_(tied[key], group, group_src=0)

    def _setup_schedule(self) -> None:
        module = self.module
        for sm in module.stage_modules:
            sm.autocast = self.precision.autocast
        total = self.num_stages * module.virtual_stages
        self.stages = [PipelineStage(sm, sm.stage_id, total, self.device, group=self.pp_group)
                       for sm in module.stage_modules]
        self._has_first = any(s.is_first for s in self.stages)
        self._has_last = any(s.is_last for s in self.stages)
        self._schedule = build_schedule(self._config.pipeline.schedule, self.stages, self.micro_batches, self._loss)

    def _loss(self, outputs: Any, labels: torch.Tensor) -> torch.Tensor:
        """The schedule's loss function: the user's loss, scaled for accumulation and fp16."""
        if not self._compute_loss:
            return torch.zeros((), device=self.device)
        loss_fn = self.module.loss_fn
        if loss_fn is None:  # DeepSpeed: without a loss_fn the last stage's output is the loss
            loss = outputs.reshape(()) if torch.is_tensor(outputs) and outputs.numel() == 1 else outputs
        else:
            with self.precision.autocast():
                loss = loss_fn(outputs, labels)
        if not torch.is_tensor(loss) or loss.dim() != 0:
            what = "PipelineModule.loss_fn must return" if loss_fn is not None else \
                "without a loss_fn the last stage's output is the loss, and must be"
            raise ValueError(f"{what} a scalar tensor, got "
                             f"{tuple(loss.shape) if torch.is_tensor(loss) else type(loss).__name__}; reduce it "
                             "(e.g. .mean()), or pass loss_fn=... to PipelineModule")
        return loss.float() * self._loss_factor

    # ---- DeepSpeed's queries ----------------------------------------------------------------------
    @property
    def config(self) -> Any:
        return self._config

    def train_batch_size(self) -> int:
        return int(self._config.train_batch_size)

    def train_micro_batch_size_per_gpu(self) -> int:
        return int(self._config.train_micro_batch_size_per_gpu)

    def gradient_accumulation_steps(self) -> int:
        return self.micro_batches

    def gradient_clipping(self) -> float:
        return float(self._config.gradient_clipping or 0.0)

    def zero_optimization_stage(self) -> int:
        return int(self._config.zero_optimization.stage)

    def fp16_enabled(self) -> bool:
        return self.precision.mode == "fp16"

    def bf16_enabled(self) -> bool:
        return self.precision.mode == "bf16"

    bfloat16_enabled = bf16_enabled  # DeepSpeed's name

    def is_first_stage(self) -> bool:
        return self.stage_id == 0

    def is_last_stage(self) -> bool:
        return self.stage_id == self.num_stages - 1

    def is_gradient_accumulation_boundary(self) -> bool:
        return True  # train_batch() always ends on a boundary

    @property
    def global_rank(self) -> int:
        return dist.get_rank()

    @property
    def world_size(self) -> int:
        return dist.get_world_size()

    @property
    def loss_scale(self) -> float:
        return self.loss_scaler.loss_scale if self.loss_scaler is not None else 1.0

    def get_lr(self) -> list[float]:
        """Learning rate of each optimizer param group."""
        return [float(g["lr"]) for g in self.optimizer.param_groups] if self.optimizer is not None else []

    def get_global_grad_norm(self) -> float | None:
        """Gradient norm over all stages and replicas at the last step (before clipping)."""
        return self._global_grad_norm

    def set_dataiterator(self, iterator: Iterator) -> None:
        """The iterator ``train_batch()`` reads when called without one."""
        self._data_iter = iterator

    def set_dataloader(self, loader: Any) -> None:
        """DeepSpeed's: ``train_batch()`` reads ``loader`` from now on (the first and last stage read it)."""
        self.training_dataloader = loader
        self._data_iter = iter(loader)

    def empty_partition_cache(self) -> None:
        """DeepSpeed's ZeRO-3 cache release; a no-op here (stages hold only their own layers)."""

    # ---- what DeepSpeed's pipeline engine refuses ------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the pipeline engine runs forward and backward together: call engine.train_batch() "
                           "(or engine.eval_batch(data_iter)) instead of engine(batch)")

    def backward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the pipeline engine has no separate backward(): engine.train_batch() runs forward, "
                           "backward and the optimizer step for a whole batch")

    def step(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("the pipeline engine has no separate step(): engine.train_batch() steps the optimizer")

    # ---- data -------------------------------------------------------------------------------------
    def _default_iter(self) -> Iterator:
        if self._data_iter is None:
            if self.training_dataloader is None:
                raise ValueError("train_batch() got no data_iter and the engine has no training data: pass "
                                 "training_data=... to flexspeed.initialize() or call train_batch(data_iter=...)")
            self._data_iter = _repeat(self.training_dataloader)
        return self._data_iter

    def _next_microbatches(self, data_iter: Iterator | None) -> tuple[tuple[torch.Tensor, ...], torch.Tensor | None]:
        """``micro_batches`` batches concatenated along dim 0 (the schedule re-splits them)."""
        if not (self._has_first or self._has_last):
            return (), None  # middle stages read nothing, as in DeepSpeed
        it = data_iter if data_iter is not None else self._default_iter()
        inputs: list[tuple[torch.Tensor, ...]] = []
        labels: list[torch.Tensor] = []
        for i in range(self.micro_batches):
            try:
                batch = next(it)
            except StopIteration:
                raise ValueError(f"data_iter ran out after {i} of the {self.micro_batches} micro-batches a "
                                 "train_batch() needs; use a repeating iterator") from None
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                length = f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else ""
                raise TypeError("each pipeline batch must be a pair (inputs, labels); got "
                                f"{type(batch).__name__}{length}")
            inputs.append(_as_tuple(batch[0], "inputs"))
            label = batch[1]
            if isinstance(label, (int, float)):  # a plain number (DeepSpeed passes it through): one per micro-batch
                label = torch.tensor([label])
            lab = _as_tuple(label, "labels")
            if len(lab) != 1:
                raise TypeError("pipeline labels must be one tensor (loss_fn(outputs, labels))")
            labels.append(lab[0])
        shapes = (tuple(tuple(t.shape) for t in inputs[0]), tuple(labels[0].shape))
        for i in range(len(inputs)):
            got = (tuple(tuple(t.shape) for t in inputs[i]), tuple(labels[i].shape))
            if got != shapes or (self._shapes is not None and got != self._shapes):
                raise ValueError(f"micro-batch {i} has shapes {got} but the pipeline runs with "
                                 f"{self._shapes or shapes}; "
                                 "every micro-batch must have the same shapes (activation buffers are sized once). "
                                 "Fix: drop the last incomplete batch and pad sequences to a fixed length")
        self._shapes = shapes
        cat_in = tuple(torch.cat([mb[j] for mb in inputs]).to(self.device) for j in range(len(inputs[0])))
        return cat_in, torch.cat(labels).to(self.device)

    # ---- training ---------------------------------------------------------------------------------
    def train_batch(self, data_iter: Iterator | None = None) -> torch.Tensor:
        """One optimizer step over ``gradient_accumulation_steps`` micro-batches.

        Args:
            data_iter: yields ``(inputs, labels)`` micro-batches; read on the first and last
                stage only. Default: the engine's repeating iterator over ``training_data``.
        Returns:
            the mean loss of the batch (over micro-batches and data-parallel replicas), on every rank.
        """
        if self.optimizer is None:
            raise RuntimeError("train_batch() needs an optimizer: pass optimizer=... to flexspeed.initialize() or "
                               "add an 'optimizer' section to the config")
        self.module.train()
        mon = self.monitor
        inputs, labels = self._next_microbatches(data_iter)
        if mon.active and self._has_first and inputs:
            mon.add_tokens(inputs[0].numel())  # this replica's tokens; the log line scales by dp
        scale = self.loss_scale
        self._loss_factor, self._compute_loss = scale / self.micro_batches, True
        losses: list[torch.Tensor] = []
        with mon.timed("pipeline"):  # forward and backward, interleaved by the schedule
            self._schedule.step(*(inputs if self._has_first else ()), target=labels if self._has_last else None,
                                losses=losses if self._has_last else None, return_outputs=False)
        local = torch.stack([x.detach() for x in losses]).sum() / scale if self._has_last else None
        with mon.timed("step"):
            self._reduce_gradients()
            self._take_model_step()
        loss = self._broadcast_loss(local)
        self.global_steps += 1
        self.global_samples += self.train_batch_size()
        if mon.active:
            mon.add_loss(float(loss))
        mon.on_step(self)
        return loss

    def _reduce_gradients(self) -> None:
        tied = self.module.tied_parameters()
        for key, group in self._tie_groups.items():
            all_reduce_(grads_or_zeros(tied[key]), group)
        if self.dp_world_size > 1:
            params = [p for p in self.module.parameters() if p.requires_grad]
            all_reduce_(grads_or_zeros(params), self.dp_group, average=True)

    def _grad_norm(self, params: list[nn.Parameter]) -> torch.Tensor:
        """L2 norm of the whole model's gradient: this stage's squares summed over the pipeline."""
        skip = {id(p) for key, ps in self.module.tied_parameters().items() if key not in self._tie_counted for p in ps}
        counted = [p.grad for p in params if p.grad is not None and id(p) not in skip]
        sq = torch.zeros((), device=self.device, dtype=torch.float32)
        if counted:
            sq = torch.nn.utils.get_total_norm(counted, 2.0, foreach=True).float() ** 2
        dist.all_reduce(sq, group=self.pp_group)
        return sq.sqrt()

    def _take_model_step(self) -> None:
        params = [p for p in self.module.parameters() if p.requires_grad]
        overflow = False
        if self.loss_scaler is not None:
            overflow = unscale_and_check_(params, 1.0 / self.loss_scaler.loss_scale, group=None)
            self.loss_scaler.update_scale(overflow)
        elif self._config.precision == "bf16" and self._config.bf16.check_grad_overflow:
            overflow = unscale_and_check_(params, 1.0, group=None)
        if overflow:
            self.skipped_steps += 1
            self._global_grad_norm = float("inf")
            log.warning("flexspeed: %s gradient overflow at step %d; skipped%s", self._config.precision,
                        self.global_steps, f", loss scale -> {self.loss_scale}" if self.loss_scaler else "")
        else:
            norm = self._grad_norm(params)
            self._global_grad_norm = float(norm)
            if self._nonfinite is not None and self._nonfinite.should_skip(norm, self.global_steps):
                self.skipped_steps += 1
            else:
                if self.gradient_clipping() > 0:
                    clip_grads_(params, self.gradient_clipping(), norm)
                self.optimizer.step()
                if self.zero is not None:
                    self.zero.broadcast_updates()
                if self.lr_scheduler is not None:
                    self.lr_scheduler.step()
        self.zero_grad()

    def zero_grad(self) -> None:
        for p in self.module.parameters():
            p.grad = None

    def _broadcast_loss(self, local: torch.Tensor | None) -> torch.Tensor:
        """Mean over data-parallel replicas of the last stage's value, on every rank (one all-reduce)."""
        value = torch.zeros((), device=self.device, dtype=torch.float32)
        if local is not None:
            value = local.float().reshape(()) / self.dp_world_size
        dist.all_reduce(value)
        return value

    # ---- evaluation -------------------------------------------------------------------------------
    def eval_batch(self, data_iter: Iterator, return_logits: bool = False, compute_loss: bool = True,
                   reduce_output: str | None = "avg", bcast_loss: bool = True) -> Any:
        """Forward ``gradient_accumulation_steps`` micro-batches without gradients.

        Args:
            data_iter: yields ``(inputs, labels)``.
            return_logits: also return the last stage's outputs (``None`` on other stages).
            compute_loss: apply ``loss_fn``; with ``False`` the returned loss is 0.
            reduce_output: "avg" - the mean loss (over micro-batches and replicas); ``None`` -
                a list with each micro-batch's loss (averaged over replicas).
            bcast_loss: give the loss to every rank (else only the last stage has it).
        Returns:
            the loss, or ``(loss, logits)`` with ``return_logits``.
        """
        if reduce_output not in ("avg", None):
            raise ValueError(f"reduce_output={reduce_output!r} must be 'avg' or None")
        was_training = self.module.training
        self.module.eval()
        try:
            inputs, labels = self._next_microbatches(data_iter)
            self._loss_factor, self._compute_loss = 1.0, compute_loss
            losses: list[torch.Tensor] = []
            with torch.no_grad():
                out = self._schedule.eval(*(inputs if self._has_first else ()),
                                          target=labels if self._has_last else None,
                                          losses=losses if self._has_last else None)
        finally:
            self._compute_loss = True
            self.module.train(was_training)
        per_mb = torch.zeros(self.micro_batches, device=self.device)
        if self._has_last:
            per_mb = torch.stack([x.detach().float().reshape(()) for x in losses]) / self.dp_world_size
        if bcast_loss:
            dist.all_reduce(per_mb)
        else:
            dist.all_reduce(per_mb, group=self.dp_group)
        loss: Any = per_mb.mean() if reduce_output == "avg" else list(per_mb.unbind())
        return (loss, out if self._has_last else None) if return_logits else loss

    # ---- logging, state -------------------------------------------------------------------------
    def progress(self, total_steps: int, desc: str = "train", initial: int | None = None,
                 disable: bool | None = None) -> Any:
        """A progress bar over ``train_batch()`` calls on rank 0 (loss, lr, tokens/s); see ``TrainingEngine.progress``."""
        return self.monitor.progress(total_steps, desc=desc,
                                     initial=self.global_steps if initial is None else initial, disable=disable)

    def module_state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's layers (keys ``"<layer index>.<param>"``)."""
        return self.module.state_dict()

    def save_checkpoint(self, save_dir: str, tag: str | None = None, client_state: dict | None = None,
                        save_latest: bool = True, exclude_frozen_parameters: bool = False) -> bool:
        """Save model, optimizer, scheduler and counters (collective; see ``flexspeed.pipe.checkpoint``)."""
        from flexspeed.pipe.checkpoint import save_pipeline_checkpoint

        return save_pipeline_checkpoint(self, save_dir, tag=tag, client_state=client_state or {},
                                        save_latest=save_latest, exclude_frozen_parameters=exclude_frozen_parameters)

    def load_checkpoint(self, load_dir: str, tag: str | None = None, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                        load_module_only: bool = False) -> tuple[str | None, dict | None]:
        """Load a checkpoint saved by ``save_checkpoint`` under any partition (collective)."""
        from flexspeed.pipe.checkpoint import load_pipeline_checkpoint

        return load_pipeline_checkpoint(self, load_dir, tag=tag, load_module_strict=load_module_strict,
                                        load_optimizer_states=load_optimizer_states and not load_module_only,
                                        load_lr_scheduler_states=load_lr_scheduler_states and not load_module_only)


def _repeat(loader: Iterable) -> Iterator:
    while True:
        yield from loader


def _loss_scaler(config: Any) -> LossScaler:
    f = config.fp16
    # DeepSpeed's stage-0 fp16 optimizer has no hysteresis (its ZeRO stages do)
    hysteresis = int(f.hysteresis) if config.zero_optimization.stage > 0 else 1
    return LossScaler(loss_scale=float(f.loss_scale), initial_scale_power=int(f.initial_scale_power),
                      loss_scale_window=int(f.loss_scale_window), hysteresis=hysteresis,
                      consecutive_hysteresis=bool(f.consecutive_hysteresis), min_loss_scale=float(f.min_loss_scale))


def _apply_config(module: PipelineModule, config: Any) -> None:
    """Reconcile the ``pipeline`` config section with the module's own arguments."""
    profiler = getattr(config, "flops_profiler", None)
    if profiler is not None and profiler.enabled:
        raise ConfigError("flops_profiler.enabled=true is not supported with a PipelineModule: each stage runs "
                          "only part of the model inside the schedule; profile the layers as a plain nn.Module "
                          "(no pipeline) or set flops_profiler.enabled to false", key="flops_profiler.enabled")
    pipe = config.pipeline
    stage = int(config.zero_optimization.stage)
    if stage >= 2:
        raise ConfigError(f"zero_optimization.stage={stage} cannot be combined with pipeline parallelism: stages 2 "
                          "and 3 shard gradients/parameters across data-parallel ranks while the pipeline "
                          "accumulates them over micro-batches. Fix: use stage 0 or 1 (1 shards the optimizer "
                          "state over the data-parallel ranks)", key="zero_optimization.stage")
    if pipe.stages != "auto" and int(pipe.stages) != module.num_stages:
        raise ConfigError(f"pipeline.stages={pipe.stages} but the PipelineModule has num_stages={module.num_stages}. "
                          "Fix: make them equal, or set pipeline.stages to \"auto\"", key="pipeline.stages")
    # a config value other than the default wins over the module's default; two non-defaults must agree
    for key, default in (("partition_method", "parameters"), ("seed_layers", False)):
        want, have = getattr(pipe, key), getattr(module, key)
        if want != default and want != have:
            if module._built or have != default:
                raise ConfigError(f"pipeline.{key}={want!r} disagrees with PipelineModule({key}={have!r}) (or the "
                                  "module was already partitioned). Fix: set it in one place", key=f"pipeline.{key}")
            setattr(module, key, want)
    interval = int(pipe.activation_checkpoint_interval)
    if interval and interval != module.activation_checkpoint_interval:
        if module.activation_checkpoint_interval:
            raise ConfigError(f"pipeline.activation_checkpoint_interval={interval} disagrees with PipelineModule("
                              f"activation_checkpoint_interval={module.activation_checkpoint_interval})",
                              key="pipeline.activation_checkpoint_interval")
        module.activation_checkpoint_interval = interval
        for sm in module.__dict__["_stage_modules"]:
            sm.checkpoint_interval = interval
    module.configure(virtual_stages=int(pipe.virtual_stages))
    validate_schedule(pipe.schedule, module.num_stages, int(pipe.virtual_stages),
                      int(config.gradient_accumulation_steps))


def _build_optimizer(module: PipelineModule, config: Any, client: Any, model_parameters: Iterable | None) -> Any:
    if isinstance(client, torch.optim.Optimizer):
        return client
    if client is not None and config.optimizer is not None:
        raise ConfigError("the optimizer is given twice: a callable passed to initialize() and the config's "
                          f"'optimizer' section (type {config.optimizer.type!r}). Fix: keep only one", key="optimizer")
    params = list(model_parameters) if model_parameters is not None else [p for p in module.parameters()
                                                                          if p.requires_grad]
    if callable(client):
        return client(params)
    if config.optimizer is None:
        return None
    from flexspeed.runtime.optimizers import build_optimizer

    return build_optimizer(config.optimizer.type, dict(config.optimizer.params or {}), params)


def _build_scheduler(config: Any, client: Any, optimizer: Any) -> Any:
    if client is not None:
        return client(optimizer) if callable(client) and not hasattr(client, "step") else client
    if config.scheduler is None or optimizer is None:
        return None
    from flexspeed.runtime.schedulers import build_scheduler

    return build_scheduler(config.scheduler.type, dict(config.scheduler.params or {}), optimizer)


def build_pipeline_engine(*, model: PipelineModule, config: Any, optimizer: Any = None,
                          model_parameters: Iterable | None = None, lr_scheduler: Any = None,
                          training_data: Any = None, collate_fn: Callable | None = None
                          ) -> tuple[PipelineEngine, Any, Any, Any]:
    """What ``flexspeed.initialize`` returns for a ``PipelineModule``.

    Args:
        model: the pipeline module.
        config: the resolved ``FlexConfig`` (batch triad over the data-parallel size).
        optimizer: a ``torch.optim.Optimizer`` over this rank's parameters, a callable
            ``params -> Optimizer``, or ``None`` to build the config's ``optimizer`` section.
        model_parameters: parameters or param groups for a built optimizer (default: all
            trainable parameters of this rank's stages).
        lr_scheduler: a scheduler, a callable ``optimizer -> scheduler``, or ``None`` (config).
        training_data: a ``Dataset`` for the engine's loader (micro-batch size from the config,
            sampled over the data-parallel ranks, incomplete last batch dropped).
        collate_fn: the loader's collate function.
    Returns:
        ``(engine, optimizer, dataloader, lr_scheduler)``.
    """
    from flexspeed.distributed import default_device
    from flexspeed.runtime.data import FlexDataLoader

    if not dist.is_initialized():
        raise RuntimeError("pipeline parallelism needs torch.distributed: call flexspeed.init_distributed() first")
    _apply_config(model, config)
    device = default_device()
    model.to(device)  # builds this rank's layers
    opt = _build_optimizer(model, config, optimizer, model_parameters)
    sched = _build_scheduler(config, lr_scheduler, opt)
    loader = None
    if training_data is not None:
        loader = FlexDataLoader(training_data, batch_size=int(config.train_micro_batch_size_per_gpu),
                                dp_rank=model.dp_index, dp_world_size=model.topology.num_dp, collate_fn=collate_fn,
                                drop_last=True)
    engine = PipelineEngine(module=model, config=config, device=device, optimizer=opt, lr_scheduler=sched,
                            training_dataloader=loader)
    return engine, opt, loader, sched
