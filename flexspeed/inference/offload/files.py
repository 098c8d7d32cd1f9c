"""Byte-level access to weight files: safetensors headers, page-cache maps, O_DIRECT reads.

- :func:`safetensors_spans` reads only the JSON header of a ``.safetensors`` file and returns
  where each tensor's bytes are: a :class:`FileSpan` ``(path, offset, nbytes, dtype, shape)``.
  Nothing is loaded; disk-tier weights are later read in place from the checkpoint.
- :class:`MappedFile` maps a whole file once (private, never written). A span becomes a
  zero-copy tensor view; ``populate`` asks the kernel to map the span's pages ahead of use
  (``MADV_POPULATE_READ``: from the page cache, or a read from disk when cold) and ``drop``
  unmaps them again (``MADV_DONTNEED``), so the process's resident set holds only the layers
  in flight while the page cache keeps serving re-reads. The mapping asks for huge pages
  (``MADV_HUGEPAGE``): where the kernel keeps a file in 2 MiB page-cache folios (Linux >= 6.x
  on ext4/XFS), one entry maps 2 MiB, and mapping then unmapping OPT-1.3B's 2.4 GB per pass
  took 12 ms instead of 180 ms of CPU time (2-core reference machine). :meth:`MappedFile.ensure_huge`
  re-reads spans cached in small folios (a file read earlier with small requests) so they come back
  as 2 MiB folios.
- :class:`DirectFile` is the true-disk path: reads bypass the page cache with ``O_DIRECT``
  (4096-aligned offsets and lengths into page-aligned anonymous buffers; the aligned superset
  of a span is read and sliced), or, where the filesystem refuses ``O_DIRECT``, ordinary reads
  followed by ``posix_fadvise(POSIX_FADV_DONTNEED)`` on the range. ``method`` says which.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import os
import shutil
import struct
import tempfile
import threading
import weakref
from dataclasses import dataclass

import torch

from flexspeed.config.errors import ConfigError

__all__ = ["private_dir", "FileSpan", "safetensors_spans", "MappedFile", "DirectFile", "AlignedBuffer", "tensor_bytes",
           "write_tensor", "ALIGN", "ST_DTYPES"]

ALIGN = 4096
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
    "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
_MADV_DONTNEED, _MADV_WILLNEED, _MADV_HUGEPAGE, _MADV_POPULATE_READ = 4, 3, 14, 22
_PMD = 2 << 20  # a huge page: one page-table entry maps this much of a large page-cache folio
_READ_CHUNK = 8 << 20  # O_DIRECT request size (8 MiB measured best on the reference machine)

_libc = ctypes.CDLL(None, use_errno=True)  # ctypes calls release the GIL: prefetch threads run freely
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.madvise.restype = ctypes.c_int


@dataclass(frozen=True)
class FileSpan:
    """Where one tensor's bytes are in a file."""

    path: str
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def safetensors_spans(path: str) -> dict[str, FileSpan]:
    """Every tensor of a ``.safetensors`` file as a :class:`FileSpan` (only the header is read).

    Raises:
        ConfigError: the file is not a safetensors file.
    """
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ConfigError(f"{path!r} is too short to be a safetensors file", key="checkpoint")
        (n,) = struct.unpack("<Q", head)
        if n > 100 << 20:
            raise ConfigError(f"{path!r} declares a {n}-byte header; it is not a safetensors file", key="checkpoint")
        try:
            header = json.loads(f.read(n))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path!r} has a malformed safetensors header: {e}", key="checkpoint") from None
    base, out = 8 + n, {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        if meta["dtype"] not in ST_DTYPES:
            raise ConfigError(f"tensor {key!r} in {path!r} has dtype {meta['dtype']}, which offloading does not read; "
                              f"supported: {sorted(ST_DTYPES)}", key="checkpoint")
        begin, end = meta["data_offsets"]
        out[key] = FileSpan(path, base + begin, end - begin, ST_DTYPES[meta["dtype"]], tuple(meta["shape"]))
    return out


def private_dir(owner: object, parent: str | None, prefix: str) -> str:
    """A new directory under ``parent`` (the system temp dir if ``None``), removed when ``owner`` is collected.

    Every store gets its own directory, so two runners never write the same files.
    """
    if parent:
        os.makedirs(parent, exist_ok=True)
    path = tempfile.mkdtemp(prefix=prefix, dir=parent)
    weakref.finalize(owner, shutil.rmtree, path, True)
    return path


def _page_range(addr: int, nbytes: int) -> tuple[int, int]:
    start = addr - addr % mmap.PAGESIZE
    end = addr + nbytes
    return start, end - start


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """A writable byte view of a contiguous CPU tensor's storage (keep ``t`` alive while using it)."""
    assert t.device.type == "cpu" and t.is_contiguous(), "tensor_bytes needs a contiguous CPU tensor"
    n = t.numel() * t.element_size()
    if n == 0:
        return memoryview(bytearray(0))
    return memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())).cast("B")


