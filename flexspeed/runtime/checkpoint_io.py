"""Checkpoint files on disk: layout names, tag rules, atomic writes and safe reading.

The training-level logic (what goes into a checkpoint and how it is restored) lives in
:mod:`flexspeed.runtime.checkpoint`; this module only knows files.

Safety: torch 2.13's ``torch.distributed.checkpoint`` reads its ``.metadata`` file with a plain
``pickle.load`` and loads pickled non-tensor items with ``torch.load(weights_only=False)``. Here
the metadata goes through an unpickler restricted to DCP's own metadata dataclasses and torch
value types, pickled non-tensor items are refused (flexspeed never writes any), tensor data keeps
DCP's ``weights_only=True``, and every other file is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pickle
import re
import shutil
import warnings
from collections.abc import Callable, Iterator
from typing import IO, Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

__all__ = [
    "FORMAT_VERSION", "MANIFEST", "STATE_DIR", "ENGINE_FILE", "CLIENT_FILE", "RNG_DIR", "LATEST",
    "CheckpointError", "UnsafeCheckpointError", "validate_tag", "validate_dir", "read_latest", "resolve_tag_dir",
    "read_manifest", "read_metadata", "safe_torch_load", "SafeFileSystemReader", "SafeLoadPlanner",
    "write_atomic", "serialize_checked", "commit_tag", "remove_stale_temporaries", "find_unsafe",
    "TMP_PREFIX", "quiet_single_process",
]

FORMAT_VERSION = 2  # 2: the manifest records checksums (flexspeed.runtime.checkpoint_verify)
MANIFEST = "flexspeed_checkpoint.json"
STATE_DIR = "state"
ENGINE_FILE = "engine_state.pt"
CLIENT_FILE = "client_state.pt"
RNG_DIR = "rng"
LATEST = "latest"
TMP_PREFIX = ".flexspeed-tmp-"
_OLD_PREFIX = ".flexspeed-old-"
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+=-]{0,127}")
_TAG_RULE = ("a tag names one directory inside save_dir: 1-128 characters of letters, digits, '_', '-', '.', "
             "'+' or '=', starting with a letter, digit or '_', without '..' and not 'latest'")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, or does not fit the engine it is loaded into."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holds a pickled object that flexspeed refuses to unpickle."""


class TagValidationError(ValueError, AssertionError):
    """Ranks passed different tags under ``checkpoint.tag_validation: "Fail"``.

    DeepSpeed asserts here, so this is an ``AssertionError`` too (and a ``ValueError``, as before).
    """


# ---- tags and the latest pointer ------------------------------------------------------------------
def validate_tag(tag: Any, *, what: str = "tag") -> str:
    """Return ``tag`` as a string if it is a safe directory name, else raise ``ValueError``."""
    text = str(tag) if isinstance(tag, int) and not isinstance(tag, bool) else tag
    if not isinstance(text, str) or not _TAG_RE.fullmatch(text) or ".." in text or text == LATEST:
        raise ValueError(f"checkpoint {what} {tag!r} is not allowed: {_TAG_RULE}. "
                         f"Fix: pass e.g. tag='global_step100' (or tag=None for global_step<N>)")
    return text


def validate_dir(path: Any, *, what: str) -> str:
    """``path`` (a str or ``os.PathLike``) as a string if it is non-empty, else raise ``ValueError``.

    DeepSpeed refuses an empty ``save_dir``; flexspeed refuses it for loading too, since an empty
    string would silently mean the working directory.
    """
    text = os.fspath(path) if isinstance(path, (str, os.PathLike)) else None
    if not text:
        raise ValueError(f"{what} must be a non-empty path, got {path!r} (an empty one would mean the working "
                         f"directory). Fix: pass the checkpoint directory, e.g. {what}='checkpoints'")
    return text


def read_latest(ckpt_dir: str | os.PathLike) -> str | None:
    """The tag named by ``ckpt_dir/latest`` (validated), or ``None`` if there is no such file."""
    path = os.path.join(os.fspath(ckpt_dir), LATEST)
    if os.path.islink(path):
        raise CheckpointError(f"{path} is a symbolic link; flexspeed follows no links in a checkpoint directory. "
                              "Fix: replace it with a file holding the tag name")
    if not os.path.isfile(path):
        return None
    with open(path, "rb") as f:
        raw = f.read(4096)
    try:
        text = raw.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not UTF-8 text: it is damaged. Fix: write the tag name into it (e.g. "
                              "global_step100) or pass tag=...") from None
    return validate_tag(text, what=f"tag in {path}")


