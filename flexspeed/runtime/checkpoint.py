"""Training checkpoints: resumable at any world size and ZeRO stage, atomic, and safe to load.

Layout of one checkpoint (``save_dir/<tag>/``)::

    save_dir/
      latest                     text: the newest complete tag (replaced atomically)
      global_step100/
        state/                   torch.distributed.checkpoint (DCP): tensors only -
          .metadata                model.<fqn> and optim.state.<fqn>.<key>, resharded on load
          __<rank>_0.distcp
        engine_state.pt          rank 0: counters, scheduler, loss scaler, dataloader position,
                                 optimizer param groups (torch.save, read with weights_only=True)
        client_state.pt          rank 0: the ``client_state`` dict (same rules)
        rng/rank<r>.pt           every rank: torch CPU (+CUDA), python ``random``, numpy states
        flexspeed_checkpoint.json  written last: format version, world size, stage, precision, and the
                                 size and CRC-32 of every file and DCP record (checkpoint_verify)

Atomicity: every rank writes into ``save_dir/.flexspeed-tmp-<tag>-<nonce>``; after a barrier rank
0 renames it to ``<tag>`` and then replaces ``latest`` (write-temp + ``os.replace``). A save that
dies half-way leaves only the hidden temporary directory (removed by the next save), and
``latest`` still names the previous complete tag.

Verification and transactions: a load checks every file and record it reads against the manifest
before the engine changes, and all ranks agree on the outcome first (see
:mod:`flexspeed.runtime.checkpoint_load`).

Safety: nothing is unpickled beyond what ``torch.load(weights_only=True)`` allows; DCP's own
pickled ``.metadata`` goes through a restricted unpickler (see :mod:`flexspeed.runtime.checkpoint_io`).
``client_state`` and the engine state are checked at save time to load back under those rules.

Changing the world size or ZeRO stage between save and load: model and optimizer tensors are
resharded by DCP; counters, scheduler and loss scaler are global; the dataloader resumes at the
same global sample offset (see ``FlexDataLoader``); rank ``r`` takes the RNG state saved by rank
``r % saved_world_size``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import shutil
import stat
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

from flexspeed.runtime.checkpoint_io import (
    CLIENT_FILE,
    ENGINE_FILE,
    FORMAT_VERSION,
    MANIFEST,
    RNG_DIR,
    STATE_DIR,
    TMP_PREFIX,
    CheckpointError,
    TagValidationError,
    UnsafeCheckpointError,
    commit_tag,
    quiet_single_process,
    read_latest,
    read_metadata,
    remove_stale_temporaries,
    serialize_checked,
    validate_dir,
    validate_tag,
    write_atomic,
)
from flexspeed.distributed.heartbeat import note
from flexspeed.runtime.checkpoint_verify import HASH, digest_of, hash_bytes, hash_state_files, records_of
from flexspeed.runtime.hf_folder import model_config_dict, tied_groups
from flexspeed.utils.logging import ensure_handler, human_bytes

__all__ = [
    "CheckpointError",
    "UnsafeCheckpointError",
    "save_checkpoint",
    "prepare_save",
    "SaveJob",
    "load_checkpoint",
    "validate_tag",
    "read_latest",
    "consolidate",
    "save_16bit_model",
    "FORMAT_VERSION",
]

log = logging.getLogger("flexspeed")


# ---- collective helpers ---------------------------------------------------------------------------
def rank_world() -> tuple[int, int]:
    """(rank, world size) in the default group; (0, 1) when torch.distributed is not initialized."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather(obj: Any, group: Any = None) -> list[Any]:
    """Every rank's picklable ``obj``, in rank order (just ``[obj]`` in a single process)."""
    rank, world = rank_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, obj, group=group)
    return out


