"""A Lightning Fabric strategy that trains on flexspeed, configured by a DeepSpeed config.

    from lightning.fabric import Fabric
    from flexspeed.integrations.lightning import FlexspeedStrategy

    fabric = Fabric(accelerator="cpu", devices=2, strategy=FlexspeedStrategy(config="ds_config.json"))
    fabric.launch()
    model, optimizer = fabric.setup(model, optimizer)     # -> flexspeed.initialize(...)
    for i, batch in enumerate(loader):
        accumulating = (i + 1) % 2 != 0
        with fabric.no_backward_sync(model, enabled=accumulating):
            fabric.backward(model(batch).loss)            # engine.backward: / gradient_accumulation_steps
        if not accumulating:
            optimizer.step()                              # engine.step(): clip, update, schedule
            optimizer.zero_grad()

What it is: Fabric's DDP strategy (launching, process group - gloo on CPU, NCCL on GPUs - collectives,
samplers) with the model and optimizer handed to :func:`flexspeed.initialize` instead of DDP: the ZeRO stage,
precision (``bf16``/``fp16`` sections: flexspeed autocasts; keep Fabric's precision at its default
``"32-true"``), gradient clipping and accumulation come from the DeepSpeed config, as with Lightning's own
``DeepSpeedStrategy`` - which needs DeepSpeed and CUDA, where this one runs on CPU too and needs neither.

Accumulation: with ``fabric.no_backward_sync(model, enabled=...)`` the loop decides the boundary (the backward
outside the block ends the cycle, as Accelerate drives it); a loop that never uses it calls ``optimizer.step()``
after every backward and the config's ``gradient_accumulation_steps`` decides (DeepSpeed's counting).
Checkpoints: ``fabric.save(path, state)`` writes a flexspeed (DeepSpeed-layout) checkpoint folder through
``engine.save_checkpoint`` with the other entries of ``state`` as client state; ``fabric.load`` restores it.
The Lightning ``Trainer``: :class:`FlexspeedTrainerStrategy` (``Trainer(strategy=FlexspeedTrainerStrategy(
config=...))``), the same engine driven by the Trainer's loop.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

import torch
from lightning.fabric.strategies import DDPStrategy
from lightning.fabric.strategies.strategy import _BackwardSyncControl
from torch import nn

__all__ = ["FlexspeedStrategy", "FlexspeedTrainerStrategy"]


class _EngineBoundary(_BackwardSyncControl):
    """``fabric.no_backward_sync(model, enabled)``: the backwards inside accumulate (no reduction, no update); the
    next one outside ends the cycle (the engine's ``set_gradient_accumulation_boundary``)."""

    def __init__(self, strategy: FlexspeedStrategy) -> None:
        self._strategy = strategy

    def no_backward_sync(self, module: nn.Module, enabled: bool) -> contextlib.AbstractContextManager:
        return self._strategy._accumulate(enabled)


def _load_config(config: str | os.PathLike | dict | None) -> dict:
    if config is None:
        return {}
    if isinstance(config, dict):
        return json.loads(json.dumps(config))  # a private copy
    from flexspeed.config import load_config

    return load_config(config=os.fspath(config))


class FlexspeedStrategy(DDPStrategy):
    """Fabric strategy: DDP's launching and collectives, flexspeed's engine (configured by a DeepSpeed config).

    Args:
        config: a DeepSpeed config (dict, or path to a JSON file). ``train_micro_batch_size_per_gpu`` defaults to
            1 when no batch size is given (Lightning's DeepSpeed strategy does the same).
        **kwargs: Fabric's ``DDPStrategy`` arguments (``accelerator``, ``parallel_devices``, ``timeout``, ...).
    """

    strategy_name = "flexspeed"

    def __init__(self, config: str | os.PathLike | dict | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.config = _load_config(config)
        if not any(k in self.config for k in ("train_batch_size", "train_micro_batch_size_per_gpu")):
            self.config["train_micro_batch_size_per_gpu"] = 1
        self._engine: Any = None
        self._accumulating = False
        self._driven = False  # the loop uses no_backward_sync: it decides the accumulation boundary
        self._backward_sync_control = _EngineBoundary(self)  # what fabric.no_backward_sync calls

    @property
    def model(self) -> Any:
        """The flexspeed engine (``DeepSpeedEngine``) once set up."""
        return self._engine

    @property
    def zero_stage_3(self) -> bool:
        return (self.config.get("zero_optimization") or {}).get("stage") == 3

    # ---- set-up ---------------------------------------------------------------------------------------------
    def setup_module_and_optimizers(self, module: nn.Module, optimizers: list[torch.optim.Optimizer],
                                    scheduler: Any = None) -> tuple[Any, list[torch.optim.Optimizer], Any]:
        if len(optimizers) != 1:
            raise ValueError(f"FlexspeedStrategy drives one optimizer (the engine's); got {len(optimizers)}. Fix: "
                             "combine the parameter groups into one optimizer")
        import flexspeed

        self._engine, optimizer, _, scheduler = flexspeed.initialize(
            model=module, optimizer=optimizers[0], lr_scheduler=scheduler, config=self.config,
            dist_init_required=False)
        return self._engine, [optimizer], scheduler

    def setup_module(self, module: nn.Module) -> Any:
        import flexspeed

        self._engine, *_ = flexspeed.initialize(model=module, config=self.config, dist_init_required=False)
        return self._engine

    def setup_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        raise TypeError(f"fabric.setup_optimizers({type(optimizer).__name__}): FlexspeedStrategy sets up the model "
                        "and its optimizer together, not an optimizer alone. Fix: call fabric.setup(model, optimizer) "
                        "instead of fabric.setup_optimizers(optimizer)")

    def module_to_device(self, module: nn.Module) -> None:
        if not any(p.is_meta or getattr(p, "ds_shape", None) is not None for p in module.parameters()):
            module.to(self.root_device)

    def module_sharded_context(self) -> contextlib.AbstractContextManager:
        """``fabric.init_module()``: at ZeRO stage 3, build under ``flexspeed.zero.Init`` (sharded by ``setup``)."""
        from flexspeed.zero import Init

        return Init(enabled=self.zero_stage_3)

    def module_init_context(self, empty_init: bool | None = None) -> contextlib.AbstractContextManager:
        if not self.zero_stage_3:
            return super().module_init_context(empty_init=empty_init)
        stack = contextlib.ExitStack()
        stack.enter_context(self.precision.module_init_context())
        stack.enter_context(self.module_sharded_context())
        return stack

    # ---- the training step ----------------------------------------------------------------------------------
    def backward(self, tensor: torch.Tensor, module: nn.Module | None, *args: Any, **kwargs: Any) -> None:
        engine = self._require_engine("fabric.backward")
        if self._driven:
            engine.set_gradient_accumulation_boundary(not self._accumulating)
        engine.backward(tensor, *args, **kwargs)

    def optimizer_step(self, optimizer: Any, **kwargs: Any) -> Any:
        if kwargs.get("closure") is not None:
            raise ValueError("FlexspeedStrategy: optimizer.step(closure=...) is not supported (the engine steps "
                             "after fabric.backward). Fix: call optimizer.step() without a closure")
        return self._require_engine("optimizer.step").step()

    @contextlib.contextmanager
    def _accumulate(self, enabled: bool) -> Iterator[None]:
        self._driven = True
        before, self._accumulating = self._accumulating, bool(enabled)
        try:
            yield
        finally:
            self._accumulating = before

    def clip_gradients_norm(self, module: nn.Module, optimizer: Any, max_norm: float | int, norm_type: float | int = 2.0,
                            error_if_nonfinite: bool = True) -> torch.Tensor:
        raise ValueError(f"fabric.clip_gradients(max_norm={max_norm!r}): FlexspeedStrategy clips gradients in "
                         "engine.step(), from the config, so a clipping call has nothing to clip. Fix: set "
                         f'"gradient_clipping": {max_norm} in the DeepSpeed config instead of calling '
                         "fabric.clip_gradients")

    def _require_engine(self, what: str) -> Any:
        if self._engine is None:
            raise RuntimeError(f"{what} before fabric.setup(model, optimizer): FlexspeedStrategy needs the engine "
                               "that setup() builds. Fix: call fabric.setup(...) first")
        return self._engine

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def save_checkpoint(self, path: Any, state: dict[str, Any], storage_options: Any = None,
                        filter: Any = None) -> None:
        if storage_options is not None or filter is not None:
            raise TypeError("FlexspeedStrategy.save_checkpoint: storage_options/filter are not supported (the engine "
                            "writes its own checkpoint folder). Fix: drop them")
        engine = self._require_engine("fabric.save")
        client = {k: v for k, v in state.items() if not isinstance(v, (nn.Module, torch.optim.Optimizer))
                  and v is not engine and not hasattr(v, "_optimizer")}
        engine.save_checkpoint(os.fspath(path), client_state=client)

    def load_checkpoint(self, path: Any, state: Any = None, strict: bool = True, weights_only: bool | None = None
                        ) -> dict[str, Any]:
        engine = self._require_engine("fabric.load")
        _, client = engine.load_checkpoint(os.fspath(path), load_module_strict=strict)
        if client is None:
            raise FileNotFoundError(f"fabric.load({os.fspath(path)!r}): no flexspeed checkpoint there (expected a "
                                    "folder written by fabric.save with FlexspeedStrategy)")
        if isinstance(state, dict):
            for key in list(client):
                if key in state and not isinstance(state[key], (nn.Module, torch.optim.Optimizer)):
                    state[key] = client.pop(key)
        return client


# ---- the Lightning Trainer ------------------------------------------------------------------------------------
def _trainer_strategy_base() -> type:
    from lightning.pytorch.strategies import DDPStrategy as TrainerDDPStrategy

    return TrainerDDPStrategy


class FlexspeedTrainerStrategy(_trainer_strategy_base()):
    """Lightning ``Trainer`` strategy on flexspeed: ``Trainer(strategy=FlexspeedTrainerStrategy(config=...))``.

    DDP's launching and collectives; the LightningModule and the single optimizer of ``configure_optimizers``
    go to :func:`flexspeed.initialize` with the DeepSpeed config, whose ``gradient_accumulation_steps`` is the
    Trainer's ``accumulate_grad_batches`` and ``gradient_clipping`` its ``gradient_clip_val`` (set them on the
    Trainer, not in the config, as with Lightning's DeepSpeed strategy). The engine counts the accumulation
    (``handles_gradient_accumulation``); Lightning has already divided the loss by ``accumulate_grad_batches``,
    so the engine's backward does not divide again. The schedulers of ``configure_optimizers`` stay Lightning's.
    Checkpoints: ``trainer.save_checkpoint``/``ModelCheckpoint`` write a flexspeed checkpoint folder (the
    Trainer's own state as client state); ``ckpt_path=`` resumes from one.
    """

    strategy_name = "flexspeed_trainer"

    def __init__(self, config: str | os.PathLike | dict | None = None, **kwargs: Any) -> None:
        from lightning.pytorch.strategies.strategy import _ForwardRedirection

        super().__init__(**kwargs)
        self.config = _load_config(config)
        self._forward_redirection = _ForwardRedirection()  # the engine's forward runs the module's

    @property
    def handles_gradient_accumulation(self) -> bool:
        return True

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True  # the engine (which loads the checkpoint) exists after setup

    @property
    def lightning_restore_optimizer(self) -> bool:
        return False  # engine.load_checkpoint restored it

    def setup_optimizers(self, trainer: Any) -> None:
        self.optimizers, self.lr_scheduler_configs = [], []  # made in setup, with the engine

    def _engine_config(self, trainer: Any) -> dict:
        for key, arg in (("gradient_accumulation_steps", "accumulate_grad_batches"),
                         ("gradient_clipping", "gradient_clip_val")):
            if key in self.config:
                raise ValueError(f"FlexspeedTrainerStrategy: remove {key!r} from the DeepSpeed config and pass "
                                 f"Trainer({arg}=...) instead (the Trainer's value decides; two would disagree)")
        if trainer.gradient_clip_algorithm not in (None, "norm"):
            raise ValueError(f"Trainer(gradient_clip_algorithm={trainer.gradient_clip_algorithm!r}): flexspeed clips "
                             "the global norm only. Fix: use gradient_clip_algorithm='norm'")
        cfg = dict(self.config, gradient_accumulation_steps=trainer.accumulate_grad_batches,
                   gradient_clipping=float(trainer.gradient_clip_val or 0.0))
        if not any(k in cfg for k in ("train_batch_size", "train_micro_batch_size_per_gpu")):
            cfg["train_micro_batch_size_per_gpu"] = 1
        return cfg

    def setup(self, trainer: Any) -> None:
        from lightning.pytorch.core.optimizer import _init_optimizers_and_lr_schedulers
        from lightning.pytorch.trainer.states import TrainerFn

        import flexspeed

        self.accelerator.setup(trainer)
        module = self.precision_plugin.convert_module(self.model)
        self.setup_precision_plugin()
        cfg = self._engine_config(trainer)
        optimizer, schedulers = None, []
        if trainer.state.fn == TrainerFn.FITTING:
            optimizers, schedulers = _init_optimizers_and_lr_schedulers(self.lightning_module)
            if len(optimizers) != 1:
                raise ValueError(f"FlexspeedTrainerStrategy drives one optimizer; configure_optimizers gave "
                                 f"{len(optimizers)}. Fix: combine them into one with parameter groups")
            optimizer = optimizers[0]
        engine, opt, _, _ = flexspeed.initialize(model=module, optimizer=optimizer, config=cfg,
                                                 dist_init_required=False)
        self.model = engine
        self.optimizers = [opt] if opt is not None else []
        self.lr_scheduler_configs = schedulers
        self.barrier()

    def model_to_device(self) -> None:
        if not any(p.is_meta or getattr(p, "ds_shape", None) is not None for p in self.model.parameters()):
            self.model.to(self.root_device)

    def backward(self, closure_loss: torch.Tensor, optimizer: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        module = self.lightning_module
        closure_loss = self.precision_plugin.pre_backward(closure_loss, module)
        self.model.backward(closure_loss, scale_wrt_gas=False)  # Lightning divided by accumulate_grad_batches
        return self.precision_plugin.post_backward(closure_loss, module)

    def optimizer_step(self, optimizer: Any, closure: Any, model: Any = None, **kwargs: Any) -> Any:
        closure()  # training_step and backward
        return self.model.step()

    @contextlib.contextmanager
    def block_backward_sync(self) -> Iterator[None]:
        yield  # the engine decides when gradients are reduced

    def save_checkpoint(self, checkpoint: dict, filepath: Any, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("FlexspeedTrainerStrategy.save_checkpoint: storage_options is not supported")
        client = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        self.model.save_checkpoint(os.fspath(filepath), client_state=client)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        _, client = self.model.load_checkpoint(os.fspath(checkpoint_path))
        if client is None:
            raise FileNotFoundError(f"ckpt_path={os.fspath(checkpoint_path)!r}: no flexspeed checkpoint there")
        return client

    def load_model_state_dict(self, checkpoint: Any, strict: bool = True) -> None:
        pass  # engine.load_checkpoint restored the weights

    def load_optimizer_state_dict(self, checkpoint: Any) -> None:
        pass  # ... and the optimizer

    def teardown(self) -> None:
        # Lightning moves the module and optimizer state to the CPU here; sharded (DTensor) parameters are not
        # moved that way, so the engine is left as it is (as Lightning's DeepSpeed strategy does):
        # trainer.save_checkpoint after fit still writes a resumable checkpoint
        if self.cluster_environment is not None:
            self.cluster_environment.teardown()
        self.precision_plugin.teardown()
        self.accelerator.teardown()
        self.checkpoint_io.teardown()

    def remove_checkpoint(self, filepath: Any) -> None:
        if self.is_global_zero:
            import shutil

            shutil.rmtree(os.fspath(filepath), ignore_errors=True)
