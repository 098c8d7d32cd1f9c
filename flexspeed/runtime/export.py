"""Export consolidated model weights: from a checkpoint on disk, or from a live engine.

- :func:`consolidate` reads a flexspeed checkpoint in one process, with no process group and
  none of the processes that wrote it, and returns the full model state dict (DeepSpeed's
  ``zero_to_fp32`` equivalent, at any world size and ZeRO stage the checkpoint was saved with).
- :func:`save_16bit_model` gathers the full weights of a running engine at any stage and writes
  them from rank 0 (``engine.save_16bit_model``).
- :func:`write_state_dict` writes a state dict as safetensors or a ``torch.save`` file, atomically.

Everything written here loads with ``load_state_dict`` into the plain model, and with
``torch.load(weights_only=True)`` or ``safetensors.torch.load_file``.
"""

from __future__ import annotations

import io
import logging
import math
import os
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from flexspeed.runtime.checkpoint_io import (
    ENGINE_FILE,
    MANIFEST,
    STATE_DIR,
    CheckpointError,
    SafeFileSystemReader,
    read_latest,
    read_manifest,
    safe_dcp_load,
    safe_torch_load,
    resolve_tag_dir,
    validate_tag,
    write_atomic,
)
from flexspeed.runtime.checkpoint_verify import Integrity, check_not_link, validate_manifest

__all__ = ["consolidate", "export_folder", "save_16bit_model", "save_pretrained", "write_state_dict", "resolve_dtype",
           "DTYPES"]

log = logging.getLogger("flexspeed")

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_ALIASES = {"float32": "fp32", "float": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}


def resolve_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """``"fp32"|"bf16"|"fp16"`` (or the torch dtype, or ``None`` to keep the saved dtypes)."""
    if dtype is None or isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str):
        key = _DTYPE_ALIASES.get(dtype.lower(), dtype.lower())
        if key in DTYPES:
            return DTYPES[key]
    raise ValueError(f"dtype={dtype!r} is not supported for export. Fix: use one of {sorted(DTYPES)} "
                     "(or torch.float32/bfloat16/float16), or None to keep the checkpoint's dtypes")


def _cast(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    """Floating-point tensors to ``dtype``; integer/bool buffers keep theirs."""
    if dtype is None:
        return state
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}


def _tag_path(ckpt_dir: str, tag: str | None) -> str:
    if tag is None and os.path.isfile(os.path.join(ckpt_dir, MANIFEST)):
        return ckpt_dir  # the tag directory itself
    if tag is None:
        tag = read_latest(ckpt_dir)
        if tag is None:
            raise CheckpointError(f"{ckpt_dir} has no 'latest' file. Fix: pass tag=... (--tag) naming one of its "
                                  "checkpoint directories, or point at the directory given to save_checkpoint")
    return resolve_tag_dir(ckpt_dir, validate_tag(tag))


def consolidate(ckpt_dir: str | os.PathLike, tag: str | None = None, dtype: str | torch.dtype | None = None,
                exclude_frozen_parameters: bool = False) -> dict[str, torch.Tensor]:
    """The full (unsharded) model state dict of a flexspeed checkpoint, read in this process.

    Works without a process group and at any world size / ZeRO stage the checkpoint was saved
    with; only the model's tensors are read (no optimizer state). Nothing is unpickled beyond
    DCP's metadata (restricted) and ``weights_only=True`` tensor data.

    Args:
        ckpt_dir: the ``save_dir`` of ``save_checkpoint`` (holding ``latest`` and the tags), or
            one tag's directory.
        tag: which tag; ``None`` reads ``ckpt_dir/latest``.
        dtype: cast floating-point tensors to ``"fp32"``, ``"bf16"`` or ``"fp16"``; ``None`` keeps
            the saved dtypes (fp32 master weights).
        exclude_frozen_parameters: leave out the parameters that had ``requires_grad=False`` when
            the checkpoint was saved (listed in its engine state).
    Returns:
        ``{fqn: tensor}`` on CPU, loadable with ``model.load_state_dict``.
    """
    target_dtype = resolve_dtype(dtype)
    path, _, state_dir, shapes, integrity = _model_tensors(ckpt_dir, tag, exclude_frozen_parameters)
    model = {fqn: torch.empty(md.size, dtype=md.properties.dtype) for fqn, md in shapes.items()}
    safe_dcp_load({"model": model}, state_dir, what=f"reading the model tensors of {path}", no_dist=True,
                  integrity=integrity)
    return _cast(model, target_dtype)