def write_tensor(fd: int, t: torch.Tensor, offset: int) -> int:
    """Write ``t``'s bytes at ``offset``; returns the bytes written."""
    t = t.detach().contiguous().cpu()
    mv, done = tensor_bytes(t), 0
    while done < len(mv):
        done += os.pwrite(fd, mv[done:], offset + done)
    return done


class MappedFile:
    """A whole file mapped once; spans become zero-copy tensor views (see the module docstring)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        size = os.fstat(self._fd).st_size
        # private + writable protection: torch wants a writable buffer; nothing ever writes to it
        self._mm = mmap.mmap(self._fd, size, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._base = torch.frombuffer(self._mm, dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
        self._populate_ok = True
        if size:
            self._advise(0, size, _MADV_HUGEPAGE)  # refused (EINVAL) where the kernel has no huge pages: harmless

    def read_rows(self, span: FileSpan, rows: list[int], row_bytes: int, out: torch.Tensor) -> None:
        """Rows of a 2-D span into ``out`` (len(rows), row_bytes) uint8 with ``pread`` (page cache),
        without mapping them."""
        mv = tensor_bytes(out)
        for i, r in enumerate(rows):
            at, done = i * row_bytes, 0
            while done < row_bytes:
                got = os.preadv(self._fd, [mv[at + done:at + row_bytes]], span.offset + r * row_bytes + done)
                if got <= 0:
                    raise OSError(f"short read of row {r} of {self.path!r}")
                done += got

    def view(self, span: FileSpan) -> torch.Tensor:
        """The span as a tensor of its dtype and shape, sharing the mapping (no copy)."""
        raw = self._base[span.offset:span.offset + span.nbytes]
        if span.offset % max(1, span.dtype.itemsize):  # misaligned for the dtype: copy out
            raw = raw.clone()
        return raw.view(span.dtype).view(span.shape)

    def _advise(self, span_offset: int, nbytes: int, advice: int) -> int:
        start, length = _page_range(self._base.data_ptr() + span_offset, nbytes)
        return _libc.madvise(start, length, advice)

    def populate(self, offset: int, nbytes: int) -> None:
        """Map these bytes' pages now (reading them from disk if the page cache lacks them)."""
        if self._populate_ok and self._advise(offset, nbytes, _MADV_POPULATE_READ) != 0:
            self._populate_ok = False  # kernel older than 5.14: fall back to readahead hints
        if not self._populate_ok:
            self._advise(offset, nbytes, _MADV_WILLNEED)

    def prefetch(self, offset: int, nbytes: int) -> None:
        """Start reading these bytes into the page cache, without mapping them (no resident-set cost)."""
        self._advise(offset, nbytes, _MADV_WILLNEED)

    def drop(self, offset: int, nbytes: int) -> None:
        """Unmap these bytes' pages from this process (the page cache may keep them)."""
        self._advise(offset, nbytes, _MADV_DONTNEED)

    def pmd_mapped_bytes(self) -> int | None:
        """Bytes of this mapping now mapped by huge-page entries (``/proc/self/smaps``); ``None`` if unknown."""
        start = self._base.data_ptr()
        try:
            with open("/proc/self/smaps") as f:
                inside = False
                for line in f:
                    head = line.split(None, 1)[0]
                    if "-" in head and not head.endswith(":"):
                        lo, hi = (int(x, 16) for x in head.split("-"))
                        inside = lo <= start < hi
                    elif inside and head == "FilePmdMapped:":
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError):
            return None
        return None

    def ensure_huge(self, spans: list[tuple[int, int]], budget: int) -> str:
        """Have these (offset, nbytes) ranges cached in 2 MiB folios, re-reading them if they are not.

        A 2 MiB-aligned window inside the largest range is mapped as a probe. If the page cache
        holds it in small folios, the ranges are dropped from the page cache
        (``POSIX_FADV_DONTNEED``: clean pages no process maps) and read back through this huge-page
        mapping, which reads ahead in 2 MiB folios; nothing is re-read when they exceed ``budget``
        bytes (memory the page cache may use).

        Returns:
            ``"2M folios"``, ``"2M folios (re-read)"``, ``"small pages"`` (the kernel or the
            filesystem keeps small folios), or ``"n/a"`` (no whole 2 MiB window to probe).
        """
        base = self._base.data_ptr()

        def align_up(at: int) -> int:  # the first offset >= at that maps to a 2 MiB boundary
            return -(-(base + at) // _PMD) * _PMD - base

        probe = next((align_up(off) for off, n in sorted(spans, key=lambda s: -s[1])
                      if align_up(off) + _PMD <= off + n), None)
        if probe is None or not self._populate_ok:
            return "n/a"

        def huge() -> bool:
            self.populate(probe, _PMD)
            got = self.pmd_mapped_bytes()
            self.drop(probe, _PMD)
            return bool(got)

        if huge():
            return "2M folios"
        if sum(n for _, n in spans) > budget:
            return "small pages"
        for off, n in spans:
            os.posix_fadvise(self._fd, off, n, os.POSIX_FADV_DONTNEED)
        # read back now, one aligned 2 MiB window at a time, each as one folio; the partial windows at
        # the ranges' ends last (read first, their small folios' readahead would run into the next window)
        pieces = []
        for off, n in spans:
            at = off
            while at < off + n:
                end = min(off + n, align_up(at + 1))
                pieces.append((end - at < _PMD, at, end - at))
                at = end
        for _, at, n in sorted(pieces):
            self.populate(at, n)
            self.drop(at, n)
        return "2M folios (re-read)" if huge() else "small pages"

    def close(self) -> None:
        self._base = torch.empty(0, dtype=torch.uint8)
        try:
            self._mm.close()
        except BufferError:  # views still alive somewhere; the mapping goes when they do
            pass
        os.close(self._fd)


class AlignedBuffer:
    """A page-aligned anonymous buffer (what ``O_DIRECT`` reads need), viewed as a uint8 tensor."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
        self._mm = mmap.mmap(-1, self.nbytes)
        self.tensor = torch.frombuffer(self._mm, dtype=torch.uint8)

    def memview(self, offset: int, nbytes: int) -> memoryview:
        return memoryview(self._mm)[offset:offset + nbytes]


class DirectFile:
    """Reads that bypass the page cache (``method``: ``"O_DIRECT"`` or ``"fadvise"``)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.method = "O_DIRECT"
        self.bytes_read = 0
        self.read_seconds = 0.0
        self._lock = threading.Lock()
        try:
            self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECT", 0))
            if not hasattr(os, "O_DIRECT"):
                raise OSError("no O_DIRECT on this platform")
            probe = AlignedBuffer(ALIGN)
            os.preadv(self._fd, [probe.memview(0, ALIGN)], 0)
        except OSError:
            if getattr(self, "_fd", None) is not None:
                os.close(self._fd)
            self._fd = os.open(path, os.O_RDONLY)
            self.method = "fadvise"

    def read_runs(self, runs: list[tuple[int, int]], buf: AlignedBuffer) -> list[int]:
        """Read byte ranges ``(offset, nbytes)`` of the file into ``buf``.

        Each run's aligned superset is read to an aligned position of ``buf``. Returns, per run,
        where its first byte landed in ``buf``.
        """
        import time

        t0, where, pos = time.perf_counter(), [], 0
        for off, n in runs:
            a0 = off - off % ALIGN
            a1 = -(-(off + n) // ALIGN) * ALIGN
            assert pos + (a1 - a0) <= buf.nbytes, "read buffer too small for the planned runs"
            done = 0
            while a0 + done < a1:
                want = min(_READ_CHUNK, a1 - a0 - done)
                got = os.preadv(self._fd, [buf.memview(pos + done, want)], a0 + done)
                if got <= 0:  # end of file inside the aligned tail
                    break
                done += got
            if done < off + n - a0:
                raise OSError(f"short read from {self.path!r}: wanted bytes {off}..{off + n}, got {done} from {a0}")
            if self.method == "fadvise":
                os.posix_fadvise(self._fd, a0, a1 - a0, os.POSIX_FADV_DONTNEED)
            where.append(pos + (off - a0))
            pos += a1 - a0
        with self._lock:
            self.bytes_read += sum(n for _, n in runs)
            self.read_seconds += time.perf_counter() - t0
        return where

    def read_rows(self, span: FileSpan, rows: list[int], row_bytes: int, out: torch.Tensor) -> None:
        """Rows of a 2-D span into ``out`` (len(rows), row_bytes) uint8: one aligned read each, or,
        for many rows, one sequential read of the whole span (faster than thousands of small ones)."""
        if len(rows) > 256:
            buf = AlignedBuffer(self.superset_bytes([(span.offset, span.nbytes)]))
            (at,) = self.read_runs([(span.offset, span.nbytes)], buf)
            out.copy_(buf.tensor[at:at + span.nbytes].view(-1, row_bytes)[rows])
            return
        buf = AlignedBuffer(2 * ALIGN + row_bytes)
        for i, r in enumerate(rows):
            (at,) = self.read_runs([(span.offset + r * row_bytes, row_bytes)], buf)
            out[i] = buf.tensor[at:at + row_bytes]

    @staticmethod
    def superset_bytes(runs: list[tuple[int, int]]) -> int:
        """Buffer bytes :meth:`read_runs` needs for these runs."""
        return sum(-(-(off + n) // ALIGN) * ALIGN - (off - off % ALIGN) for off, n in runs)

    def close(self) -> None:
        os.close(self._fd)