def write_atomic(path: str, data: bytes | Callable[[IO[bytes]], None]) -> None:
    """Write ``data`` to ``path`` so that readers see the old or the new content, never a mix.

    ``data`` is the bytes, or a function that writes them into the file it is given (streaming a
    large file without holding it in memory). A failure leaves ``path`` as it was.
    """
    tmp = f"{path}.flexspeed-tmp-{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(os.path.dirname(path))


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- safe reading ---------------------------------------------------------------------------------
_DCP_META_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},
    "pathlib._local": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath", "Path"},  # Python 3.13+
    "collections": {"OrderedDict"},
    "builtins": {"set", "frozenset", "slice"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP's ``.metadata``: only DCP's metadata dataclasses and torch value types."""

    def find_class(self, module: str, name: str) -> Any:
        if name in _DCP_META_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                         torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a checkpoint's metadata")


INLINE_CHECK_BYTES = 256 << 10  # records below this size are checksummed on the loading thread (see _slice_file)


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with its ``.metadata`` pickle restricted and unsafe data refused.

    Storage paths in ``.metadata`` must name files inside the directory, and no symlink is read.
    With ``integrity`` (a :class:`flexspeed.runtime.checkpoint_verify.Integrity` of the tag), the
    ``.metadata`` bytes, its records and every record's bytes are verified against the manifest
    as they are read.
    """

    def __init__(self, path: str | os.PathLike, integrity: Any = None) -> None:
        super().__init__(path)
        self.integrity = integrity
        self._checks: list | None = None  # pending record checks, during read_data

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        from flexspeed.runtime.checkpoint_verify import Integrity, read_file_nofollow

        rank = kwargs.get("rank")
        name = ".metadata" if rank is None else f"__{rank}.metadata"
        state_dir = os.fspath(self.path)
        path = os.path.join(state_dir, name)
        if not os.path.lexists(path):
            raise CheckpointError(f"{path} is missing: {state_dir} is not a complete "
                                  "torch.distributed.checkpoint directory")
        integrity = self.integrity or Integrity(os.path.dirname(state_dir), None)
        data = (integrity.read(f"{os.path.basename(state_dir)}/{name}") if integrity.enabled
                else read_file_nofollow(path))
        try:
            metadata = _MetadataUnpickler(io.BytesIO(data)).load()
        except (pickle.UnpicklingError, AttributeError, EOFError, TypeError, ValueError, IndexError, KeyError,
                ImportError, MemoryError, OverflowError) as e:
            raise UnsafeCheckpointError(_unsafe_message(path, e)) from e
        if not isinstance(metadata, Metadata) or not isinstance(getattr(metadata, "storage_data", None), dict):
            raise UnsafeCheckpointError(_unsafe_message(path, f"it holds a {type(metadata).__name__}, "
                                                              "not DCP Metadata"))
        integrity.check_state_dir(state_dir, metadata)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def _slice_file(self, file: Any, sinfo: Any) -> IO[bytes]:
        if self.integrity is None or not self.integrity.enabled:
            return super()._slice_file(file, sinfo)
        file.seek(sinfo.offset)
        data = file.read(sinfo.length)
        path = os.path.join(os.fspath(self.path), sinfo.relative_path)
        if self._checks is None or sinfo.length < INLINE_CHECK_BYTES:
            # not called from read_data, or a small record (a step counter, a bias): checked now, since handing
            # it to the verify thread costs more than its checksum
            self.integrity.verify_slice(path, sinfo.offset, sinfo.length, data)
        else:  # checksummed on a second thread (zlib releases the GIL) while torch deserialises the record
            # into a fresh tensor; read_data waits for every check before it returns
            self._checks.append(self._pool.submit(self.integrity.verify_slice, path, sinfo.offset, sinfo.length,
                                                  data))
        return io.BytesIO(data)

    def read_data(self, plan: Any, planner: Any) -> Any:
        from concurrent.futures import ThreadPoolExecutor

        self._checks: list | None = []
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flexspeed-verify")
        try:
            try:
                result = super().read_data(plan, planner)
            except pickle.UnpicklingError as e:  # torch.load(weights_only=True) refused a data file
                self._raise_failed_check()  # a damaged record is reported as such, not as what torch made of it
                raise UnsafeCheckpointError(_unsafe_message(os.fspath(self.path), e)) from e
            except Exception:
                self._raise_failed_check()
                raise
            self._raise_failed_check()
            return result
        finally:
            self._pool.shutdown(wait=True)
            self._checks = None

    def _raise_failed_check(self) -> None:
        for check in self._checks or ():
            check.result()  # re-raises the CheckpointError of a record that failed its checksum


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's load planner, refusing pickled non-tensor items (DCP loads them with weights_only=False)."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        raise UnsafeCheckpointError(
            f"checkpoint item {read_item.dest_index.fqn!r} is a pickled Python object; flexspeed stores only "
            "tensors with torch.distributed.checkpoint and refuses to unpickle anything else there. Fix: load "
            "a checkpoint written by flexspeed, or convert this one with a trusted tool")


