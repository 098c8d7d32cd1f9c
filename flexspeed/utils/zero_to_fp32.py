"""``deepspeed.utils.zero_to_fp32`` on flexspeed checkpoints: full fp32 weights in one process.

Reads a checkpoint written by ``engine.save_checkpoint`` (any world size, any ZeRO stage) with
flexspeed's safe reader (:func:`flexspeed.runtime.export.consolidate`: no process group, nothing
unpickled beyond tensors) and returns or writes the whole model state dict. Also a command::

    python -m flexspeed.utils.zero_to_fp32 ckpt/ out_dir/ [--safe_serialization] [-t TAG]

Differences from DeepSpeed: ``lazy_mode=True`` returns ordinary CPU tensors (DeepSpeed's lazy
tensors become real ones with ``.contiguous()``, which these already answer), and the fp32
weights are the module's own parameters (flexspeed's master weights), not optimizer partitions.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

import torch

from flexspeed.runtime.checkpoint_io import write_atomic
from flexspeed.runtime.export import consolidate, resolve_dtype, write_state_dict

__all__ = [
    "get_fp32_state_dict_from_zero_checkpoint",
    "convert_zero_checkpoint_to_state_dict",
    "convert_zero_checkpoint_to_fp32_state_dict",
    "load_state_dict_from_zero_checkpoint",
    "get_model_state_file",
    "get_optim_files",
    "main",
]


def get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir: str | os.PathLike, tag: str | None = None,
                                             exclude_frozen_parameters: bool = False,
                                             lazy_mode: bool = False) -> dict[str, torch.Tensor]:
    """The consolidated fp32 state dict of a checkpoint, on the CPU.

    Args:
        checkpoint_dir: the directory given to ``save_checkpoint`` (holding ``latest``), or a tag's directory.
        tag: the checkpoint tag; ``None`` reads ``checkpoint_dir/latest``.
        exclude_frozen_parameters: leave out parameters saved with ``requires_grad=False``.
        lazy_mode: accepted for DeepSpeed's signature; the tensors are always materialised.
    Returns:
        ``{name: tensor}`` loadable with ``model.load_state_dict``.
    """
    del lazy_mode  # real tensors already support the .contiguous() a lazy_mode caller makes
    return consolidate(checkpoint_dir, tag=tag, dtype=torch.float32,
                       exclude_frozen_parameters=exclude_frozen_parameters)


def _tag_file(checkpoint_dir: str | os.PathLike, name: str, what: str) -> str:
    """``checkpoint_dir/name`` of a complete flexspeed tag directory (no symlink), else FileNotFoundError."""
    from flexspeed.runtime.checkpoint_io import read_manifest
    from flexspeed.runtime.checkpoint_verify import check_not_link

    folder = os.fspath(checkpoint_dir)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"Directory '{folder}' doesn't exist")
    read_manifest(folder)  # a complete flexspeed checkpoint tag (CheckpointError names what is wrong)
    file = os.path.join(folder, name)
    if not os.path.isfile(file):
        raise FileNotFoundError(f"can't find the {what} file at '{file}'")
    check_not_link(file, what)
    return file


def get_model_state_file(checkpoint_dir: str | os.PathLike, zero_stage: int) -> str:
    """The file of a tag directory holding the non-tensor model state: flexspeed's ``client_state.pt``.

    DeepSpeed returns ``mp_rank_00_model_states.pt`` (stage <= 2) or ``zero_pp_rank_0_mp_rank_00_model_states.pt``
    (stage 3), whose extra keys are what ``save_checkpoint(client_state=...)`` stored; flexspeed keeps those keys
    in ``client_state.pt`` at every stage (the weights are in ``state/``, read them with
    :func:`get_fp32_state_dict_from_zero_checkpoint`). ``torch.load(..., weights_only=True)`` reads it.

    Raises:
        FileNotFoundError: no such directory or file (DeepSpeed's error); ValueError: ``zero_stage`` not 0-3.
    """
    if isinstance(zero_stage, bool) or not isinstance(zero_stage, int) or not 0 <= zero_stage <= 3:
        raise ValueError(f"zero_stage={zero_stage!r} must be 0, 1, 2 or 3")
    from flexspeed.runtime.checkpoint_io import CLIENT_FILE

    return _tag_file(checkpoint_dir, CLIENT_FILE, "model states")


def get_optim_files(checkpoint_dir: str | os.PathLike) -> list[str]:
    """The files of a tag directory holding the optimizer's non-tensor state: ``[engine_state.pt]``.

    Loaded, it has DeepSpeed's ``optimizer_state_dict["zero_stage"]`` (the stage the checkpoint was saved at) and
    the optimizer's param groups; the optimizer's tensors are in ``state/`` (resharded on load at any world
    size, so there is one such file, not one per rank).

    Raises:
        FileNotFoundError: no such directory, or the checkpoint was saved without an optimizer.
    """
    file = _tag_file(checkpoint_dir, "engine_state.pt", "optimizer states")
    from flexspeed.runtime.checkpoint_io import read_manifest

    if not read_manifest(os.fspath(checkpoint_dir)).get("has_optimizer_state", False):
        raise FileNotFoundError(f"can't find optimizer states in '{os.fspath(checkpoint_dir)}': it was saved "
                                "without an optimizer")
    return [file]


def _output_dtype(dtype: str | torch.dtype) -> torch.dtype:
    name = dtype[len("torch."):] if isinstance(dtype, str) and dtype.startswith("torch.") else dtype
    return resolve_dtype(name)


def _parse_size(size: int | str) -> int:
    """Bytes of ``"5GB"``/``"500MB"``/``"2GiB"``/an int (units as Hugging Face's, GB = 10**9)."""
    if isinstance(size, int):
        return size
    units = {"TIB": 2**40, "GIB": 2**30, "MIB": 2**20, "KIB": 2**10, "TB": 10**12, "GB": 10**9, "MB": 10**6,
             "KB": 10**3, "B": 1}
    text = size.strip().upper()
    for unit, factor in units.items():
        if text.endswith(unit) and text[:-len(unit)].strip().replace(".", "", 1).isdigit():
            return int(float(text[:-len(unit)]) * factor)
    raise ValueError(f"max_shard_size={size!r} is not a size. Fix: pass bytes as an int or a string like '5GB'")


def _shards(state: dict[str, torch.Tensor], weights_name: str,
            max_shard_size: int | str | None) -> tuple[dict[str, list[str]], dict[str, Any] | None]:
    """``{file: [names]}`` in order, filled up to ``max_shard_size``; plus the index when sharded."""
    if max_shard_size is None:
        return {weights_name: list(state)}, None
    limit = _parse_size(max_shard_size)
    groups: list[list[str]] = [[]]
    used = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and used + nbytes > limit:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += nbytes
    if len(groups) == 1:
        return {weights_name: groups[0]}, None
    stem, ext = os.path.splitext(weights_name)
    files = {f"{stem}-{i + 1:05d}-of-{len(groups):05d}{ext}": names for i, names in enumerate(groups)}
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": {n: f for f, names in files.items() for n in names}}
    return files, index


def convert_zero_checkpoint_to_state_dict(checkpoint_dir: str | os.PathLike, output_dir: str | os.PathLike,
                                          dtype: str | torch.dtype = torch.float32,
                                          max_shard_size: int | str | None = "5GB",
                                          safe_serialization: bool = False, tag: str | None = None,
                                          exclude_frozen_parameters: bool = False) -> None:
    """Write the consolidated weights into ``output_dir`` as Hugging Face-style files.

    ``pytorch_model.bin`` (``model.safetensors`` with ``safe_serialization``), or numbered shards
    of at most ``max_shard_size`` plus ``pytorch_model.bin.index.json`` / ``model.safetensors.index.json``.

    Args:
        checkpoint_dir: as for :func:`get_fp32_state_dict_from_zero_checkpoint`.
        output_dir: created if needed.
        dtype: floating-point dtype of the output (float32, float16, bfloat16; names or dtypes).
        max_shard_size: largest file (``"5GB"``, bytes), or ``None`` for one file.
        safe_serialization: write safetensors instead of ``torch.save`` files.
        tag, exclude_frozen_parameters: as for :func:`get_fp32_state_dict_from_zero_checkpoint`.
    """
    target = _output_dtype(dtype)
    state = consolidate(checkpoint_dir, tag=tag, dtype=target, exclude_frozen_parameters=exclude_frozen_parameters)
    weights_name = "model.safetensors" if safe_serialization else "pytorch_model.bin"
    files, index = _shards(state, weights_name, max_shard_size)
    output_dir = os.fspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    fmt = "safetensors" if safe_serialization else "pt"
    for file_name, names in files.items():
        write_state_dict({n: state[n] for n in names}, os.path.join(output_dir, file_name), fmt)
    if index is not None:
        index_text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        write_atomic(os.path.join(output_dir, f"{weights_name}.index.json"), index_text.encode())


def convert_zero_checkpoint_to_fp32_state_dict(checkpoint_dir: str | os.PathLike, output_dir: str | os.PathLike,
                                               max_shard_size: int | str | None = "5GB",
                                               safe_serialization: bool = False, tag: str | None = None,
                                               exclude_frozen_parameters: bool = False) -> None:
    """:func:`convert_zero_checkpoint_to_state_dict` in fp32 (DeepSpeed's older name)."""
    convert_zero_checkpoint_to_state_dict(checkpoint_dir, output_dir, dtype=torch.float32,
                                          max_shard_size=max_shard_size, safe_serialization=safe_serialization,
                                          tag=tag, exclude_frozen_parameters=exclude_frozen_parameters)


def load_state_dict_from_zero_checkpoint(model: torch.nn.Module, checkpoint_dir: str | os.PathLike,
                                         tag: str | None = None) -> torch.nn.Module:
    """Move ``model`` to the CPU and load the checkpoint's fp32 weights into it (``strict=False``, as DeepSpeed)."""
    state = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag)
    model = model.cpu()
    model.load_state_dict(state, strict=False)
    return model


def main(argv: list[str] | None = None) -> int:
    """``python -m flexspeed.utils.zero_to_fp32 CHECKPOINT_DIR OUTPUT_DIR`` (DeepSpeed's script's flags)."""
    parser = argparse.ArgumentParser(description="Write a flexspeed checkpoint's consolidated weights.")
    parser.add_argument("checkpoint_dir", help="the directory given to save_checkpoint, e.g. path/checkpoint-12")
    parser.add_argument("output_dir", help="directory for the state dict file(s)")
    parser.add_argument("--max_shard_size", default="5GB", help="largest output file (default 5GB)")
    parser.add_argument("--safe_serialization", action="store_true", help="write safetensors")
    parser.add_argument("-t", "--tag", default=None, help="checkpoint tag (default: the one named in 'latest')")
    parser.add_argument("--exclude_frozen_parameters", action="store_true", help="leave out frozen parameters")
    parser.add_argument("--dtype", default="float32", help="output dtype: float32, float16 or bfloat16")
    args = parser.parse_args(argv)
    convert_zero_checkpoint_to_state_dict(args.checkpoint_dir, args.output_dir, dtype=args.dtype,
                                          max_shard_size=args.max_shard_size,
                                          safe_serialization=args.safe_serialization, tag=args.tag,
                                          exclude_frozen_parameters=args.exclude_frozen_parameters)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