def _agree_on(action: Any, what: str, *, group: Any = None) -> Any:
    """Run ``action()`` on this rank, then agree: if it failed on any rank, every rank raises the same error.

    Without this, a rank whose file write failed (a full disk) raised alone while its peers waited in the
    next collective until the process-group timeout.
    """
    error, result = None, None
    try:
        result = action()
    except Exception as e:  # noqa: BLE001 - every failure must reach the agreement, named
        error = f"{what}: {type(e).__name__}: {e}"
    rank, world = rank_world()
    if world == 1:
        if error is not None:
            raise CheckpointError(f"save_checkpoint failed {error}")
        return result
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, error, group=group)
    failed = [(r, e) for r, e in enumerate(gathered) if e is not None]
    if failed:
        first, message = failed[0]
        others = f" (also on rank(s) {[r for r, _ in failed[1:]]})" if len(failed) > 1 else ""
        raise CheckpointError(f"save_checkpoint failed on rank {first}{others} {message}. The previous "
                              "checkpoint and 'latest' are unchanged")
    return result


def _tag_validation_mode(engine: Any) -> str:
    ckpt = getattr(getattr(engine, "config", None), "checkpoint", None)
    return str(getattr(ckpt, "tag_validation", "Warn") or "Warn").capitalize()


def _agree(tag: str, error: str, mode: str) -> tuple[str, str]:
    """One all-gather: every rank's tag and local error. Returns (rank 0's tag, nonce)."""
    rank, _ = rank_world()
    nonce = f"{time.time_ns():x}{os.getpid():x}"
    gathered = all_gather((tag, nonce, error))
    errors = [f"rank {r}: {e}" for r, (_, _, e) in enumerate(gathered) if e]
    if errors:
        raise ValueError("save_checkpoint failed before writing anything:\n" + "\n".join(errors))
    tags = [t for t, _, _ in gathered]
    if len(set(tags)) > 1 and mode != "Ignore":
        msg = (f"save_checkpoint: ranks passed different tags {dict(enumerate(tags))}. Fix: pass the same tag on "
               "every rank (e.g. derived from engine.global_steps)")
        if mode == "Fail":
            raise TagValidationError(msg + " [checkpoint.tag_validation='Fail']")
        if rank == 0:
            warnings.warn(msg + f"; saving under rank 0's tag {tags[0]!r} [checkpoint.tag_validation='Warn']",
                          stacklevel=3)
    return tags[0], gathered[0][1]