def _unsafe_message(path: str, err: Any) -> str:
    text = str(err)
    for line in text.splitlines():  # torch's weights_only message: keep the line naming the global
        if "Unsupported global" in line or "Unsupported operand" in line:
            text = line.replace("WeightsUnpickler error: ", "").split(". Please use")[0]
            break
    else:
        text = text.splitlines()[0] if text else type(err).__name__
    return (f"refusing to load {path}: it holds a pickled object outside the allow-list ({text}). flexspeed "
            "checkpoints never need one, so the file was tampered with or was not written by flexspeed. Fix: "
            "use a checkpoint from a trusted source; only if you trust this file, load it yourself with "
            "torch.load(..., weights_only=False)")


def safe_torch_load(path: str, data: bytes | None = None) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU, with a clear error for refused pickles.

    ``data``: the file's bytes, already read (and verified); otherwise ``path`` is read, refusing a
    symlink. A file torch cannot parse (truncated, zeroed) is a ``CheckpointError`` naming it.
    """
    from flexspeed.runtime.checkpoint_verify import read_file_nofollow

    if data is None:
        if not os.path.lexists(path):
            raise CheckpointError(f"checkpoint file {path} is missing: the checkpoint is incomplete or was not "
                                  "written by flexspeed")
        data = read_file_nofollow(path)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeCheckpointError(_unsafe_message(path, e)) from e
    except Exception as e:  # noqa: BLE001 - torch raises many types for damaged files
        raise CheckpointError(f"checkpoint file {path} failed to parse ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'no message'}): it is damaged or was not "
                              "written by flexspeed") from e


def read_metadata(state_dir: str) -> Metadata:
    """The DCP metadata of ``state_dir``, read with the restricted unpickler."""
    return SafeFileSystemReader(state_dir).read_metadata()


def serialize_checked(obj: Any, what: str, fix: str) -> bytes:
    """``torch.save`` bytes of ``obj``, verified to load back under ``weights_only=True``."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    data = buf.getvalue()
    try:
        torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(f"{what} cannot be stored safely: it holds an object that torch.load(weights_only=True) "
                         f"refuses ({str(e).splitlines()[-1] if str(e) else e}). {fix}") from None
    return data


def commit_tag(save_dir: str, tmp: str, tag: str, nonce: str, save_latest: bool) -> None:
    """Rank 0: make the finished temporary directory the tag, then move ``latest`` to it."""
    final = os.path.join(save_dir, tag)
    old = None
    if os.path.lexists(final):  # re-saving a tag: keep the old copy until the new one is in place
        old = os.path.join(save_dir, f"{_OLD_PREFIX}{tag}-{nonce}")
        os.rename(final, old)
    os.rename(tmp, final)
    _fsync_dir(save_dir)
    if save_latest:
        write_atomic(os.path.join(save_dir, LATEST), tag.encode())
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def remove_stale_temporaries(save_dir: str) -> None:
    """Delete what interrupted saves left behind: hidden ``.flexspeed-tmp-*`` directories, the atomic writer's
    ``<file>.flexspeed-tmp-<pid>`` files (e.g. ``latest``'s) and ``.flexspeed-old-<tag>-<nonce>`` copies of a
    re-saved tag that is complete again (an incomplete tag keeps its copy: loading falls back to it)."""
    for name in os.listdir(save_dir):
        path = os.path.join(save_dir, name)
        if re.fullmatch(r".+\.flexspeed-tmp-\d+", name) and os.path.isfile(path) and not os.path.islink(path):
            with contextlib.suppress(OSError):
                os.remove(path)
        elif name.startswith(_OLD_PREFIX) and os.path.isdir(path) and not os.path.islink(path):
            tag = name[len(_OLD_PREFIX):].rsplit("-", 1)[0]
            if os.path.isfile(os.path.join(save_dir, tag, MANIFEST)):
                shutil.rmtree(path, ignore_errors=True)
        elif name.startswith(TMP_PREFIX):
            path = os.path.join(save_dir, name)
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                try:
                    os.remove(path)
                except OSError:
                    pass