def export_folder(ckpt_dir: str | os.PathLike, out_dir: str | os.PathLike, tag: str | None = None,
                  dtype: str | torch.dtype | None = None, max_shard_size: int | str = "5GB",
                  single_file: str | None = None) -> dict[str, Any]:
    """Write a checkpoint's weights as a Hugging Face model folder, one tensor in memory at a time.

    ``config.json`` comes from the model config recorded at save (HF models and flexspeed's GPT),
    tied parameters are written once, and the safetensors shards (with an index when there are
    several) follow ``huggingface_hub``'s splitting, so ``from_pretrained(out_dir)`` loads it.

    Args:
        ckpt_dir, tag: as for :func:`consolidate`.
        out_dir: the folder (created).
        dtype: floating-point tensors in ``"fp32"``/``"bf16"``/``"fp16"``; ``None`` keeps the saved ones.
        max_shard_size: largest shard file (``"5GB"``, ``"500MB"`` or bytes).
        single_file: write everything into this one file name instead (``flexspeed export ckpt x.safetensors``).
    Returns:
        what :func:`~flexspeed.runtime.hf_folder.write_hf_folder` returns, plus ``"config"`` (written or not).
    """
    from flexspeed.runtime.hf_folder import TensorEntry, write_hf_folder

    target_dtype = resolve_dtype(dtype)
    path, manifest, state_dir, shapes, integrity = _model_tensors(ckpt_dir, tag, False)

    def stored(md: TensorStorageMetadata) -> torch.dtype:
        return target_dtype if target_dtype is not None and md.properties.dtype.is_floating_point \
            else md.properties.dtype

    entries = [TensorEntry(fqn, stored(md), tuple(md.size)) for fqn, md in shapes.items()]

    def fetch(entry: TensorEntry) -> torch.Tensor:
        md = shapes[entry.name]
        t = torch.empty(md.size, dtype=md.properties.dtype)
        safe_dcp_load({"model": {entry.name: t}}, state_dir, what=f"reading {entry.name} of {path}", no_dist=True,
                      integrity=integrity)
        return t

    config = manifest.get("model_config") if isinstance(manifest.get("model_config"), dict) else None
    tied = manifest.get("tied_parameters") or []
    if single_file is not None:
        out = write_hf_folder(out_dir, entries, fetch, tied=tied, max_shard_size=2**62, dtype=target_dtype,
                              file_name=single_file)
    else:
        out = write_hf_folder(out_dir, entries, fetch, config=config, tied=tied, max_shard_size=max_shard_size,
                              dtype=target_dtype)
    return {**out, "config": config is not None and single_file is None}


def _model_tensors(ckpt_dir: str | os.PathLike, tag: str | None, exclude_frozen: bool
                   ) -> tuple[str, dict, str, dict[str, TensorStorageMetadata], Integrity]:
    """(tag path, manifest, state dir, {fqn: metadata}, checksums) of a checkpoint's model tensors, sizes checked.

    The manifest is validated and, when it records checksums, ``.metadata`` and every record read
    later through the returned :class:`Integrity` are verified (as ``load_checkpoint`` does).
    """
    path = _tag_path(os.path.abspath(os.fspath(ckpt_dir)), tag)
    check_not_link(path, "checkpoint tag directory")
    manifest = read_manifest(path)
    validate_manifest(manifest, os.path.join(path, MANIFEST))
    integrity = Integrity(path, manifest.get("integrity"))
    state_dir = os.path.join(path, STATE_DIR)
    metadata = SafeFileSystemReader(state_dir, integrity).read_metadata()
    shapes = {key[len("model."):]: md for key, md in metadata.state_dict_metadata.items()
              if key.startswith("model.") and isinstance(md, TensorStorageMetadata)}
    if not shapes:
        raise CheckpointError(f"{state_dir} holds no model tensors: it is not a flexspeed training checkpoint")
    if exclude_frozen:
        frozen = set(_frozen_parameters(path, integrity))
        shapes = {fqn: md for fqn, md in shapes.items() if fqn not in frozen}
    _check_sizes(state_dir, shapes)
    return path, manifest, state_dir, shapes, integrity


def _frozen_parameters(path: str, integrity: Integrity) -> list[str]:
    """Names of the parameters saved with ``requires_grad=False``, from the tag's engine state."""
    engine_state = safe_torch_load(os.path.join(path, ENGINE_FILE), integrity.read(ENGINE_FILE))
    frozen = engine_state.get("frozen_parameters") if isinstance(engine_state, dict) else None
    if frozen is None:
        raise CheckpointError(f"{path} does not record which parameters were frozen (it was saved by an older "
                              "flexspeed or by the pipeline engine). Fix: export it with frozen parameters "
                              "included, or save it again with save_checkpoint(..., exclude_frozen_parameters=True)")
    return list(frozen)


