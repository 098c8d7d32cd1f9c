"""Loading a training checkpoint: verified, and transactional across ranks.

Two phases. *Read*: every rank reads and verifies everything it needs - the manifest (schema and
digest), the engine and client state, its RNG file, DCP's ``.metadata`` (storage paths confined
to the tag, records as saved) and its tensors, each record checked against its checksum as it is
read - into fresh tensors, without touching the engine. One small collective then agrees on the
outcome: if any rank failed, every rank raises the same ``CheckpointError`` naming the rank, the
file and the check, and no engine has changed. *Apply*: only then are weights, optimizer state,
counters, scheduler, loss scaler, data position and RNG set.

A checkpoint written before checksums existed (format version 1) still loads, with one warning
that its files cannot be verified; schemas, path confinement and the symlink rules still apply.
"""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from flexspeed.runtime.checkpoint import (
    all_gather,
    dir_bytes,
    fqn_param_groups,
    rank_world,
    set_rng_state,
    state_dicts,
    tensor_tree,
    log,
)
from flexspeed.runtime.checkpoint_io import (
    CLIENT_FILE,
    ENGINE_FILE,
    MANIFEST,
    RNG_DIR,
    STATE_DIR,
    CheckpointError,
    SafeFileSystemReader,
    UnsafeCheckpointError,
    read_latest,
    read_manifest,
    resolve_tag_dir,
    safe_dcp_load,
    safe_torch_load,
    validate_dir,
    validate_tag,
)
from flexspeed.runtime.checkpoint_verify import (
    Integrity,
    check_not_link,
    validate_engine_state,
    validate_manifest,
)
from flexspeed.utils.logging import ensure_handler, human_bytes, warn_once

__all__ = ["load_checkpoint"]

@dataclass
class _Staged:
    """Everything read and verified by one rank, not yet applied."""

    path: str
    meta: dict
    client_state: Any
    rng: dict | None = None
    model_sd: dict = field(default_factory=dict)
    optim_sd: dict | None = None


def load_checkpoint(engine: Any, load_dir: str | os.PathLike, tag: Any = None, load_module_strict: bool = True,
                    load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                    load_module_only: bool = False) -> tuple[str | None, dict | None]:
    """Restore ``engine`` from a checkpoint saved at any world size and ZeRO stage; every rank calls it.

    Args:
        engine: the ``TrainingEngine`` (built the same way as the one that saved, any world size/stage).
        load_dir: the ``save_dir`` given to ``save_checkpoint``.
        tag: which tag; ``None`` reads ``load_dir/latest``.
        load_module_strict: every model key must match (else missing keys keep their current values).
        load_optimizer_states: restore the optimizer's per-parameter state and hyperparameters.
        load_lr_scheduler_states: restore the scheduler.
        load_module_only: restore the model weights only (no optimizer, scheduler, counters, RNG or data
            position), e.g. to fine-tune from a trained checkpoint.
    Returns:
        ``(path of the loaded tag, client_state)``, or ``(None, None)`` when ``tag`` is None and there
        is no ``latest`` file (with a warning naming the directory).
    Raises:
        CheckpointError: on every rank, naming the rank, file and check, when any rank's files are
            missing, damaged, unsafe or do not fit the engine; the engine is then unchanged.
    """
    started = time.perf_counter()
    load_dir = os.path.abspath(validate_dir(load_dir, what="load_dir"))
    staged, error = None, None
    try:
        with engine.zero_strategy.local_optimizer_steps():
            staged = _read(engine, load_dir, tag, strict=load_module_strict, module_only=load_module_only,
                           with_optimizer=bool(load_optimizer_states and not load_module_only
                                               and engine.optimizer is not None))
    except (CheckpointError, ValueError) as e:  # ValueError: a tag the user passed (or wrote in 'latest')
        error = (type(e).__name__ if isinstance(e, UnsafeCheckpointError) or not isinstance(e, CheckpointError)
                 else "CheckpointError", str(e))
    except Exception as e:  # noqa: BLE001 - every failure must reach the agreement below, named
        error = ("CheckpointError", f"reading the checkpoint in {load_dir} failed ({type(e).__name__}: {e})")
    _agree_or_raise(error)
    if staged is None:
        warnings.warn(f"flexspeed: no 'latest' file in {load_dir}, so there is no checkpoint to load; "
                      "returning (None, None). Fix: pass tag=... to load a specific checkpoint", stacklevel=3)
        return None, None
    with engine.zero_strategy.local_optimizer_steps():
        _apply(engine, staged, module_only=load_module_only, load_lr_scheduler_states=load_lr_scheduler_states)
    if rank_world()[0] == 0:
        ensure_handler().info("loaded checkpoint %s (%s%s) in %.1f s", staged.path, human_bytes(dir_bytes(staged.path)),
                              ", weights only" if load_module_only else "", time.perf_counter() - started)
    return staged.path, staged.client_state


