"""The tiered weight store: per-tensor placement, loading straight from checkpoints, layer fetches.

Building a :class:`WeightStore` walks the architecture's layers (embedding, decoder layers, head)
and places each layer's tensors by the policy's weight percentages (see ``policy.py``). Then,
one tensor at a time, so that peak memory is the resident part plus one tensor:

- ``gpu``/``cpu`` tier: read into memory in the compute dtype (the compute device for ``gpu``;
  host memory, pinned with ``pin_weight``, for ``cpu``; on a CPU-only machine both are RAM);
- ``disk`` tier, tensor in a safetensors file already in the compute dtype: nothing is copied,
  the store records ``(file, offset, nbytes, dtype, shape)`` and reads it in place;
- ``disk`` tier otherwise (another dtype, a tensor of an in-memory model, or compressed): the
  bytes are written once to ``weights-NNN.bin`` (one file per layer, 4096-aligned) in a directory
  of this store's own under ``offload_dir``,
  and read from there.

With ``compress_weight`` every weight matrix (and the token embedding, which doubles as the
tied LM head) is stored int4 with quant.py's format (group 64, asymmetric, two values per byte)
and computed through :class:`~flexspeed.inference.quant.QuantLinear`.

``fetch(j)`` returns layer ``j``'s tensors ready to compute with; ``release`` gives back what the
fetch took (mapped pages, read buffers). Disk reads go through the page cache as zero-copy
views of a file mapping (default) or, with ``direct_io``, through :class:`~.files.DirectFile`.
"""

from __future__ import annotations

import os
import shutil
import threading
import types
from concurrent.futures import ThreadPoolExecutor
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from flexspeed.config.errors import ConfigError
from flexspeed.inference.offload.arch import Arch, TensorSpec
from flexspeed.inference.offload.chooser import available_memory
from flexspeed.inference.offload.files import (ALIGN, AlignedBuffer, DirectFile, FileSpan, MappedFile, private_dir,
                                               safetensors_spans, write_tensor)
from flexspeed.inference.offload.policy import OffloadPolicy, place_by_size
from flexspeed.utils.logging import human_bytes
from flexspeed.utils.progress import Progress

__all__ = ["TensorSource", "WeightStore", "Fetched"]

_GROUP = 64  # int4 group size (FlexLLMGen's and quant.py's default)
_MERGE_GAP = 1 << 20  # spans closer than this are read as one request
_STREAM_MIN = 64 << 20  # disk-tier matrices at least this large are multiplied chunk by chunk
_STREAM_CHUNK = 16 << 20  # bytes per chunk


class TensorSource:
    """Checkpoint tensors by key: file spans (safetensors, read lazily) or in-memory tensors."""

    def __init__(self, spans: Mapping[str, FileSpan] | None = None, tensors: Mapping[str, torch.Tensor] | None = None,
                 origin: str = "checkpoint") -> None:
        self.spans = dict(spans or {})
        self.tensors = dict(tensors or {})
        self.origin = origin

    @classmethod
    def from_files(cls, files: list[str]) -> TensorSource:
        """Safetensors files by header; ``.pt``/``.bin`` files memory-mapped through ``torch.load``."""
        spans: dict[str, FileSpan] = {}
        tensors: dict[str, torch.Tensor] = {}
        for path in files:
            if path.endswith(".safetensors"):
                spans.update(safetensors_spans(path))
                continue
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            wrapped = [k for k in ("module", "state_dict", "model")
                       if isinstance(sd, Mapping) and isinstance(sd.get(k), Mapping)]
            if wrapped and len(sd) <= 3:  # {"module": state_dict} and similar wrappers
                sd = sd[wrapped[0]]
            tensors.update({k: v for k, v in sd.items() if isinstance(v, torch.Tensor)})
        return cls(spans, tensors, origin=", ".join(os.path.basename(f) for f in files))

    @classmethod
    def from_module(cls, model: torch.nn.Module) -> TensorSource:
        """A module's parameters and persistent buffers, under every name (tied ones too)."""
        tensors: dict[str, torch.Tensor] = {}
        for mname, mod in model.named_modules(remove_duplicate=False):
            prefix = f"{mname}." if mname else ""
            for n, p in mod._parameters.items():
                if p is not None:
                    tensors[prefix + n] = p.detach()
            for n, b in mod._buffers.items():
                if b is not None and n not in mod._non_persistent_buffers_set:
                    tensors[prefix + n] = b
        meta = [k for k, t in tensors.items() if t.is_meta]
        if meta:
            raise ConfigError(f"tensors such as {meta[:3]} are on the meta device and no checkpoint was given; pass "
                              "checkpoint=<safetensors folder> (offloading loads it straight into the tiers) or build "
                              "the model with real weights", key="checkpoint")
        return cls(tensors=tensors, origin=f"{type(model).__name__} in memory")

    def resolve(self, key: str, stored_as: tuple[str, ...] = ()) -> str:
        """The stored key for an architecture key (``model.``/``transformer.`` prefixes optional).

        Raises:
            ConfigError: not found; the message shows keys that are there.
        """
        have = self.spans.keys() | self.tensors.keys()
        head, _, rest = key.partition(".")
        for cand in (key, rest, f"model.{key}", f"{head}.model.{rest}", *stored_as):
            if cand and cand in have:
                return cand
        raise ConfigError(f"tensor {key!r} is not in {self.origin} (it has e.g. {sorted(have)[:4]}); the config does "
                          "not describe these weights", key="checkpoint")

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.spans[key].shape) if key in self.spans else tuple(self.tensors[key].shape)