# ---- the pieces of a checkpoint -------------------------------------------------------------------
def _rng_state() -> dict:
    state: dict[str, Any] = {"torch_cpu": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["torch_cuda"] = torch.cuda.get_rng_state()
    try:
        import numpy as np

        name, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = {"name": str(name), "keys": torch.from_numpy(keys.astype("int64")), "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    except ImportError:
        pass
    return state


def set_rng_state(state: dict) -> None:
    """Restore the torch (CPU, CUDA), Python and NumPy random states saved with a checkpoint."""
    torch.set_rng_state(state["torch_cpu"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "torch_cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["torch_cuda"])
    if "numpy" in state:
        try:
            import numpy as np
        except ImportError:
            return
        s = state["numpy"]
        np.random.set_state((s["name"], s["keys"].numpy().astype(np.uint32), s["pos"], s["has_gauss"],
                             s["cached_gaussian"]))


def _scalar_to_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, bool):
        return torch.tensor(value)
    if isinstance(value, int):
        return torch.tensor(value, dtype=torch.int64)
    if isinstance(value, float):
        return torch.tensor(value, dtype=torch.float64)
    return None


def tensor_tree(optim_state: dict) -> dict:
    """Optimizer per-parameter state with tensor leaves only (numbers become 0-dim tensors)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for fqn, entry in optim_state.items():
        leaves = {}
        for key, value in entry.items():
            t = value if torch.is_tensor(value) else _scalar_to_tensor(value)
            if t is not None:
                leaves[str(key)] = t
        if leaves:
            out[str(fqn)] = leaves
    return out


def fqn_param_groups(module: torch.nn.Module, optim: torch.optim.Optimizer) -> list[dict]:
    """The optimizer's param groups with each parameter named by its (first) FQN in ``module``."""
    names: dict[int, str] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        names.setdefault(id(param), name)
    return [{**{k: v for k, v in g.items() if k != "params"},
             "params": [names.get(id(p), f"<unnamed {i}>") for i, p in enumerate(g["params"])]}
            for g in optim.param_groups]


def state_dicts(engine: Any, *, with_optimizer: bool, exclude_frozen: bool = False,
                 for_load: bool = False) -> tuple[dict, dict | None]:
    """(model state, optimizer state ``{"state": {fqn: {...}}, "param_groups": [...]}``), sharded, by FQN.

    With ``for_load`` the optimizer state is allocated if it is empty (it is the load target).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_state_dict

    # frozen parameters are dropped here, not by torch's ignore_frozen_params: torch expects each
    # of them in module.state_dict(), and a model whose state_dict() leaves one out (DeepSpeed's
    # exclude_frozen_parameters test replaces it) must still save
    opts = StateDictOptions(full_state_dict=False)
    module, optim = engine.module, engine.optimizer
    frozen = {n for n, p in module.named_parameters(remove_duplicate=False) if not p.requires_grad} \
        if exclude_frozen else set()

    def model_only() -> dict:
        return _without(get_model_state_dict(module, options=opts), frozen)

    if not with_optimizer or optim is None:
        return model_only(), None
    if not optim.state and not for_load:
        # nothing stepped yet: torch's get_state_dict would initialise the state (a step at lr 0),
        # which would change the run being saved; there is no state to save
        return model_only(), {"state": {}, "param_groups": []}
    # torch allocates an empty optimizer's state with a zero-gradient step, but skips it when any
    # gradient exists (e.g. a load after a backward): hide the gradients from it for the moment
    stashed = [(p, p.grad) for g in optim.param_groups for p in g["params"] if p.grad is not None] \
        if for_load and not optim.state else []
    for p, _ in stashed:
        p.grad = None
    try:
        model_sd, optim_sd = get_state_dict(module, optim, options=opts)
        return _without(model_sd, frozen), optim_sd
    finally:
        for p, grad in stashed:
            p.grad = grad


def _without(state: dict, names: set[str]) -> dict:
    return {k: v for k, v in state.items() if k not in names} if names else state


def _all_param_groups(engine: Any) -> list[dict] | None:
    """The optimizer's param groups over every rank's parameters (collective): a pipeline rank holds only its
    stages' parameters, and the one engine-state file must name them all for any later layout."""
    if engine.optimizer is None:
        return None
    gathered = all_gather(fqn_param_groups(engine.module, engine.optimizer))
    merged = [dict(g, params=list(g["params"])) for g in gathered[0]]
    for groups in gathered[1:]:
        for mine, theirs in zip(merged, groups):
            seen = set(mine["params"])
            mine["params"] += [p for p in theirs["params"] if p not in seen]
    return merged


def _engine_state(engine: Any, excluded: list[str], param_groups: list[dict] | None) -> dict:
    loader = getattr(engine, "training_dataloader", None)
    sched = getattr(engine, "lr_scheduler", None)
    scaler = getattr(engine, "loss_scaler", None)
    return {
        "format_version": FORMAT_VERSION,
        "counters": {k: int(getattr(engine, k, 0)) for k in ("global_steps", "global_samples", "micro_steps",
                                                             "skipped_steps")},
        "gradient_accumulation_steps": int(engine.gradient_accumulation_steps()),
        "lr_scheduler": sched.state_dict() if sched is not None and hasattr(sched, "state_dict") else None,
        "loss_scaler": scaler.state_dict() if scaler is not None else None,
        "dataloader": loader.state_dict() if loader is not None and hasattr(loader, "state_dict") else None,
        "optimizer_param_groups": param_groups,
        # DeepSpeed's optimizer-file entry that Lightning's convert_zero_checkpoint_to_fp32_state_dict reads
        "optimizer_state_dict": {"zero_stage": int(getattr(getattr(engine, "zero_strategy", None), "stage", 0))},
        "excluded_model_keys": excluded,
        # read by export.consolidate(exclude_frozen_parameters=True) (DeepSpeed's zero_to_fp32 option)
        "frozen_parameters": [n for n, p in engine.module.named_parameters() if not p.requires_grad],
    }


def _manifest(engine: Any, tag: str, world: int, has_optimizer: bool) -> dict:
    from flexspeed import __version__

    strategy = getattr(engine, "zero_strategy", None)
    return {"format": "flexspeed-checkpoint", "format_version": FORMAT_VERSION, "tag": tag,
            "created_unix": time.time(), "flexspeed": __version__, "torch": torch.__version__,
            "world_size": world, "dp_world_size": int(getattr(engine, "dp_world_size", world)),
            "zero_stage": int(getattr(strategy, "stage", 0)),
            "precision": getattr(getattr(engine, "precision", None), "mode", "fp32"),
            "global_steps": int(getattr(engine, "global_steps", 0)), "has_optimizer_state": has_optimizer,
            "parallel": engine.checkpoint_layout(),
            # for `flexspeed export` to write a Hugging Face folder: config.json, tied weights once
            "model_config": model_config_dict(engine.module), "tied_parameters": tied_groups(engine.module),
            "files": {"tensors": f"{STATE_DIR}/ (torch.distributed.checkpoint)", "engine": ENGINE_FILE,
                      "client_state": CLIENT_FILE, "rng": f"{RNG_DIR}/rank<r>.pt"}}


# ---- save -----------------------------------------------------------------------------------------
def save_checkpoint(engine: Any, save_dir: str | os.PathLike, tag: Any = None, client_state: dict | None = None,
                    save_latest: bool = True, exclude_frozen_parameters: bool = False) -> bool:
    """Save everything needed to resume ``engine`` exactly; every rank must call it.

    Args:
        engine: the ``TrainingEngine``.
        save_dir: directory holding the tags and the ``latest`` file (created if needed); an empty
            path is a ``ValueError``, as in DeepSpeed.
        tag: the checkpoint's name (default ``global_step<N>``); see :func:`validate_tag`.
        client_state: extra state returned by ``load_checkpoint``: tensors, numbers, strings,
            lists, tuples and dicts (anything ``torch.load(weights_only=True)`` reads back).
        save_latest: point ``save_dir/latest`` at this tag once it is complete.
        exclude_frozen_parameters: leave out parameters with ``requires_grad=False``.
    Returns:
        ``True`` once the tag is complete and visible on every rank.
    """
    prepare_save(engine, save_dir, tag, client_state, save_latest, exclude_frozen_parameters).write()
    return True


@dataclass
class SaveJob:
    """One checkpoint, staged: everything read from the engine, nothing written yet but the empty temporary
    directory. :meth:`write` writes, verifies and commits it; it touches neither the engine nor the default
    process group when given another ``group``, so it can run on a background thread
    (:mod:`flexspeed.runtime.autosave`)."""

    save_dir: str
    tag: str
    nonce: str
    tmp: str
    save_latest: bool
    rank: int
    world: int
    tensors: dict
    has_optimizer: bool
    rank0_files: dict[str, bytes]
    rng_bytes: bytes
    manifest: dict | None
    started: float = field(default_factory=time.perf_counter)

    def write(self, group: Any = None) -> None:
        """Every rank: its tensors (DCP), RNG file and checksums; rank 0 the engine files and the manifest;
        then rank 0 commits. Any rank's failure fails every rank with its message (none waits for a timeout)."""
        rank, world, tmp = self.rank, self.world, self.tmp
        try:
            state_dir = os.path.join(tmp, STATE_DIR)
            with quiet_single_process():  # DCP agrees on its own failures: every rank raises
                dcp.save(self.tensors, storage_writer=FileSystemWriter(state_dir), no_dist=world == 1,
                         process_group=group)
            rng_name = f"{RNG_DIR}/rank{rank}.pt"

            def rng_and_hashes() -> tuple:
                write_atomic(os.path.join(tmp, rng_name), self.rng_bytes)
                # every rank hashes its share of the data files (one read each, from the page cache)
                metadata = read_metadata(state_dir)
                data_files = sorted({str(info.relative_path) for info in metadata.storage_data.values()})
                entries, spans = hash_state_files(state_dir, data_files[rank::world], metadata)
                return metadata, ({rng_name: hash_bytes(self.rng_bytes)}, entries, spans)

            metadata, mine = _agree_on(rng_and_hashes, f"writing {os.path.join(tmp, rng_name)} or hashing its "
                                       "shards", group=group)
            gathered = all_gather(mine, group=group)

            def rank0_part() -> None:
                for name, data in self.rank0_files.items():
                    write_atomic(os.path.join(tmp, name), data)
                manifest = dict(self.manifest or {})
                manifest["integrity"] = _integrity_section(state_dir, metadata, self.rank0_files, gathered, world)
                manifest["integrity"]["digest"] = digest_of(manifest)
                write_atomic(os.path.join(tmp, MANIFEST), json.dumps(manifest, indent=2).encode())

            _agree_on(lambda: rank0_part() if rank == 0 else None, f"writing the engine state and manifest in {tmp}",
                      group=group)
            _agree_on(lambda: commit_tag(self.save_dir, tmp, self.tag, self.nonce, self.save_latest)
                      if rank == 0 else None, f"committing {os.path.join(self.save_dir, self.tag)}", group=group)
        except BaseException:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise
        if rank == 0:
            where = os.path.join(self.save_dir, self.tag)
            ensure_handler().info("saved checkpoint %s (%s, %d rank(s)) in %.1f s", where,
                                  human_bytes(dir_bytes(where)), world, time.perf_counter() - self.started)


def _clone_tree(tree: Any) -> Any:
    """``tree`` with every tensor replaced by a detached copy (the state of a save that is written later)."""
    if torch.is_tensor(tree):
        return tree.detach().clone()
    if isinstance(tree, dict):
        return {k: _clone_tree(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(_clone_tree(v) for v in tree)
    return tree


def prepare_save(engine: Any, save_dir: str | os.PathLike, tag: Any = None, client_state: dict | None = None,
                 save_latest: bool = True, exclude_frozen_parameters: bool = False, *,
                 copy_tensors: bool = False) -> SaveJob:
    """Stage a save (every rank, on the training thread): validate, agree on the tag, read the engine's state.

    With ``copy_tensors`` the model and optimizer tensors are copied, so training may go on while the
    returned job is written; otherwise the job refers to the live tensors and must be written at once.
    """
    from flexspeed.runtime.autosave import wait_for_pending_saves

    wait_for_pending_saves()  # an asynchronous save in flight commits first (and its temporaries are not stale)
    save_dir = validate_dir(save_dir, what="save_dir")
    rank, world = rank_world()
    started = time.perf_counter()
    tag = f"global_step{int(engine.global_steps)}" if tag is None else tag
    excluded = [n for n, p in engine.module.named_parameters() if not p.requires_grad] \
        if exclude_frozen_parameters else []
    error, client_bytes, engine_bytes = "", b"", b""
    param_groups = _all_param_groups(engine)
    try:  # everything a user can get wrong is found here, before any rank writes
        tag = validate_tag(tag)
        client_bytes = serialize_checked(dict(client_state or {}), "client_state",
                                         "Fix: keep client_state to tensors, numbers, strings, lists, tuples "
                                         "and dicts (convert other objects, e.g. with vars() or str())")
        if rank == 0:
            engine_bytes = serialize_checked(
                _engine_state(engine, excluded, param_groups), "the engine state (scheduler, loss scaler, dataloader, "
                "optimizer param groups)", "Fix: use schedulers/optimizers whose state_dict() holds only tensors, "
                "numbers, strings and containers")
    except ValueError as e:
        error = str(e)
    tag, nonce = _agree(str(tag), error, _tag_validation_mode(engine))
    save_dir = os.path.abspath(os.fspath(save_dir))
    tmp = os.path.join(save_dir, f"{TMP_PREFIX}{tag}-{nonce}")

    def make_dirs() -> None:
        if rank == 0:
            os.makedirs(save_dir, exist_ok=True)
            remove_stale_temporaries(save_dir)
            os.makedirs(os.path.join(tmp, RNG_DIR))

    _agree_on(make_dirs, f"creating {tmp}")
    gas = int(engine.gradient_accumulation_steps())
    if rank == 0 and gas > 1 and int(engine.micro_steps) % gas:
        log.warning("flexspeed: saving checkpoint %r between accumulation boundaries (micro step %d, %d per "
                    "step): the gradients accumulated so far are not saved", tag, engine.micro_steps, gas)
    note(f"save_checkpoint tag {tag}")
    try:
        model_sd, optim_sd = _agree_on(lambda: state_dicts(engine, with_optimizer=True,
                                                            exclude_frozen=exclude_frozen_parameters),
                                       "collecting the model and optimizer state")
        tensors: dict[str, Any] = {"model": model_sd}
        if optim_sd is not None:
            tensors["optim"] = {"state": tensor_tree(optim_sd["state"])}
        buf = io.BytesIO()
        torch.save(_rng_state(), buf)
        return SaveJob(save_dir=save_dir, tag=tag, nonce=nonce, tmp=tmp, save_latest=save_latest, rank=rank,
                       world=world, tensors=_clone_tree(tensors) if copy_tensors else tensors,
                       has_optimizer=optim_sd is not None,
                       rank0_files={ENGINE_FILE: engine_bytes, CLIENT_FILE: client_bytes} if rank == 0 else {},
                       rng_bytes=buf.getvalue(),
                       manifest=_manifest(engine, tag, world, optim_sd is not None) if rank == 0 else None,
                       started=started)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def dir_bytes(path: str) -> int:
    """Bytes of the regular files under ``path`` (links not followed)."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return total


def _integrity_section(state_dir: str, metadata: Any, rank0_files: dict[str, bytes], gathered: list,
                       world: int) -> dict:
    """The manifest's checksums: every file of the tag and every DCP record (see checkpoint_verify)."""
    files = {name: hash_bytes(data) for name, data in rank0_files.items()}
    with open(os.path.join(state_dir, ".metadata"), "rb") as f:
        files[f"{STATE_DIR}/.metadata"] = hash_bytes(f.read())
    spans: dict[tuple, str] = {}
    for rng_entry, entries, rank_spans in gathered:
        files.update(rng_entry)
        files.update({f"{STATE_DIR}/{name}": entry for name, entry in entries.items()})
        spans.update(rank_spans)
    records = [{"key": key, "offsets": list(offsets) if offsets is not None else None, "index": index, **rec,
                HASH: spans[(rec["file"], rec["start"], rec["length"])]}
               for (key, offsets, index), rec in records_of(metadata).items()]
    return {"hash": HASH, "files": files, "records": records, "rng_ranks": world}


# ---- load (implemented in flexspeed.runtime.checkpoint_load) ----------------------------------------
def load_checkpoint(engine: Any, load_dir: str | os.PathLike, tag: Any = None, load_module_strict: bool = True,
                    load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                    load_module_only: bool = False) -> tuple[str | None, dict | None]:
    """Restore ``engine`` from a verified checkpoint; see :func:`flexspeed.runtime.checkpoint_load.load_checkpoint`."""
    from flexspeed.runtime.autosave import wait_for_pending_saves
    from flexspeed.runtime.checkpoint_load import load_checkpoint as _load

    wait_for_pending_saves()
    note(f"load_checkpoint {os.fspath(load_dir)} tag {tag if tag is not None else 'latest'}")
    return _load(engine, load_dir, tag, load_module_strict=load_module_strict,
                 load_optimizer_states=load_optimizer_states, load_lr_scheduler_states=load_lr_scheduler_states,
                 load_module_only=load_module_only)


# ---- export (implemented in flexspeed.runtime.export) -----------------------------------------------
def consolidate(ckpt_dir: str | os.PathLike, tag: str | None = None, dtype: Any = None) -> dict[str, torch.Tensor]:
    """The full model state dict of a checkpoint, in one process; see :func:`flexspeed.runtime.export.consolidate`."""
    from flexspeed.runtime.export import consolidate as _consolidate

    return _consolidate(ckpt_dir, tag=tag, dtype=dtype)


def save_16bit_model(engine: Any, save_dir: str | os.PathLike, save_filename: str = "pytorch_model.bin",
                     exclude_frozen_parameters: bool = False, dtype: Any = None) -> bool:
    """Gather the full weights in 16 bits and write them from rank 0; see :mod:`flexspeed.runtime.export`."""
    from flexspeed.runtime.export import save_16bit_model as _save

    return _save(engine, save_dir, save_filename, exclude_frozen_parameters=exclude_frozen_parameters, dtype=dtype)