_ERRORS = {"CheckpointError": CheckpointError, "UnsafeCheckpointError": UnsafeCheckpointError,
           "ValueError": ValueError}


def _agree_or_raise(error: tuple[str, str] | None) -> None:
    """One all-gather of every rank's outcome; any failure raises the same error on every rank."""
    gathered = all_gather(error)
    failed = [(r, e) for r, e in enumerate(gathered) if e is not None]
    if not failed:
        return
    rank, (kind, message) = failed[0]
    _, world = rank_world()
    where = f"on rank {rank} " if world > 1 else ""
    others = f" (also failed on rank(s) {[r for r, _ in failed[1:]]})" if len(failed) > 1 else ""
    text = f"load_checkpoint failed {where}before anything was changed{others}: {message}"
    raise _ERRORS.get(kind, CheckpointError)(text)


def _read(engine: Any, load_dir: str, tag: Any, *, strict: bool, module_only: bool,
          with_optimizer: bool) -> _Staged | None:
    """This rank's part of the checkpoint, read and verified; the engine is not changed."""
    rank, _ = rank_world()
    if tag is None:
        tag = read_latest(load_dir)
        if tag is None:
            return None
    path = resolve_tag_dir(load_dir, validate_tag(tag))
    for sub, what in (("", "checkpoint tag directory"), (STATE_DIR, "checkpoint directory"),
                      (RNG_DIR, "checkpoint directory")):
        check_not_link(os.path.join(path, sub) if sub else path, what)
    manifest = read_manifest(path)
    validate_manifest(manifest, os.path.join(path, MANIFEST))
    integrity = Integrity(path, manifest.get("integrity"))
    if not integrity.enabled and rank == 0:
        warn_once(f"flexspeed: checkpoint {path} was written before flexspeed recorded checksums (format version "
                  f"{manifest.get('format_version')}); its files cannot be verified. Fix: save it again with this "
                  "flexspeed to protect it")
    meta = safe_torch_load(os.path.join(path, ENGINE_FILE), integrity.read(ENGINE_FILE))
    validate_engine_state(meta, os.path.join(path, ENGINE_FILE))
    staged = _Staged(path, meta, safe_torch_load(os.path.join(path, CLIENT_FILE), integrity.read(CLIENT_FILE)))
    if not module_only:
        staged.rng = _read_rng(path, manifest, integrity, rank)
    if with_optimizer and not manifest["has_optimizer_state"]:
        warnings.warn(f"checkpoint {path} holds no optimizer state; the optimizer keeps its current state",
                      stacklevel=4)
        with_optimizer = False
    _read_tensors(engine, staged, integrity, strict=strict, with_optimizer=with_optimizer)
    return staged