def _check_sizes(state_dir: str, shapes: dict[str, TensorStorageMetadata]) -> None:
    """Refuse metadata that claims more tensor bytes than the data files hold (stored uncompressed).

    Runs before anything is allocated: a tampered ``.metadata`` cannot make this process allocate
    far more memory than the files could fill, and truncated files are caught early.
    """
    claimed = sum(math.prod(md.size) * md.properties.dtype.itemsize for md in shapes.values())
    on_disk = sum(os.path.getsize(os.path.join(state_dir, f)) for f in os.listdir(state_dir)
                  if f.endswith(".distcp"))
    if claimed > on_disk:
        raise CheckpointError(f"{state_dir}/.metadata describes {claimed:,} bytes of model tensors but its data files "
                              f"hold {on_disk:,} bytes: the checkpoint is truncated or was tampered with")


def write_state_dict(state: dict[str, torch.Tensor], path: str | os.PathLike, fmt: str | None = None) -> str:
    """Write ``state`` to ``path`` atomically as safetensors or ``torch.save``; returns the path.

    ``fmt`` is ``"safetensors"`` or ``"pt"``; ``None`` picks by the file extension
    (``.safetensors`` -> safetensors, anything else -> ``torch.save``).
    """
    path = os.path.abspath(os.fspath(path))
    fmt = fmt or ("safetensors" if path.endswith(".safetensors") else "pt")
    if fmt not in ("safetensors", "pt"):
        raise ValueError(f"format={fmt!r} is not supported. Fix: use 'safetensors' or 'pt'")
    # separate, contiguous storage per key: tied weights are written twice (safetensors forbids sharing)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}
    if fmt == "safetensors":
        from safetensors.torch import save as st_save

        data = st_save(state, metadata={"format": "pt", "writer": "flexspeed"})
    else:
        buf = io.BytesIO()
        torch.save(state, buf)
        data = buf.getvalue()
    parent = os.path.dirname(path)
    if parent:
        os.makedirs(parent, exist_ok=True)
    write_atomic(path, data)
    return path


def _stage3_gather_allowed(engine: Any) -> bool:
    zc = getattr(getattr(engine, "config", None), "zero_optimization", None)
    return bool(getattr(zc, "stage3_gather_16bit_weights_on_model_save", False))


def save_16bit_model(engine: Any, save_dir: str | os.PathLike, save_filename: str = "pytorch_model.bin",
                     exclude_frozen_parameters: bool = False, dtype: str | torch.dtype | None = None) -> bool:
    """Gather the full weights at any ZeRO stage and write them in 16 bits from rank 0 (every rank calls).

    Args:
        engine: the ``TrainingEngine``.
        save_dir: output directory (created on rank 0).
        save_filename: file name; ``*.safetensors`` writes safetensors, anything else ``torch.save``.
        exclude_frozen_parameters: leave out parameters with ``requires_grad=False``.
        dtype: ``None`` -> bf16 when the engine computes in bf16, else fp16 (as the name says);
            or ``"fp16"``/``"bf16"``/``"fp32"``.
    Returns:
        ``True`` when written; ``False`` (with a warning, nothing written) at ZeRO stage 3 when
        ``zero_optimization.stage3_gather_16bit_weights_on_model_save`` is false, as in DeepSpeed.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    name = os.fspath(save_filename)
    if not name or os.path.basename(name) != name or name in (".", ".."):
        raise ValueError(f"save_filename={save_filename!r} must be a plain file name inside save_dir. "
                         "Fix: pass e.g. 'pytorch_model.bin' or 'model.safetensors'")
    stage = int(getattr(getattr(engine, "zero_strategy", None), "stage", 0))
    if stage == 3 and not _stage3_gather_allowed(engine):
        warnings.warn("save_16bit_model: nothing saved, because ZeRO stage 3 needs "
                      "zero_optimization.stage3_gather_16bit_weights_on_model_save=true to gather full weights. "
                      "Fix: set it, or save a checkpoint and run `flexspeed export` on it (no gathering needed)",
                      stacklevel=2)
        return False
    if dtype is None:
        mode = getattr(getattr(engine, "precision", None), "mode", "fp32")
        target = torch.bfloat16 if mode == "bf16" else torch.float16
    else:
        target = resolve_dtype(dtype)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=exclude_frozen_parameters)
    state = get_model_state_dict(engine.module, options=opts)  # collective at stage 3; full on rank 0
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if rank == 0:
        path = write_state_dict(_cast(state, target), os.path.join(os.fspath(save_dir), name))
        log.info("flexspeed: saved %s weights to %s", str(target).replace("torch.", ""), path)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    return True


def save_pretrained(engine: Any, save_dir: str | os.PathLike, max_shard_size: int | str = "5GB",
                    dtype: str | torch.dtype | None = None, exclude_frozen_parameters: bool = False) -> bool:
    """A Hugging Face model folder from a running engine at any ZeRO stage (every rank calls; rank 0 writes).

    The full weights are gathered as ``save_16bit_model`` gathers them (a collective at stages
    2-3), then written as :func:`export_folder` writes a checkpoint: ``config.json`` when the model
    has a config, tied parameters once, sharded safetensors with an index.

    Args:
        engine: the ``TrainingEngine``.
        save_dir: the folder (created on rank 0).
        max_shard_size: largest shard file.
        dtype: ``None`` keeps the parameters' dtype (fp32 master weights); or ``"bf16"``/``"fp16"``/``"fp32"``.
        exclude_frozen_parameters: leave out parameters with ``requires_grad=False``.
    Returns:
        ``True`` once written and every rank is past it.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from flexspeed.runtime.hf_folder import TensorEntry, model_config_dict, tied_groups, write_hf_folder

    target = resolve_dtype(dtype)
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=exclude_frozen_parameters)
    state = get_model_state_dict(engine.module, options=opts)  # collective at stages 2-3; full on rank 0
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    if rank == 0:
        entries = [TensorEntry(k, target if target is not None and v.is_floating_point() else v.dtype, tuple(v.shape))
                   for k, v in state.items()]
        out = write_hf_folder(save_dir, entries, lambda e: state[e.name], config=model_config_dict(engine.module),
                              tied=tied_groups(engine.module), max_shard_size=max_shard_size, dtype=target)
        log.info("saved %d tensors (%s file(s)) to %s", len(entries) - len(out["skipped_tied"]),
                 len(out["files"]), os.fspath(save_dir))
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    return True