@dataclass
class _Entry:
    spec: TensorSpec
    tier: str
    parts: dict[str, torch.Tensor | FileSpan]
    """``{"data": ...}``, or ``{"qweight": ..., "qparams": ...}`` for an int4 matrix."""
    quant: tuple[int, int, str, int] | None = None
    """(in_features, out_features, layout, block) of an int4 matrix."""

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes if isinstance(p, FileSpan) else p.numel() * p.element_size() for p in self.parts.values())


@dataclass
class Fetched:
    """One layer's tensors, ready to compute with, and what to give back afterwards."""

    layer: int
    weights: dict[str, Any]
    drops: list[tuple[MappedFile, int, int]] = field(default_factory=list)
    buffers: list[AlignedBuffer] = field(default_factory=list)
    event: Any = None

    def ready(self) -> dict[str, Any]:
        """Wait for device copies (accelerators) and return the weights."""
        if self.event is not None:
            stream = torch.cuda.current_stream()
            stream.wait_event(self.event)
            for w in self.weights.values():
                if isinstance(w, torch.Tensor) and w.is_cuda:
                    w.record_stream(stream)
        return self.weights


class _RowTable:
    """A disk-tier embedding table looked up by rows, never mapped or read whole for a few ids.

    ``reader`` is the file's :class:`~.files.MappedFile` (page-cache mode: one ``pread`` per row;
    faulting rows in through the mapping would map whole 2 MiB folios, so a prompt's scattered
    ids would put most of a 206 MB table into the resident set) or :class:`~.files.DirectFile`
    (true-disk mode).
    """

    def __init__(self, reader: MappedFile | DirectFile, span: FileSpan, device: torch.device) -> None:
        self.reader, self.span, self.device = reader, span, device
        self.row_bytes = span.nbytes // span.shape[0]

    def gather_rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        uniq, inverse = torch.unique(ids.cpu(), return_inverse=True)
        raw = torch.empty(len(uniq), self.row_bytes, dtype=torch.uint8)
        self.reader.read_rows(self.span, uniq.tolist(), self.row_bytes, raw)
        return raw.view(self.span.dtype)[inverse].to(device=self.device, dtype=dtype)  # (len(ids), C)


class _HostTable:
    """A table in host memory looked up for an accelerator: gather on the host, move the rows."""

    def __init__(self, table: Any, device: torch.device) -> None:
        self.table, self.device = table, device

    def gather_rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        ids = ids.cpu()
        rows = self.table.gather_rows(ids, dtype) if hasattr(self.table, "gather_rows") else self.table[ids]
        return rows.to(device=self.device, dtype=dtype, non_blocking=True)