def _read_rng(path: str, manifest: dict, integrity: Integrity, rank: int) -> dict:
    """Rank r takes the RNG state saved by rank ``r % saved_world_size``; every saved rank's file must exist."""
    saved_world = manifest["world_size"]
    for r in range(saved_world):
        name = os.path.join(path, RNG_DIR, f"rank{r}.pt")
        if not os.path.isfile(name) or os.path.islink(name):
            raise CheckpointError(f"checkpoint file {name} is missing or not a regular file (a symbolic link is "
                                  f"refused; the manifest says {saved_world} rank(s) saved): the checkpoint is "
                                  "incomplete. Fix: load another tag")
    name = f"{RNG_DIR}/rank{rank % saved_world}.pt"
    state = safe_torch_load(os.path.join(path, name), integrity.read(name))
    if not (isinstance(state, dict) and torch.is_tensor(state.get("torch_cpu"))
            and isinstance(state.get("python"), (tuple, list)) and len(state["python"]) == 3):
        raise CheckpointError(f"checkpoint file {os.path.join(path, name)} failed its schema check: not an RNG "
                              "state (torch_cpu tensor and python random state)")
    return state


def _fresh(tree: Any) -> Any:
    """A copy of ``tree`` with every tensor replaced by a new, uninitialised one (the load target)."""
    if torch.is_tensor(tree):
        return torch.empty_like(tree)
    if isinstance(tree, dict):
        return {k: _fresh(v) for k, v in tree.items()}
    return tree


def _read_tensors(engine: Any, staged: _Staged, integrity: Integrity, *, strict: bool, with_optimizer: bool) -> None:
    """Model (and optimizer) tensors of this rank's shard into fresh tensors, each record verified."""
    state_dir = os.path.join(staged.path, STATE_DIR)
    metadata = SafeFileSystemReader(state_dir, integrity).read_metadata()
    model_sd, optim_sd = state_dicts(engine, with_optimizer=with_optimizer, for_load=True)
    saved = {k[len("model."):] for k in metadata.state_dict_metadata if k.startswith("model.")}
    _check_model_keys(model_sd, saved - engine.checkpoint_keys_elsewhere(saved),
                      set(staged.meta.get("excluded_model_keys") or ()), strict, staged.path)
    target: dict[str, Any] = {"model": _fresh(model_sd)}
    if optim_sd is not None:
        available = {k for k in metadata.state_dict_metadata if k.startswith("optim.state.")}
        counters = staged.meta["counters"]
        if not available and counters["global_steps"] > counters["skipped_steps"]:
            raise CheckpointError(f"{state_dir}/.metadata failed its entry check: the manifest says the checkpoint "
                                  f"holds optimizer state after {counters['global_steps']} steps, but there are no "
                                  "optim.* entries. Fix: load another tag, or pass load_optimizer_states=False to "
                                  "restart the optimizer deliberately")
        # parameters with no saved state (never stepped) must end up with none, as in the saving run
        wanted = {fqn: {k: v for k, v in leaves.items() if f"optim.state.{fqn}.{k}" in available}
                  for fqn, leaves in tensor_tree(optim_sd["state"]).items()}
        target["optim"] = {"state": _fresh({fqn: leaves for fqn, leaves in wanted.items() if leaves})}
    safe_dcp_load(target, state_dir, what=f"loading the tensors of {staged.path}", no_dist=True,
                  allow_partial_load=True, integrity=integrity)
    staged.model_sd = target["model"]
    if optim_sd is not None:
        staged.optim_sd = _merge_optim(optim_sd, target["optim"]["state"], staged.meta.get("optimizer_param_groups"),
                                       fqn_param_groups(engine.module, engine.optimizer))


