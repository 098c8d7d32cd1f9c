"""Pipeline checkpoints: one ``torch.distributed.checkpoint`` directory, keyed by layer index.

Layout of ``<save_dir>/<tag>/`` (a DCP checkpoint) and ``<save_dir>/latest`` (the last tag):

- ``module.<layer>.<param>``: every layer's tensors, under its *global layer index*, the key
  of ``nn.Sequential(*layers)``; tied copies are stored at each of their positions;
- ``optim.state.<layer>.<param>.<name>``: optimizer state tensors (``exp_avg``, ``step``, ...);
  tied weights use the first position of their tie key;
- ``optim.param.<layer>.<param>``: that parameter's param-group hyperparameters and
  non-tensor state (pickled);
- ``engine``: counters, loss scaler, LR scheduler, data loader position, client state and the
  layout that wrote it (pickled).

Nothing in the keys depends on the number of stages, virtual stages, data-parallel ranks or
the partition, so a checkpoint loads under any of them. Data-parallel replicas write each key
once (DCP deduplicates), and under ZeRO-1 each replica writes the optimizer state it owns.
``export_sequential_state_dict(dir)`` reads the ``module.*`` part in one process and returns a
plain state dict for ``nn.Sequential(*layers)``.
"""

from __future__ import annotations

import os
import pickle
import warnings
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from flexspeed.runtime.checkpoint_io import validate_dir

if TYPE_CHECKING:
    from flexspeed.pipe.engine import PipelineEngine

__all__ = ["save_pipeline_checkpoint", "load_pipeline_checkpoint", "export_sequential_state_dict", "resolve_tag"]

FORMAT = "flexspeed-pipeline-v1"


def resolve_tag(load_dir: str, tag: str | None) -> str | None:
    """``tag`` or the one recorded in ``<load_dir>/latest`` (``None`` if there is none)."""
    if tag is not None:
        return str(tag)
    latest = os.path.join(load_dir, "latest")
    if not os.path.isfile(latest):
        return None
    with open(latest) as f:
        return f.read().strip()


def _param_names(engine: PipelineEngine) -> dict[int, str]:
    return {id(p): engine.module.canonical_name(n) for n, p in engine.module.named_parameters()}


def _optimizer_entries(engine: PipelineEngine) -> dict[str, Any]:
    opt = engine.optimizer
    if opt is None:
        return {}
    names = _param_names(engine)
    out: dict[str, Any] = {}
    for group in opt.param_groups:
        hyper = {k: v for k, v in group.items() if k != "params"}
        for p in group["params"]:
            name = names[id(p)]
            scalars = {}
            for key, value in opt.state.get(p, {}).items():
                if torch.is_tensor(value):
                    out[f"optim.state.{name}.{key}"] = value
                else:
                    scalars[key] = value
            out[f"optim.param.{name}"] = pickle.dumps({"group": hyper, "scalars": scalars})
    return out


def save_pipeline_checkpoint(engine: PipelineEngine, save_dir: str, *, tag: str | None = None,
                             client_state: dict | None = None, save_latest: bool = True,
                             exclude_frozen_parameters: bool = False) -> bool:
    """Write ``engine``'s state to ``<save_dir>/<tag>`` (every rank must call).

    Args:
        engine: the pipeline engine.
        save_dir: checkpoint root.
        tag: sub-directory name; default ``global_step<N>``.
        client_state: picklable user state returned by ``load_checkpoint``.
        save_latest: record ``tag`` in ``<save_dir>/latest``.
        exclude_frozen_parameters: leave out parameters with ``requires_grad=False``.
    Returns:
        ``True``.
    """
    save_dir = validate_dir(save_dir, what="save_dir")
    tag = str(tag) if tag is not None else f"global_step{engine.global_steps}"
    module = engine.module
    frozen = {n for n, p in module.named_parameters() if not p.requires_grad} if exclude_frozen_parameters else set()
    state: dict[str, Any] = {f"module.{k}": v for k, v in module.state_dict().items() if k not in frozen}
    state.update(_optimizer_entries(engine))
    loader = engine.training_dataloader
    state["engine"] = pickle.dumps({
        "format": FORMAT, "global_steps": engine.global_steps, "global_samples": engine.global_samples,
        "skipped_steps": engine.skipped_steps,
        "loss_scaler": engine.loss_scaler.state_dict() if engine.loss_scaler is not None else None,
        "lr_scheduler": engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
        "dataloader": loader.state_dict() if hasattr(loader, "state_dict") else None,
        "client_state": client_state or {},
        "layout": {"num_stages": engine.num_stages, "virtual_stages": module.virtual_stages,
                   "dp": engine.dp_world_size, "bounds": module.partition_bounds(),
                   "zero_stage": engine.zero_optimization_stage()},
    })
    path = os.path.join(save_dir, tag)
    dcp.save(state, checkpoint_id=path)
    if save_latest and dist.get_rank() == 0:
        with open(os.path.join(save_dir, "latest"), "w") as f:
            f.write(tag)
    dist.barrier()
    return True