class _StreamedMatrix:
    """A large disk-tier weight (out, in) multiplied a chunk of output rows at a time.

    Only one or two chunks are mapped or buffered at once, so an LM head of hundreds of MB adds
    little to the resident set. Page-cache mode maps a chunk, multiplies, unmaps it (the whole
    matrix was handed to kernel readahead at fetch time); true-disk mode reads chunk ``i + 1`` on
    a helper thread while chunk ``i`` multiplies.
    """

    def __init__(self, store: WeightStore, span: FileSpan) -> None:
        self.store, self.span = store, span
        n, k = span.shape
        self.rows = max(1, store.stream_chunk // (k * span.dtype.itemsize))

    def _chunks(self) -> list[tuple[int, int, int, int]]:
        n, k = self.span.shape
        row_bytes = k * self.span.dtype.itemsize
        out = []
        for r0 in range(0, n, self.rows):
            r1 = min(r0 + self.rows, n)
            out.append((r0, r1, self.span.offset + r0 * row_bytes, (r1 - r0) * row_bytes))
        return out

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n, k = self.span.shape
        x2 = x.reshape(-1, k)  # (M, K)
        out = torch.empty(x2.shape[0], n, dtype=x.dtype, device=x.device)  # (M, N)
        dev = self.store.device
        if self.store.mode == "mmap":
            mapped = self.store._map(self.span.path)
            for r0, r1, off, nb in self._chunks():
                w = mapped.view(FileSpan(self.span.path, off, nb, self.span.dtype, (r1 - r0, k)))
                out[:, r0:r1] = torch.nn.functional.linear(x2, w.to(dev, non_blocking=True))
                mapped.drop(off, nb)
            return out.view(*x.shape[:-1], n)
        reader = self.store._direct_file(self.span.path)
        chunks = self._chunks()

        def read(i: int) -> tuple[AlignedBuffer, int]:
            _, _, off, nb = chunks[i]
            buf = self.store._pool.get(DirectFile.superset_bytes([(off, nb)]))
            return buf, reader.read_runs([(off, nb)], buf)[0]

        nxt = self.store._streamer.submit(read, 0)
        for i, (r0, r1, _, nb) in enumerate(chunks):
            buf, at = nxt.result()
            if i + 1 < len(chunks):
                nxt = self.store._streamer.submit(read, i + 1)
            w = buf.tensor[at:at + nb].view(self.span.dtype).view(r1 - r0, k)
            out[:, r0:r1] = torch.nn.functional.linear(x2, w.to(dev))
            self.store._pool.put(buf)
        return out.view(*x.shape[:-1], n)


class _BufferPool:
    def __init__(self) -> None:
        self._free: list[AlignedBuffer] = []
        self._lock = threading.Lock()

    def get(self, nbytes: int) -> AlignedBuffer:
        with self._lock:
            fits = [b for b in self._free if b.nbytes >= nbytes]
            if fits:
                best = min(fits, key=lambda b: b.nbytes)
                self._free.remove(best)
                return best
        return AlignedBuffer(max(nbytes, 1 << 20))

    def put(self, buf: AlignedBuffer) -> None:
        with self._lock:
            self._free.append(buf)


def _merge(spans: list[tuple[int, int]], gap: int) -> list[tuple[int, int]]:
    out: list[list[int]] = []
    for off, n in sorted(spans):
        if out and off <= out[-1][0] + out[-1][1] + gap:
            out[-1][1] = max(out[-1][1], off + n - out[-1][0])
        else:
            out.append([off, n])
    return [(a, b) for a, b in out]


class WeightStore:
    """Weights placed by an :class:`OffloadPolicy`; see the module docstring."""

    def __init__(self, arch: Arch, source: TensorSource, policy: OffloadPolicy, device: torch.device,
                 dtype: torch.dtype) -> None:
        self.arch, self.policy, self.device, self.dtype = arch, policy, device, dtype
        self.mode = "direct" if policy.direct_io else "mmap"
        self._dir: str | None = None
        self._mapped: dict[str, MappedFile] = {}
        self._direct: dict[str, DirectFile] = {}
        self._pool = _BufferPool()
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._warned: set[str] = set()
        self._streamer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flexspeed-stream")
        self.map_ahead = True
        """Page-cache mode: map the next layer's pages ahead (else only start readahead; pages fault in)."""
        self.stream_min, self.stream_chunk = _STREAM_MIN, _STREAM_CHUNK
        """Disk-tier matrices of at least ``stream_min`` bytes are multiplied ``stream_chunk`` bytes at a time."""
        self.entries: dict[str, _Entry] = {}
        self.layer_keys: list[list[tuple[str, str]]] = []  # per layer: (logical name, entry key)
        self._load_all(source)
        self.page_cache: dict[str, str] = {}
        """Page-cache mode: per file with disk-tier bytes, how its pages are cached (``MappedFile.ensure_huge``)."""
        if self.mode == "mmap":
            self._huge_folios()

    # ------------------------------------------------------------------ loading

    def _stored_nbytes(self, spec: TensorSpec) -> int:
        n = 1
        for s in spec.shape:
            n *= s
        if self._compressible(spec, warn=False):
            return n // 2 + (n // _GROUP) * 4
        return n * self.dtype.itemsize

    def _compressible(self, spec: TensorSpec, warn: bool = True) -> bool:
        if not (self.policy.compress_weight and spec.matrix):
            return False
        in_features = spec.shape[0] if spec.kind == "conv1d" else spec.shape[1]
        if in_features % _GROUP:
            if warn and "group" not in self._warned:
                self._warned.add("group")
                warnings.warn(f"offload.compress_weight: {spec.key} has {in_features} input features, not a multiple "
                              f"of the group size {_GROUP}; such matrices stay uncompressed", stacklevel=4)
            return False
        return True

    def _load_all(self, source: TensorSource) -> None:
        percents = self.policy.percents("w")
        with Progress("offload: placing weights", len(self.arch.layers), "layers") as progress:
            for j, layer in enumerate(self.arch.layers):
                self._load_layer(source, j, layer, percents)
                progress.update(1, note=", ".join(f"{t} {human_bytes(n)}" for t, n in self.tier_bytes().items() if n))

    def _load_layer(self, source: TensorSource, j: int, layer, percents) -> None:
        """Place layer ``j``'s tensors (tied ones where first seen) on their tiers."""
        names: list[tuple[str, str]] = []
        own: list[tuple[TensorSpec, str]] = []
        for spec in layer.tensors:
            key = source.resolve(spec.key, spec.stored_as)
            got = source.shape(key)
            if got != spec.shape:
                raise ConfigError(f"checkpoint tensor {key!r} has shape {got} but the model config implies "
                                  f"{spec.shape}; the config does not match these weights", key="checkpoint")
            names.append((spec.name, key))
            if key not in self.entries and all(key != k for _, k in own):  # tied: placed where first seen
                own.append((spec, key))
        tiers = place_by_size([self._stored_nbytes(s) for s, _ in own], percents)
        fd = None
        try:
            for (spec, key), tier in zip(own, tiers):
                self.entries[key], fd = self._load_one(spec, key, tier, source, j, fd)
        finally:
            if fd is not None:
                os.close(fd)
        self.layer_keys.append(names)

    def _materialize(self, source: TensorSource, key: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """One tensor in memory (floating ones in ``dtype``, default the compute dtype), copied once."""
        dtype = dtype or self.dtype
        if key in source.tensors:
            t = source.tensors[key]
            return t.to(dtype) if t.is_floating_point() else t
        span = source.spans[key]
        mapped = self._map(span.path)
        view = mapped.view(span)
        t = view.to(dtype) if view.is_floating_point() and view.dtype != dtype else view.clone()
        mapped.drop(span.offset, span.nbytes)
        if self.mode == "direct":
            fd = os.open(span.path, os.O_RDONLY)
            os.posix_fadvise(fd, span.offset, span.nbytes, os.POSIX_FADV_DONTNEED)
            os.close(fd)
        return t

    def _offload_file(self, layer: int) -> str:
        if self._dir is None:
            self._dir = private_dir(self, self.policy.resolved_offload_dir(), "flexspeed-offload-")
        return os.path.join(self._dir, f"weights-{layer:03d}.bin")

    def _write(self, t: torch.Tensor, layer: int, fd: int | None) -> tuple[FileSpan, int]:
        path = self._offload_file(layer)
        if fd is None:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        end = os.fstat(fd).st_size
        offset = -(-end // ALIGN) * ALIGN
        write_tensor(fd, t, offset)
        if self.mode == "direct":  # keep the page cache honest in true-disk mode
            os.fsync(fd)
            os.posix_fadvise(fd, offset, t.numel() * t.element_size(), os.POSIX_FADV_DONTNEED)
        return FileSpan(path, offset, t.numel() * t.element_size(), t.dtype, tuple(t.shape)), fd

    def _home(self, t: torch.Tensor, tier: str) -> torch.Tensor:
        if tier == "gpu":
            return t.to(self.device)
        if self.device.type == "cuda" and self.policy.pin_weight:
            return t.pin_memory()
        return t

    def _load_one(self, spec: TensorSpec, key: str, tier: str, source: TensorSource, layer: int,
                  fd: int | None) -> tuple[_Entry, int | None]:
        if self._compressible(spec):
            from flexspeed.inference.quant import QuantLinear

            w = self._materialize(source, key, torch.float32)
            w = w.t() if spec.kind == "conv1d" else w  # (out, in)
            q = QuantLinear.from_linear(types.SimpleNamespace(weight=w, bias=None), num_bits=4, group_size=_GROUP)
            meta = (q.in_features, q.out_features, q.layout, q.block)
            parts: dict[str, Any] = {"qweight": q.qweight, "qparams": q.qparams}
            if tier == "disk":
                for name in list(parts):
                    parts[name], fd = self._write(parts[name], layer, fd)
            else:
                parts = {n: self._home(p, tier) for n, p in parts.items()}
            return _Entry(spec, tier, parts, meta), fd
        if tier != "disk":  # an in-memory model's tensor is kept as is when dtype and device already fit
            t = self._materialize(source, key)
            return _Entry(spec, tier, {"data": self._home(t.contiguous(), tier)}), fd
        span = source.spans.get(key)
        if span is not None and (span.dtype == self.dtype or not span.dtype.is_floating_point) \
                and span.offset % max(1, span.dtype.itemsize) == 0:
            return _Entry(spec, tier, {"data": span}), fd  # read in place from the checkpoint
        span, fd = self._write(self._materialize(source, key), layer, fd)
        return _Entry(spec, tier, {"data": span}), fd

    # ------------------------------------------------------------------ files

    def _huge_folios(self) -> None:
        """Have the disk-tier bytes cached in 2 MiB folios, so each pass maps and unmaps them cheaply."""
        by_file: dict[str, list[tuple[int, int]]] = {}
        for e in self.entries.values():
            if e.tier == "disk":
                for p in e.parts.values():
                    if isinstance(p, FileSpan):
                        by_file.setdefault(p.path, []).append((p.offset, p.nbytes))
        budget = available_memory() // 2
        for path, spans in by_file.items():
            if self._dir is not None and path.startswith(self._dir):
                fd = os.open(path, os.O_RDONLY)  # pages this store wrote: clean first, so they can be re-read
                try:
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
            self.page_cache[path] = self._map(path).ensure_huge(_merge(spans, _MERGE_GAP), budget)

    def _map(self, path: str) -> MappedFile:
        if path not in self._mapped:
            self._mapped[path] = MappedFile(path)
        return self._mapped[path]

    def _direct_file(self, path: str) -> DirectFile:
        if path not in self._direct:
            self._direct[path] = DirectFile(path)
        return self._direct[path]

    # ------------------------------------------------------------------ fetching

    def fetch(self, j: int) -> Fetched:
        """Layer ``j``'s tensors (disk parts read, device copies queued); thread-safe per layer."""
        out = Fetched(j, {})
        lookups = self.arch.layers[j].kind == "embed"  # its tables are looked up by rows
        disk: list[tuple[str, str, FileSpan]] = []
        streamed: dict[str, _StreamedMatrix] = {}
        lazy: set[tuple[str, str]] = set()
        for name, key in self.layer_keys[j]:
            e = self.entries[key]
            data = e.parts.get("data")
            if isinstance(data, FileSpan) and lookups and e.spec.kind == "embedding":
                lazy.add((key, "data"))  # embedding lookups touch rows only
            elif isinstance(data, FileSpan) and data.nbytes >= self.stream_min and len(data.shape) == 2 \
                    and name.endswith(".w") and name not in self.arch.opts.get("conv1d", ()):
                streamed[name] = _StreamedMatrix(self, data)
                if self.mode == "mmap":  # readahead into the page cache; chunks are mapped while multiplying
                    self._map(data.path).prefetch(data.offset, data.nbytes)
                continue
            for part, p in e.parts.items():
                if isinstance(p, FileSpan):
                    disk.append((key, part, p))
        loaded = self._read_mmap(disk, lazy, out) if self.mode == "mmap" else self._read_direct(disk, lazy, out)
        for name, key in self.layer_keys[j]:
            if name in streamed:
                out.weights[name] = streamed[name]
                continue
            e = self.entries[key]
            parts = {part: loaded.get((key, part), p) for part, p in e.parts.items()}
            out.weights[name] = self._assemble(e, parts, lookups and e.spec.kind == "embedding")
        on_device = any(isinstance(w, torch.Tensor) and w.is_cuda for w in out.weights.values())
        if self._copy_stream is not None and on_device:
            out.event = torch.cuda.Event()
            out.event.record(self._copy_stream)
        return out

    def _read_mmap(self, disk: list, lazy: set, out: Fetched) -> dict[tuple[str, str], Any]:
        loaded: dict[tuple[str, str], Any] = {}
        by_file: dict[str, list[tuple[int, int]]] = {}
        for key, part, span in disk:
            mapped = self._map(span.path)
            if (key, part) in lazy:
                loaded[(key, part)] = _RowTable(mapped, span, self.device)
                continue
            loaded[(key, part)] = mapped.view(span)
            out.drops.append((mapped, span.offset, span.nbytes))
            by_file.setdefault(span.path, []).append((span.offset, span.nbytes))
        for path, spans in by_file.items():
            for off, n in _merge(spans, 64 << 10):
                if self.map_ahead:
                    self._mapped[path].populate(off, n)
                else:
                    self._mapped[path].prefetch(off, n)
        return loaded

    def _read_direct(self, disk: list, lazy: set, out: Fetched) -> dict[tuple[str, str], Any]:
        loaded: dict[tuple[str, str], Any] = {}
        by_file: dict[str, list[tuple[str, str, FileSpan]]] = {}
        for key, part, span in disk:
            if (key, part) in lazy:
                loaded[(key, part)] = _RowTable(self._direct_file(span.path), span, self.device)
            else:
                by_file.setdefault(span.path, []).append((key, part, span))
        for path, items in by_file.items():
            runs = _merge([(s.offset, s.nbytes) for _, _, s in items], _MERGE_GAP)
            buf = self._pool.get(DirectFile.superset_bytes(runs))
            out.buffers.append(buf)
            where = self._direct_file(path).read_runs(runs, buf)
            for key, part, s in items:
                i = max(r for r in range(len(runs)) if runs[r][0] <= s.offset)
                at = where[i] + (s.offset - runs[i][0])
                loaded[(key, part)] = buf.tensor[at:at + s.nbytes].view(s.dtype).view(s.shape)
        return loaded

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu" or t.device == self.device:
            return t
        with torch.cuda.stream(self._copy_stream):
            return t.to(self.device, non_blocking=True)

    def _assemble(self, e: _Entry, parts: dict[str, Any], rows_only: bool) -> Any:
        if e.quant is None:
            t = parts["data"]
            if not isinstance(t, torch.Tensor):  # a row table (disk-tier embedding)
                return t
            if rows_only and t.device != self.device:  # look rows up where the table is, move only them
                return _HostTable(t, self.device)
            return self._to_device(t)
        from flexspeed.inference.quant import QuantLinear

        k, n, layout, block = e.quant
        shell = QuantLinear(k, n, num_bits=4, group_size=_GROUP, bias=False, dtype=self.dtype, device="meta",
                            layout=layout, block=block)
        shell._buffers["qweight"] = self._to_device(parts["qweight"])
        shell._buffers["qparams"] = self._to_device(parts["qparams"])
        return shell

    def release(self, fetched: Fetched) -> None:
        """Give back a fetch: unmap its pages, return its read buffers."""
        if fetched.event is not None:
            fetched.event.synchronize()
        for mapped, off, n in fetched.drops:
            mapped.drop(off, n)
        for buf in fetched.buffers:
            self._pool.put(buf)
        fetched.weights.clear()
        fetched.drops.clear()
        fetched.buffers.clear()

    # ------------------------------------------------------------------ reporting

    def tier_bytes(self) -> dict[str, int]:
        """Stored weight bytes per tier (tied tensors counted once)."""
        out = {"gpu": 0, "cpu": 0, "disk": 0}
        for e in self.entries.values():
            out[e.tier] += e.nbytes
        return out

    @property
    def resident_fraction(self) -> float:
        """Share of stored weight bytes held in memory (gpu + cpu tiers)."""
        b = self.tier_bytes()
        total = sum(b.values())
        return (b["gpu"] + b["cpu"]) / total if total else 1.0

    @property
    def read_method(self) -> str:
        """How disk-tier bytes are read: ``page cache (mmap)``, ``O_DIRECT`` or ``fadvise``."""
        if self.mode == "mmap":
            return "page cache (mmap)"
        methods = sorted({d.method for d in self._direct.values()})
        return "+".join(methods) or "O_DIRECT"

    def disk_stats(self) -> tuple[int, float]:
        """(bytes read with direct I/O, seconds spent in those reads)."""
        return (sum(d.bytes_read for d in self._direct.values()), sum(d.read_seconds for d in self._direct.values()))

    def close(self) -> None:
        """Close files and remove the files this store wrote."""
        self._streamer.shutdown(wait=True)
        for m in self._mapped.values():
            m.close()
        for d in self._direct.values():
            d.close()
        self._mapped.clear()
        self._direct.clear()
        if self._dir is not None:  # this store's own directory under offload_dir
            shutil.rmtree(self._dir, ignore_errors=True)