def resolve_tag_dir(load_dir: str, tag: str) -> str:
    """``load_dir/tag``; if a re-save of that tag was interrupted mid-swap, the kept old copy."""
    path = os.path.join(load_dir, tag)
    if os.path.isdir(path):
        return path
    olds = sorted(n for n in os.listdir(load_dir) if n.startswith(f"{_OLD_PREFIX}{tag}-")) \
        if os.path.isdir(load_dir) else []
    for name in reversed(olds):
        candidate = os.path.join(load_dir, name)
        if os.path.isfile(os.path.join(candidate, MANIFEST)):
            warnings.warn(f"checkpoint tag {tag!r} was being replaced when a save stopped; loading the previous "
                          f"copy {candidate}", stacklevel=3)
            return candidate
    tags = sorted(n for n in os.listdir(load_dir) if os.path.isfile(os.path.join(load_dir, n, MANIFEST))) \
        if os.path.isdir(load_dir) else []
    raise CheckpointError(f"checkpoint tag {tag!r} not found in {load_dir} (complete tags there: {tags or 'none'}). "
                          "Fix: pass one of those tags, or tag=None to load the one named in 'latest'")


def read_manifest(path: str) -> dict:
    """The JSON manifest of the tag directory ``path`` (it is written last, so it marks completeness)."""
    file = os.path.join(path, MANIFEST)
    if not os.path.isfile(file):
        raise CheckpointError(f"{path} has no {MANIFEST}: it is not a complete flexspeed checkpoint (a save was "
                              "interrupted, or another tool wrote it)")
    from flexspeed.runtime.checkpoint_verify import read_file_nofollow

    try:
        manifest = json.loads(read_file_nofollow(file).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{file} failed to parse as JSON ({e}): the manifest is damaged. Fix: load another "
                              "tag or restore the checkpoint from a good copy") from None
    if not isinstance(manifest, dict):
        raise CheckpointError(f"{file} holds a JSON {type(manifest).__name__}, not an object: the manifest is "
                              "damaged")
    version = manifest.get("format_version")
    if manifest.get("format") != "flexspeed-checkpoint" or not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{file} describes format {manifest.get('format')!r} version {version!r}; this "
                              f"flexspeed reads 'flexspeed-checkpoint' up to version {FORMAT_VERSION}. Fix: upgrade "
                              "flexspeed")
    return manifest


def find_unsafe(err: BaseException, kind: type[CheckpointError] = UnsafeCheckpointError) -> CheckpointError | None:
    """The ``UnsafeCheckpointError`` (or other ``kind``) behind ``err`` (DCP wraps per-rank failures), if any."""
    stack: list[Any] = [err]
    for _ in range(100):
        if not stack:
            break
        e = stack.pop()
        if isinstance(e, kind):
            return e
        if isinstance(e, tuple):  # DCP's CheckpointException.failures: rank -> (exception, traceback)
            stack += [x for x in e if isinstance(x, BaseException)]
        elif isinstance(e, BaseException):
            stack += [x for x in (e.__cause__, e.__context__) if x is not None]
            failures = getattr(e, "failures", None)
            if isinstance(failures, dict):
                stack += list(failures.values())
    return None


@contextlib.contextmanager
def quiet_single_process() -> Iterator[None]:
    """Silence DCP's warning that it runs in one process: flexspeed asks for that on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (save|load) in a single process")
        yield


def safe_dcp_load(target: dict, state_dir: str, *, what: str, no_dist: bool, allow_partial_load: bool = False,
                  integrity: Any = None) -> None:
    """``dcp.load`` of ``target`` from ``state_dir`` through the safe reader and planner.

    A refused pickle surfaces as ``UnsafeCheckpointError`` (also when DCP wrapped it in a per-rank
    failure); any other failure becomes a ``CheckpointError`` that says what was being read.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with quiet_single_process():
            dcp.load(target, storage_reader=SafeFileSystemReader(state_dir, integrity),
                     planner=SafeLoadPlanner(allow_partial_load=allow_partial_load), no_dist=no_dist)
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as e:  # DCP wraps per-rank failures in a BaseException
        unsafe = find_unsafe(e) or find_unsafe(e, CheckpointError)
        if unsafe is not None:
            raise unsafe from e
        raise CheckpointError(f"{what} failed: {e}") from e
