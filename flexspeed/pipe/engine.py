"""``PipelineEngine``: DeepSpeed's pipeline engine on ``torch.distributed.pipelining``.

One ``train_batch()`` pulls ``gradient_accumulation_steps`` micro-batches of
``(inputs, labels)`` and runs them through the configured schedule (1F1B, GPipe or interleaved
1F1B; ``PipelineStage`` objects over this rank's stage modules). Each stage module is wrapped by
``apply_zero(..., group=dp)`` exactly as a whole model is in the data-parallel engine (ZeRO
stages 0-3, :mod:`flexspeed.pipe.zero_stages`), so the schedule's last backward reduces (or
reduce-scatters) the gradients over the data-parallel replicas. Then:

1. the gradients of tied weights are summed over the stages holding them,
2. the shared optimizer step (:class:`~flexspeed.runtime.engine_base.EngineBase`): fp16 unscale
   and overflow skip agreed by every rank, the global norm over all stages (each tied weight
   counted once) and shards, clipping, optimizer and scheduler,

and the mean loss over the micro-batches and replicas is returned on every rank. The loss is
divided by the micro-batch count (and multiplied by the fp16 loss scale) inside the schedule's
loss function, so gradients equal those of one big batch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.distributed.pipelining import PipelineStage

from flexspeed.config.errors import ConfigError
from flexspeed.distributed.collectives import all_reduce_, broadcast_, grads_or_zeros
from flexspeed.distributed.heartbeat import note
from flexspeed.distributed.parallel_dims import ParallelDims
from flexspeed.pipe.module import PipelineModule
from flexspeed.pipe.schedule import build_schedule, validate_schedule
from flexspeed.pipe.zero_stages import StageStrategies, apply_zero_to_stages
from flexspeed.runtime.engine_base import EngineBase
from flexspeed.runtime.precision import LossScaler, PrecisionPolicy, total_norm

if TYPE_CHECKING:
    from flexspeed.config.schema import FlexConfig

__all__ = ["PipelineEngine", "build_pipeline_engine"]

log = logging.getLogger("flexspeed")


def _as_tuple(x: Any, what: str) -> tuple[torch.Tensor, ...]:
    items = tuple(x) if isinstance(x, (tuple, list)) else (x,)
    for t in items:
        if not torch.is_tensor(t):
            raise TypeError(f"pipeline {what} must be tensors (or a tuple of tensors), got {type(t).__name__}")
    return items


class PipelineEngine(EngineBase):
    """Trains a ``PipelineModule`` with ``train_batch()`` (DeepSpeed's ``PipelineEngine`` API).

    Build it with ``flexspeed.initialize(model=pipeline_module, ...)`` (or
    ``build_pipeline_engine``). ``forward``, ``backward`` and ``step`` are not available: the
    schedule interleaves them across micro-batches, so one call, ``train_batch()``, does all.
    The queries, the optimizer step and checkpointing are the data-parallel engine's
    (:class:`~flexspeed.runtime.engine_base.EngineBase`).
    """

    def __init__(self, *, module: PipelineModule, config: FlexConfig, device: torch.device,
                 strategy: StageStrategies, dims: ParallelDims, tie_groups: dict[str, dist.ProcessGroup],
                 optimizer: torch.optim.Optimizer | None = None, lr_scheduler: Any = None,
                 training_dataloader: Any = None, precision: PrecisionPolicy | None = None,
                 loss_scaler: LossScaler | None = None, launch_env: Any = None) -> None:
        super().__init__(strategy=strategy, config=config, optimizer=optimizer, lr_scheduler=lr_scheduler,
                         training_dataloader=training_dataloader,
                         precision=precision or PrecisionPolicy(mode=config.precision, device_type=device.type),
                         loss_scaler=loss_scaler, device=device, launch_env=launch_env, module=module)
        self.parallel_dims = dims
        self.pp_group = dims.group("pp", device.type)
        self.num_stages = dims.pp
        self.stage_id = module.stage_id
        self.micro_batches = int(config.gradient_accumulation_steps)
        self._tie_groups = tie_groups
        # the norm counts each tied weight once: on the lowest stage holding it
        self._tie_counted = {key for key, owners in module.tied_stage_owners().items() if self.stage_id == owners[0]}
        self._data_iter: Iterator | None = None
        self._shapes: tuple | None = None
        self._loss_factor = 1.0
        self._compute_loss = True
        self._setup_schedule()
        self.zero_grad()

    # ---- set-up -----------------------------------------------------------------------------------
    def _setup_schedule(self) -> None:
        module = self.module
        for sm in module.stage_modules:
            sm.autocast = self.precision.autocast
        total = self.num_stages * module.virtual_stages
        self.stages = [PipelineStage(self._strategy.stage_model(i), sm.stage_id, total, self.device,
                                     group=self.pp_group) for i, sm in enumerate(module.stage_modules)]
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

    # ---- DeepSpeed's pipeline queries ------------------------------------------------------------
    def is_first_stage(self) -> bool:
        return self.stage_id == 0

    def is_last_stage(self) -> bool:
        return self.stage_id == self.num_stages - 1

    def is_gradient_accumulation_boundary(self) -> bool:
        return True  # train_batch() always ends on a boundary

    def set_dataiterator(self, iterator: Iterator) -> None:
        """The iterator ``train_batch()`` reads when called without one."""
        self._data_iter = iterator

    def set_dataloader(self, loader: Any) -> None:
        """DeepSpeed's: ``train_batch()`` reads ``loader`` from now on (the first and last stage read it)."""
        self.training_dataloader = loader
        self._data_iter = iter(loader)

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
        step = self.global_steps
        note(f"pipeline step {step}: {self._config.pipeline.schedule} schedule, stage {self.stage_id} of "
             f"{self.num_stages} (forward/backward with p2p send/recv between stages)")
        with mon.timed("pipeline"):  # forward and backward, interleaved by the schedule
            self._schedule.step(*(inputs if self._has_first else ()), target=labels if self._has_last else None,
                                losses=losses if self._has_last else None, return_outputs=False)
        local = torch.stack([x.detach() for x in losses]).sum() / scale if self._has_last else None
        with mon.timed("step"):
            note(f"pipeline step {step}: data-parallel gradient reduction and tied-weight all_reduce")
            self._reduce_gradients()
            self._take_model_step()
        note(f"pipeline step {step}: loss all_reduce")
        loss = self._broadcast_loss(local)
        self.micro_steps += self.micro_batches
        self.global_samples += self.train_batch_size()
        if mon.active:
            mon.add_loss(float(loss))
        self._maybe_print()
        self._after_optimizer_step()  # checkpoint.save_interval (flexspeed.runtime.autosave)
        return loss

    def _reduce_gradients(self) -> None:
        """Finish the data-parallel reduction (the wrappers did most in the last backward), then sum tied copies."""
        self._strategy.after_backward()
        tied = self.module.tied_parameters()
        for key, group in self._tie_groups.items():
            # each stage holds the same shard of a tied weight (same shape, same data-parallel mesh)
            all_reduce_([_local(g) for g in grads_or_zeros(tied[key])], group)

    def _overflow_group(self) -> dist.ProcessGroup | None:
        return None  # every stage of every replica skips together

    def _grad_norm(self, params: list[torch.Tensor]) -> torch.Tensor:
        """L2 norm of the whole model's gradient: this stage's squares (shards reduced) summed over the pipeline."""
        skip = {id(p) for key, ps in self.module.tied_parameters().items() if key not in self._tie_counted for p in ps}
        counted = [p.grad for p in params if p.grad is not None and id(p) not in skip]
        sq = torch.zeros((), device=self.device, dtype=torch.float32)
        if counted:
            sq = total_norm(counted).float().to(self.device) ** 2
        dist.all_reduce(sq, group=self.pp_group)
        return sq.sqrt()

    def zero_grad(self) -> None:
        """Drop every gradient of this rank's stages (also of parameters the optimizer does not hold)."""
        for p in self.module.parameters():
            p.grad = None

    def _broadcast_loss(self, local: torch.Tensor | None) -> torch.Tensor:
        """Mean over data-parallel replicas of the last stage's value, on every rank (one all-reduce)."""
        value = torch.zeros((), device=self.device, dtype=torch.float32)
        if local is not None:  # every tp rank of the last stage holds the same value
            value = local.float().reshape(()) / (self.dp_world_size * self.parallel_dims.tp)
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
            note(f"pipeline eval_batch at step {self.global_steps}, stage {self.stage_id} (forward with p2p "
                 "send/recv between stages)")
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
            dist.all_reduce(per_mb.div_(self.parallel_dims.tp))  # the tp ranks of the last stage agree
        else:
            dist.all_reduce(per_mb, group=self.dp_group)
        loss: Any = per_mb.mean() if reduce_output == "avg" else list(per_mb.unbind())
        return (loss, out if self._has_last else None) if return_logits else loss

    # ---- logging, state -------------------------------------------------------------------------
    # ---- checkpoints (the data-parallel engine's format, see flexspeed.runtime.checkpoint) ------------
    def checkpoint_layout(self) -> dict[str, Any]:
        """Recorded in the manifest: the degrees and the partition that wrote a checkpoint (loads need none of it)."""
        module = self.module
        return {**super().checkpoint_layout(), "pp": self.num_stages, "tp": self.parallel_dims.tp,
                "num_stages": self.num_stages, "virtual_stages": module.virtual_stages,
                "partition_bounds": module.partition_bounds()}

    def checkpoint_keys_elsewhere(self, saved: set[str]) -> set[str]:
        """Saved model keys of layers other pipeline ranks hold (not "unexpected" in a strict load)."""
        entries = len(self.module._entries)
        own = set(self.module._modules)
        return {k for k in saved if k.partition(".")[0].isdigit() and int(k.partition(".")[0]) < entries
                and k.partition(".")[0] not in own}

    def load_checkpoint(self, load_dir: str, tag: str | None = None, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                        load_module_only: bool = False) -> tuple[str | None, dict | None]:
        """Load a checkpoint saved under any pipeline layout, data-parallel size or ZeRO stage, or by the
        data-parallel engine from the same layers (collective)."""
        out = super().load_checkpoint(load_dir, tag=tag, load_module_strict=load_module_strict,
                                      load_optimizer_states=load_optimizer_states,
                                      load_lr_scheduler_states=load_lr_scheduler_states,
                                      load_module_only=load_module_only)
        self._data_iter = None  # the loader resumes at the restored position
        return out


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _repeat(loader: Iterable) -> Iterator:
    while True:
        yield from loader


def _apply_config(module: PipelineModule, config: FlexConfig, tp: int = 1) -> None:
    """Reconcile the ``pipeline`` config section with the module's own arguments."""
    if config.flops_profiler.enabled:
        raise ConfigError("flops_profiler.enabled=true is not supported with a PipelineModule: each stage runs "
                          "only part of the model inside the schedule; profile the layers as a plain nn.Module "
                          "(no pipeline) or set flops_profiler.enabled to false", key="flops_profiler.enabled")
    pipe = config.pipeline
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
    module.configure(virtual_stages=int(pipe.virtual_stages), tp=tp)
    validate_schedule(pipe.schedule, module.num_stages, int(pipe.virtual_stages),
                      int(config.gradient_accumulation_steps))


def _agree_or_raise(problem: ConfigError | None, device: torch.device, *, planned: bool = True, tp: int = 1) -> None:
    """One world all-reduce of "this rank's stage cannot be planned" and "this rank's stages split a layer".

    A rank whose check failed raises its ConfigError, the others one naming those ranks; a pipeline in
    which no stage has a layer to split is refused too (tp would only replicate every stage). Both before
    anything is sharded or a mesh is built.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    flags = torch.zeros(2 * world, device=device)
    flags[rank] = float(problem is not None)
    flags[world + rank] = float(planned)
    dist.all_reduce(flags)
    if problem is not None:
        raise problem
    bad = [r for r, f in enumerate(flags[:world].tolist()) if f]
    if bad:
        raise ConfigError(f"tensor parallelism cannot be applied to the pipeline stages of rank(s) {bad} (their "
                          "error names the layer and the fix); nothing was sharded",
                          key="tensor_parallel.autotp_size")
    if not flags[world:].any():
        raise ConfigError(f"tensor_parallel.autotp_size={tp}, but no pipeline stage has a layer tensor parallelism "
                          "can split: no layer holds Linear children named like q_proj/c_attn/fc1 (column) with "
                          "o_proj/c_proj/fc2 (row), and no plan was given, so every stage would only be replicated "
                          f"over {tp} ranks. Fix: set tensor_parallel.autotp_size to 1, or give a plan: "
                          "flexspeed.tp_model_init(model, tp_size, dtype, plan={'<layer index>.<submodule>': "
                          "'colwise' | 'rowwise'})", key="tensor_parallel.autotp_size")


def _tie_groups(module: PipelineModule, dims: ParallelDims) -> dict[str, dist.ProcessGroup]:
    """For each tie key held by several stages: one group per data-parallel replica and tensor-parallel rank
    (every rank creates every group, ``new_group`` being collective, and keeps its own)."""
    groups: dict[str, dist.ProcessGroup] = {}
    rank = dist.get_rank()
    for key, owners in sorted(module.tied_stage_owners().items()):
        if len(owners) < 2:
            continue
        for d in range(dims.dp):
            for t in range(dims.tp):
                ranks = [dims.rank_of(dp=d, pp=s, tp=t) for s in owners]
                group = dist.new_group(ranks)
                if rank in ranks:
                    groups[key] = group
    return groups


def build_pipeline_engine(*, model: PipelineModule, config: FlexConfig, optimizer: Any = None,
                          model_parameters: Iterable | None = None, lr_scheduler: Any = None,
                          training_data: Any = None, collate_fn: Callable | None = None, launch_env: Any = None,
                          dims: ParallelDims | None = None, tp_plan: Any = None,
                          tp_dtype: str | None = None) -> tuple[PipelineEngine, Any, Any, Any]:
    """What ``flexspeed.initialize`` returns for a ``PipelineModule``.

    The same builders as the data-parallel engine (:mod:`flexspeed.runtime.builders`): the
    client-vs-config checks, loss scaler, optimizer over the ZeRO strategy's parameters, scheduler.

    Args:
        model: the pipeline module.
        config: the resolved ``FlexConfig`` (batch triad over the data-parallel size).
        optimizer: a ``torch.optim.Optimizer`` over this rank's parameters, a callable
            ``params -> Optimizer``, or ``None`` to build the config's ``optimizer`` section.
        model_parameters: parameters or param groups for a built optimizer (default: this rank's parameters).
        lr_scheduler: a scheduler, a callable ``optimizer -> scheduler``, or ``None`` (config).
        training_data: a ``Dataset`` for the engine's loader (micro-batch size from the config,
            sampled over the data-parallel ranks, incomplete last batch dropped).
        collate_fn: the loader's collate function.
        launch_env: what ``init_distributed`` returned (for ``engine.local_rank``).
        dims: the validated degrees (default: from the module's topology). With ``dims.tp > 1`` each stage
            module is sharded over the tp mesh (``apply_tensor_parallel``) before ZeRO wraps it over dp.
        tp_plan: a user tensor-parallel plan in the PipelineModule's names (``"<layer>.<submodule>"``).
        tp_dtype: ``tp_model_init``'s dtype, checked against the config's precision.
    Returns:
        ``(engine, optimizer, dataloader, lr_scheduler)``.
    """
    from flexspeed.distributed import default_device
    from flexspeed.runtime.builders import (
        build_loss_scaler,
        build_optimizer,
        build_scheduler,
        check_optimizer_given_once,
    )
    from flexspeed.runtime.data import FlexDataLoader

    if not dist.is_initialized():
        raise RuntimeError("pipeline parallelism needs torch.distributed: call flexspeed.init_distributed() first")
    check_optimizer_given_once(config, optimizer, lr_scheduler)
    tp = dims.tp if dims is not None else 1
    _apply_config(model, config, tp)
    device = default_device()
    model.to(device)  # builds this rank's layers
    topo = model.topology
    if dims is None:
        dims = topo.dims({"pp": f"PipelineModule(num_stages={topo.num_stages})",
                          "dp": "the world size / pipeline stages"})
    tp_plans = None
    if tp > 1:  # everything a user can get wrong, before a collective runs or a weight moves
        from flexspeed.distributed.tensor_parallel import check_tp_dtype
        from flexspeed.pipe.stage_tp import stage_tp_plans

        check_tp_dtype(tp_dtype, config.precision)
        if isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError("with tensor_parallel.autotp_size > 1 a PipelineModule's parameters are replaced by "
                              "tensor-parallel ones inside initialize(), so an optimizer built before cannot hold "
                              "them. Fix: pass a callable params -> optimizer, or the config's optimizer section",
                              key="tensor_parallel.autotp_size")
        problem: ConfigError | None = None
        try:
            tp_plans = stage_tp_plans(model.stage_modules, tp, tp_plan, num_layers=len(model._entries))
        except ConfigError as err:
            problem = err
        planned = tp_plans is not None and any(p is not None for p in tp_plans)
        _agree_or_raise(problem, device, planned=planned, tp=tp)  # every rank stops together (else the others
        # would wait in the mesh)
    dims.build_mesh(device.type)
    ties = _tie_groups(model, dims)
    with torch.no_grad():  # tied copies start equal: the lowest stage's values (before any sharding)
        tied = model.tied_parameters()
        for key, group in ties.items():
            broadcast_(tied[key], group, group_src=0)
    tp_notes: list[str] = []
    if tp_plans is not None:  # each stage module sharded over its tp group (tp rank 0's weights) ...
        from flexspeed.distributed.tensor_parallel import remap_params
        from flexspeed.pipe.stage_tp import apply_tensor_parallel_to_stages

        names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        tp_notes = apply_tensor_parallel_to_stages(model.stage_modules, dims.mesh("tp", device.type), tp_plans)
        after = dict(model.named_parameters(remove_duplicate=False))
        if model_parameters is not None:
            model_parameters = remap_params(model_parameters, {i: after[n] for i, n in names.items()})
    # ... then gets the data-parallel machinery a whole model gets (rank 0's weights, ZeRO)
    strategy = apply_zero_to_stages(model, config=config, device=device, dp_mesh=dims.mesh("dp", device.type),
                                    tensor_parallel=tp_plans is not None)
    strategy.notes.extend(tp_notes)
    opt = build_optimizer(strategy, config, optimizer, model_parameters)
    sched = build_scheduler(config, lr_scheduler, opt)
    loader = None
    if training_data is not None:
        loader = FlexDataLoader(training_data, batch_size=int(config.train_micro_batch_size_per_gpu),
                                dp_rank=model.dp_index, dp_world_size=dims.dp, collate_fn=collate_fn, drop_last=True)
    engine = PipelineEngine(module=model, config=config, device=device, strategy=strategy, dims=dims,
                            tie_groups=ties, optimizer=opt, lr_scheduler=sched, training_dataloader=loader,
                            precision=PrecisionPolicy(mode=config.precision, device_type=device.type),
                            loss_scaler=build_loss_scaler(config), launch_env=launch_env)
    return engine, opt, loader, sched