def _restore_optimizer(engine: PipelineEngine, path: str, available: dict[str, Any]) -> None:
    """Read this rank's optimizer entries (shapes from the checkpoint metadata) and install them."""
    opt = engine.optimizer
    names = _param_names(engine)
    want: dict[str, Any] = {}
    for group in opt.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            key = f"optim.param.{name}"
            if key not in available:
                raise KeyError(f"checkpoint {path} has no optimizer state for parameter {name!r}; pass "
                               "load_optimizer_states=False to load the weights only")
            want[key] = b""
            prefix = f"optim.state.{name}."
            for k, meta in available.items():
                if k.startswith(prefix) and isinstance(meta, TensorStorageMetadata):
                    want[k] = torch.empty(meta.size, dtype=meta.properties.dtype, device=p.device)
    dcp.load(want, checkpoint_id=path)
    for group in opt.param_groups:
        for i, p in enumerate(group["params"]):
            name = names[id(p)]
            entry = pickle.loads(want[f"optim.param.{name}"])
            if i == 0:
                group.update(entry["group"])
            prefix = f"optim.state.{name}."
            st = {k[len(prefix):]: v for k, v in want.items() if k.startswith(prefix)}
            st.update(entry["scalars"])
            if st:
                opt.state[p] = st


def load_pipeline_checkpoint(engine: PipelineEngine, load_dir: str, *, tag: str | None = None,
                             load_module_strict: bool = True, load_optimizer_states: bool = True,
                             load_lr_scheduler_states: bool = True) -> tuple[str | None, dict | None]:
    """Load ``<load_dir>/<tag>`` (default: the ``latest`` tag) into ``engine`` (every rank must call).

    Returns:
        ``(path, client_state)``, or ``(None, None)`` when there is no checkpoint to load.
    """
    load_dir = validate_dir(load_dir, what="load_dir")
    tag = resolve_tag(load_dir, tag)
    if tag is None:
        return None, None
    path = os.path.join(load_dir, tag)
    available = FileSystemReader(path).read_metadata().state_dict_metadata
    module = engine.module
    own = module.state_dict()
    template: dict[str, Any] = {f"module.{k}": v.detach().clone() for k, v in own.items()
                                if load_module_strict or f"module.{k}" in available}
    template["engine"] = b""
    missing = [k for k in template if k not in available]
    if missing:
        raise KeyError(f"checkpoint {path} lacks {missing[:5]} (of {len(missing)}); it was written for another "
                       "model. Pass load_module_strict=False to load the matching layers only")
    dcp.load(template, checkpoint_id=path)
    meta = pickle.loads(template.pop("engine"))
    module.load_state_dict({k[len("module."):]: v for k, v in template.items()}, strict=load_module_strict)
    if load_optimizer_states and engine.optimizer is not None:
        _restore_optimizer(engine, path, available)
    if load_lr_scheduler_states and engine.lr_scheduler is not None and meta["lr_scheduler"] is not None:
        engine.lr_scheduler.load_state_dict(meta["lr_scheduler"])
    if engine.loss_scaler is not None and meta["loss_scaler"] is not None:
        engine.loss_scaler.load_state_dict(meta["loss_scaler"])
    loader = engine.training_dataloader
    if meta["dataloader"] is not None and hasattr(loader, "load_state_dict"):
        loader.load_state_dict(meta["dataloader"])
        engine._data_iter = None
    engine.global_steps = int(meta["global_steps"])
    engine.global_samples = int(meta["global_samples"])
    engine.skipped_steps = int(meta["skipped_steps"])
    dist.barrier()
    return path, meta["client_state"]


def export_sequential_state_dict(checkpoint_dir: str, tag: str | None = None,
                                 output_file: str | None = None) -> dict[str, torch.Tensor]:
    """The model weights of a pipeline checkpoint as a plain ``nn.Sequential`` state dict.

    Runs in one process (no process group needed).

    Args:
        checkpoint_dir: a ``save_checkpoint`` root (with ``latest``) or a tag directory.
        tag: the tag to read; default ``latest`` (or ``checkpoint_dir`` itself when it is one).
        output_file: also ``torch.save`` the result there.
    Returns:
        ``{"<layer index>.<param>": tensor}`` on CPU.
    """
    resolved = resolve_tag(checkpoint_dir, tag)
    path = os.path.join(checkpoint_dir, resolved) if resolved is not None else checkpoint_dir
    if not os.path.isfile(os.path.join(path, ".metadata")):
        raise FileNotFoundError(f"{path} is not a flexspeed pipeline checkpoint (no .metadata); pass the directory "
                                "given to save_checkpoint() or one of its tag sub-directories")
    available = FileSystemReader(path).read_metadata().state_dict_metadata
    state = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in available.items()
             if k.startswith("module.") and isinstance(m, TensorStorageMetadata)}
    with warnings.catch_warnings():  # one process on purpose; DCP warns that no group exists
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        dcp.load(state, checkpoint_id=path, planner=DefaultLoadPlanner(), no_dist=True)
    out = {k[len("module."):]: v for k, v in state.items()}
    out = dict(sorted(out.items(), key=lambda kv: int(kv[0].partition(".")[0])))  # stable: keeps param order
    if output_file is not None:
        torch.save(out, output_file)
    return out