def gather_before_save_pretrained(module: torch.nn.Module) -> bool:
    """Make a Hugging Face model's own ``save_pretrained`` gather sharded weights first (ZeRO stages 2-3).

    Under FSDP2 the parameters are DTensor shards, which ``transformers``' ``save_pretrained``
    cannot write (it fails flattening an unevenly sharded tensor). The module's class (already
    FSDP2's per-instance subclass) gets one more subclass whose ``save_pretrained`` gathers the
    full weights on every rank, then calls the original on the main process with
    ``state_dict=`` the gathered weights. Every rank must call it (``is_main_process=rank == 0``,
    as in HF's distributed examples; the default is rank 0). Returns whether it applied.
    """
    cls = type(module)
    original = getattr(cls, "save_pretrained", None)
    if original is None or getattr(cls, "_flexspeed_gathers", False) or not hasattr(module, "config"):
        return False

    def save_pretrained(self, save_directory, *args, is_main_process: bool | None = None, state_dict=None, **kwargs):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        rank = dist.get_rank() if distributed else 0
        main = (rank == 0) if is_main_process is None else bool(is_main_process)
        if state_dict is not None:  # gathered by the caller (HF Trainer: on the writing rank only): no collective
            return original(self, save_directory, *args, is_main_process=main, state_dict=state_dict, **kwargs)
        _all_ranks_arrived("save_pretrained")
        state_dict = get_model_state_dict(self, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        result = None
        if main:
            result = original(self, save_directory, *args, is_main_process=True, state_dict=state_dict, **kwargs)
        if distributed:
            dist.barrier()
        return result

    save_pretrained.__doc__ = original.__doc__
    module.__class__ = type(cls.__name__, (cls,), {"save_pretrained": save_pretrained, "_flexspeed_gathers": True,
                                                   "__module__": cls.__module__})
    return True


def _all_ranks_arrived(what: str, seconds: int = 120) -> None:
    """On gloo groups: fail with the fix, instead of hanging, when a rank never calls ``what``."""
    from datetime import timedelta

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    if dist.get_backend() != "gloo":
        return  # NCCL has no monitored barrier; the collective itself times out
    try:
        dist.monitored_barrier(timeout=timedelta(seconds=seconds))
    except RuntimeError as exc:
        raise RuntimeError(f"{what} at ZeRO stage 2-3 gathers the sharded weights, so every rank must call it "
                           f"(some rank did not within {seconds} s: {exc}). Fix: call it on every rank with "
                           "is_main_process=(rank == 0), or use engine.save_pretrained(dir) on every rank") from exc