def _apply(engine: Any, staged: _Staged, *, module_only: bool, load_lr_scheduler_states: bool) -> None:
    """Set everything read by :func:`_read` (every rank agreed that it read it all)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_state_dict

    options = StateDictOptions(strict=False)
    if staged.optim_sd is None:
        set_model_state_dict(engine.module, staged.model_sd, options=options)
    else:
        set_state_dict(engine.module, optimizers=engine.optimizer, model_state_dict=staged.model_sd,
                       optim_state_dict=staged.optim_sd, options=options)
    if not module_only:
        _restore_engine(engine, staged.meta, load_lr_scheduler_states=load_lr_scheduler_states)
        set_rng_state(staged.rng)


def _check_model_keys(model_sd: dict, saved: set[str], excluded: set[str], strict: bool, path: str) -> None:
    """``saved``: the checkpoint's model keys this rank should hold (a pipeline rank: its own layers')."""
    missing = sorted(set(model_sd) - saved - excluded)
    unexpected = sorted(saved - set(model_sd))
    if strict and (missing or unexpected):
        raise CheckpointError(f"the model does not match checkpoint {path}: missing keys {missing[:10]}"
                              f"{'...' if len(missing) > 10 else ''}, unexpected keys {unexpected[:10]}"
                              f"{'...' if len(unexpected) > 10 else ''}. Fix: build the same model, or pass "
                              "load_module_strict=False to keep current values for missing keys")
    if missing:
        log.warning("flexspeed: %d model keys are not in the checkpoint and keep their values: %s", len(missing),
                    missing[:10])


# param-group keys that say how an optimizer computes its step, not what it computes
IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable")


def _merge_optim(template: dict, loaded_state: dict, saved_groups: list | None, current_groups: list) -> dict:
    """The optimizer state dict to set: loaded tensors (numbers restored) and the saved hyperparameters.

    ``template`` is torch's state dict of the live optimizer; ``saved_groups``/``current_groups``
    are param groups named by :func:`fqn_param_groups`, compared to match groups by their members.
    """
    state: dict[str, dict] = {}
    for fqn, leaves in loaded_state.items():
        entry = dict(template["state"].get(fqn, {}))
        for key, value in leaves.items():
            before = entry.get(key)
            entry[key] = value if torch.is_tensor(before) or before is None else type(before)(value.item())
        state[fqn] = entry
    groups = template["param_groups"]
    if saved_groups:
        # each current group's parameters among the saved group's (a pipeline rank holds only its stages')
        if len(saved_groups) == len(current_groups) == len(groups) and all(
                set(cur["params"]) <= set(saved["params"]) for saved, cur in zip(saved_groups, current_groups)):
            # the saved hyperparameters; how this run's optimizer computes (foreach, fused, ...) stays
            # this run's: a stage-3 save runs fused Adam on shards, a stage-1 or TP resume may not
            groups = [{**{k: v for k, v in saved.items() if k != "params" and k not in IMPLEMENTATION_KEYS},
                       **{k: live[k] for k in IMPLEMENTATION_KEYS if k in live}, "params": live["params"]}
                      for saved, live in zip(saved_groups, groups)]
        else:
            warnings.warn(f"flexspeed: the optimizer's parameter groups differ from the checkpoint's (saved "
                          f"{len(saved_groups)} groups, now {len(current_groups)}); per-parameter state is "
                          "restored, hyperparameters (lr, betas, ...) stay as configured now", stacklevel=4)
    return {"state": state, "param_groups": groups}


def _restore_engine(engine: Any, meta: dict, *, load_lr_scheduler_states: bool) -> None:
    counters = meta["counters"]
    for key, value in counters.items():
        setattr(engine, key, int(value))
    gas_now, gas_saved = int(engine.gradient_accumulation_steps()), int(meta["gradient_accumulation_steps"])
    if gas_now != gas_saved:  # keep accumulation boundaries aligned with optimizer steps
        engine.micro_steps = int(counters["global_steps"]) * gas_now
    sched = getattr(engine, "lr_scheduler", None)
    if load_lr_scheduler_states and sched is not None and meta.get("lr_scheduler") is not None:
        sched.load_state_dict(meta["lr_scheduler"])
    scaler = getattr(engine, "loss_scaler", None)
    if scaler is not None and meta.get("loss_scaler") is not None:
        scaler.load_state_dict(meta["loss_scaler"])
    loader = getattr(engine, "training_dataloader", None)
    if loader is not None and meta.get("dataloader") is not None and hasattr(loader, "load_state_dict"):
        loader.load_state_dict(meta["dataloader"])


