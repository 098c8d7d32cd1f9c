"""The native decode step: a C kernel for one new token per row, built on first use.

torch's CPU matrix-vector kernels stream weights at half the machine's memory bandwidth or less
(oneDNN bf16 14.7 GB/s, ``F.linear`` 9.9 GB/s, the int8/int4 kernels 6-8 GB/s, against 33 GB/s
for ``Tensor.sum``, on the 2-core AVX-512 machine of ``benchmarks/generate.py``), and a decode
step dispatches some 15 operators per layer from Python. ``csrc/decode.c`` runs a stack of
pre-norm decoder layers in one call instead: one OpenMP region, AVX-512 products that read each
weight byte once (fp32, bf16, int8 per-channel, int4 group-wise in the ``plain`` order),
attention over the fp32 KV cache, and the final norm + ``lm_head``.

It is compiled with the system C compiler (``$CC`` or ``gcc``; ``-O3 -march=native -fopenmp``)
into ``$FLEXSPEED_CACHE_DIR`` (default ``~/.cache/flexspeed``), keyed by the source, the
compiler and the CPU, and loaded with ``ctypes`` after torch, so that it shares torch's OpenMP
runtime. Without a compiler, or with ``FLEXSPEED_NATIVE=0``, :func:`library` is ``None`` and the
fused runner keeps its torch path (with a one-time warning when a compile failed).

:class:`NativeDecoder` maps a :class:`~flexspeed.inference.kernels.FusedRunner`'s modules onto
the kernel's structs; :meth:`NativeDecoder.unsupported` says why a model cannot use it (a packed
or blocked int4 weight, post-norm layers, tensor parallelism, ...), in which case the runner
stays on torch.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["library", "NativeDecoder"]

_SRC = Path(__file__).parent / "csrc" / "decode.c"
_FLAGS = ["-O3", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]


def _flags() -> list[str]:
    # FLEXSPEED_NATIVE_MARCH picks the target (default: this CPU); e.g. x86-64 builds the portable path
    return [f"-march={os.environ.get('FLEXSPEED_NATIVE_MARCH', 'native')}", *_FLAGS]
F32, BF16, I8, I4 = 0, 1, 2, 3
RELU, GELU, GELU_TANH, SILU = 0, 1, 2, 3
_P = ctypes.c_void_p
_I = ctypes.c_int32


class Linear(ctypes.Structure):
    _fields_ = [("fmt", _I), ("n", _I), ("k", _I), ("group", _I), ("w", _P), ("scales", _P), ("bias_fmt", _I),
                ("bias", _P), ("trans", _I)]


class Norm(ctypes.Structure):
    _fields_ = [("kind", _I), ("fmt", _I), ("eps", ctypes.c_float), ("w", _P), ("b", _P)]


class Layer(ctypes.Structure):
    _fields_ = [("norm1", Norm), ("norm2", Norm), ("qkv", Linear), ("out", Linear), ("up", Linear), ("down", Linear),
                ("act", _I), ("gated", _I), ("n_heads", _I), ("n_kv", _I), ("head_dim", _I),
                ("scale", ctypes.c_float), ("kc", _P), ("vc", _P), ("kv_fmt", _I), ("n_qkv_parts", _I),
                ("n_up_parts", _I), ("qkv_parts", Linear * 3), ("up_parts", Linear * 2)]


class Step(ctypes.Structure):
    _fields_ = [("B", _I), ("C", _I), ("start", _I), ("t_max", _I), ("nthreads", _I), ("valid_stride", _I),
                ("valid", _P), ("cos", _P), ("sin", _P), ("scratch", _P)]


def _cache_dir() -> Path:
    env = os.environ.get("FLEXSPEED_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "flexspeed"


def _cpu_id() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((line for line in text.splitlines() if line.startswith(("flags", "Features"))), "")
        model = next((line for line in text.splitlines() if line.startswith("model name")), "")
        return model + flags
    except OSError:
        return platform.processor() + platform.machine()


def _compile(cc: str, out: Path) -> str | None:
    """Compile the kernel to ``out`` (atomically); the compiler's message on failure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        res = subprocess.run([cc, *_flags(), "-o", tmp, str(_SRC), "-lm"], capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            return (res.stderr or res.stdout).strip()[-2000:] or f"{cc} exited with {res.returncode}"
        os.replace(tmp, out)  # concurrent builders each write their own file; the last rename wins
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, or ``None`` (disabled, no compiler, or the build failed: warned once)."""
    if os.environ.get("FLEXSPEED_NATIVE", "1").strip().lower() in ("0", "false", "off", "no"):
        return None
    cc = shutil.which(os.environ.get("CC", "gcc")) or shutil.which("cc")
    if cc is None:
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    key = hashlib.sha256(_SRC.read_bytes() + " ".join([cc, version, *_flags(), _cpu_id()]).encode()).hexdigest()[:16]
    path = None
    for base in (_cache_dir(), Path(tempfile.gettempdir()) / "flexspeed-native"):
        candidate = base / f"decode-{key}.so"
        if candidate.exists():
            path = candidate
            break
        try:
            error = _compile(cc, candidate)
        except OSError as exc:  # an unwritable cache directory: try the next one
            error = str(exc)
            continue
        if error is None:
            path = candidate
            break
        warnings.warn(f"flexspeed's native decode kernel did not compile with {cc}; decoding stays on torch's "
                      f"kernels (set FLEXSPEED_NATIVE=0 to silence this):\n{error}", RuntimeWarning, stacklevel=2)
        return None
    if path is None:
        return None
    lib = ctypes.CDLL(str(path))
    lib.fs_forward.argtypes = [ctypes.POINTER(Layer), ctypes.c_int, ctypes.POINTER(Norm), ctypes.POINTER(Linear),
                               _P, _P, ctypes.POINTER(Step)]
    lib.fs_forward.restype = ctypes.c_int
    lib.fs_scratch_floats.argtypes = [ctypes.POINTER(Layer), ctypes.c_int, ctypes.POINTER(Linear), ctypes.c_int,
                                      ctypes.c_int, ctypes.c_int, ctypes.c_int]
    lib.fs_scratch_floats.restype = ctypes.c_int64
    lib.fs_fast_path.restype = ctypes.c_int
    lib.fs_rows.argtypes = [ctypes.POINTER(Linear), _P, ctypes.c_int64, _P]
    lib.fs_rows.restype = ctypes.c_int
    lib.fs_argmax.argtypes = [_P, ctypes.c_int64, ctypes.c_int64, _P]
    lib.fs_argmax.restype = None
    lib.fs_layer_part.argtypes = [ctypes.POINTER(Layer), ctypes.c_int, _P, _P, ctypes.POINTER(Step)]
    lib.fs_layer_part.restype = ctypes.c_int
    lib.fs_shm_bytes.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.fs_shm_bytes.restype = ctypes.c_int64
    lib.fs_shm_allreduce.argtypes = [_P, ctypes.c_int, ctypes.c_int, ctypes.c_int64, _P, ctypes.c_int64,
                                     ctypes.c_int64, ctypes.c_double, _P]
    lib.fs_shm_allreduce.restype = ctypes.c_int
    return lib


class ShmAllReduce:
    """Sum fp32 vectors over the ranks of ``group``, all on this host, through shared memory.

    gloo's all-reduce of a hidden state (3 KB) takes ~1.4 ms on loopback on the 2-core machine
    (a send/recv round trip 0.16 ms), and a decode step of a 12-layer model needs 24 of them;
    this takes microseconds. The segment is a file in ``/dev/shm`` (the temp directory where
    there is none) that rank 0 creates, every rank maps, and rank 0 unlinks once all have. A rank
    that stops answering for ``timeout`` seconds makes the others raise instead of hang.
    Created collectively (every rank of ``group`` at the same point).
    """

    def __init__(self, lib: ctypes.CDLL, group, cap: int, timeout: float = 300.0) -> None:
        import socket
        import uuid

        import torch.distributed as dist

        self.lib, self.cap, self.timeout, self.call = lib, int(cap), float(timeout), 0
        self.rank, self.world = dist.get_rank(group), dist.get_world_size(group)
        hosts: list = [None] * self.world
        dist.all_gather_object(hosts, socket.gethostname(), group=group)
        if len(set(hosts)) != 1:
            raise Unsupported(f"the tensor-parallel ranks run on several hosts ({sorted(set(hosts))})")
        base = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        name = [os.path.join(base, f"flexspeed-tp-{uuid.uuid4().hex}")] if self.rank == 0 else [None]
        dist.broadcast_object_list(name, src=dist.get_global_rank(group, 0), group=group)
        nbytes = int(lib.fs_shm_bytes(self.world, self.cap))
        if self.rank == 0:
            with open(name[0], "wb") as f:
                f.truncate(nbytes)  # zeros: every sequence number starts at 0
        dist.barrier(group=group)
        self.segment = torch.from_file(name[0], shared=True, size=nbytes, dtype=torch.uint8)
        dist.barrier(group=group)
        if self.rank == 0:
            os.unlink(name[0])

    def __call__(self, x: torch.Tensor, accum: torch.Tensor | None = None) -> None:
        """``x`` (contiguous fp32) <- its sum over the ranks; or ``accum += `` that sum."""
        self.call += 1
        rc = self.lib.fs_shm_allreduce(self.segment.data_ptr(), self.rank, self.world, self.cap, x.data_ptr(),
                                       x.numel(), self.call, self.timeout,
                                       accum.data_ptr() if accum is not None else None)
        if rc == -1:
            raise ValueError(f"{x.numel()} values exceed the shared segment's {self.cap}")
        if rc != 0:
            raise RuntimeError(f"tensor-parallel all-reduce: a rank did not answer within {self.timeout:.0f} s")


# ------------------------------------------------------------------------------ module -> struct

class Unsupported(Exception):
    """A module the kernel cannot run (the message says which and why)."""


def _fmt(t: torch.Tensor, what: str) -> int:
    if t.device.type != "cpu" or not t.is_contiguous():
        raise Unsupported(f"{what} is not a contiguous CPU tensor")
    if t.dtype == torch.float32:
        return F32
    if t.dtype == torch.bfloat16:
        return BF16
    raise Unsupported(f"{what} is {t.dtype} (the kernel reads fp32, bf16, int8 and int4 weights)")


def linear_struct(mod: nn.Module | None, what: str, keep: list | None = None) -> Linear:
    """The kernel's view of an ``nn.Linear`` or ``QuantLinear`` (int8, or int4 in the plain order).

    int4 scales are copied into the row-major ``(N, K/group, 2)`` order the kernel reads (one row's
    scales in one or two cache lines; the module's ``(K/group, N, 2)`` order makes every group of a
    row a different line, and those lines thrash the L1 cache's sets); the copy, as large as the
    module's ``qparams``, is appended to ``keep``, which must outlive the struct.
    """
    from flexspeed.inference.quant import QuantLinear

    if mod is None:
        raise Unsupported(f"{what} is missing")
    bias = getattr(mod, "bias", None)
    bias_fmt = _fmt(bias, f"{what}.bias") if bias is not None else F32
    bias_ptr = bias.data_ptr() if bias is not None else None
    if type(mod) is nn.Linear:
        w = mod.weight.detach()
        return Linear(_fmt(w, f"{what}.weight"), w.shape[0], w.shape[1], 0, w.data_ptr(), None, bias_fmt, bias_ptr)
    if type(mod).__name__ == "Conv1D":  # HF GPT-2: weight (in, out), read transposed
        w = mod.weight.detach()
        return Linear(_fmt(w, f"{what}.weight"), w.shape[1], w.shape[0], 0, w.data_ptr(), None, bias_fmt, bias_ptr, 1)
    if isinstance(mod, QuantLinear):
        if mod.qweight.device.type != "cpu":
            raise Unsupported(f"{what} is not on the CPU")
        if mod.num_bits == 8:
            return Linear(I8, mod.out_features, mod.in_features, 0, mod.qweight.data_ptr(), mod.qparams.data_ptr(),
                          bias_fmt, bias_ptr)
        if mod.layout != "plain" or mod.in_features % 2:
            raise Unsupported(f"{what} holds int4 weights in aten's blocked order (quantize with the native "
                              "kernel loaded to get the plain order)")
        rows_major = _rows_major_scales(mod)
        if keep is not None:
            keep.append(rows_major)
        return Linear(I4, mod.out_features, mod.in_features, mod.group_size, mod.qweight.data_ptr(),
                      rows_major.data_ptr(), bias_fmt, bias_ptr)
    raise Unsupported(f"{what} is a {type(mod).__name__} (the kernel reads nn.Linear and QuantLinear)")


def _rows_major_scales(mod) -> torch.Tensor:
    """An int4 ``QuantLinear``'s scales as ``(N_padded, K/group, 2)``, made once per ``qparams``
    (cached on the module, outside its state; shared by every user of the kernel)."""
    q = mod.qparams
    key = (q.data_ptr(), q._version)
    cached = mod.__dict__.get("_native_scales")
    if cached is None or cached[0] != key:
        cached = (key, q.transpose(0, 1).contiguous())
        mod.__dict__["_native_scales"] = cached
    return cached[1]


_SCRATCH = threading.local()


def gather_rows(mod, rows: torch.Tensor) -> torch.Tensor | None:
    """Rows ``rows`` (R,) of a CPU ``QuantLinear``'s weight, dequantized to fp32 (R, K), or ``None``
    without the kernel: the embedding lookup of a quantized tied head, one call per step."""
    lib = library()
    if lib is None or rows.device.type != "cpu":
        return None
    try:
        lin = linear_struct(mod, "QuantLinear")
    except Unsupported:
        return None
    ids = rows.reshape(-1).to(torch.long).contiguous()
    out = torch.empty(ids.numel(), lin.k)
    if lib.fs_rows(ctypes.byref(lin), ids.data_ptr(), ids.numel(), out.data_ptr()) != 0:
        return None  # an id out of range: let torch raise its usual error
    return out


def argmax_rows(logits: torch.Tensor) -> torch.Tensor | None:
    """``logits.argmax(-1)`` for a contiguous CPU fp32 (B, V) tensor, or ``None`` without the kernel
    (torch's CPU argmax takes ~50 us over 50k logits; this ~5 us)."""
    lib = library()
    if lib is None or logits.device.type != "cpu" or logits.dtype != torch.float32 or logits.dim() != 2:
        return None
    x = logits if logits.is_contiguous() else logits.contiguous()
    out = torch.empty(x.shape[0], dtype=torch.long)
    lib.fs_argmax(x.data_ptr(), x.shape[0], x.shape[1], out.data_ptr())
    return out


def quant_matmul(mod, x2: torch.Tensor) -> torch.Tensor | None:
    """``x2 @ W.T + bias`` for a CPU ``QuantLinear`` (int8, or int4 in the plain order) and a few
    rows ``x2`` (M, K), through the kernel's products; ``None`` where the kernel does not apply.

    Serves the prompt's last-row ``lm_head`` and other small products on torch's path (aten has
    no kernel for the plain int4 order, and its int8 kernel rounds the activations to bf16).
    """
    lib = library()
    if lib is None or x2.device.type != "cpu":
        return None
    try:
        lin = linear_struct(mod, "QuantLinear")
    except Unsupported:
        return None
    M, K = x2.shape
    x = x2.to(torch.float32).contiguous()
    nt = torch.get_num_threads()
    need = int(lib.fs_scratch_floats(None, 0, ctypes.byref(lin), M, K, 1, nt))
    scratch = getattr(_SCRATCH, "buf", None)
    if scratch is None or scratch.numel() < need:
        scratch = _SCRATCH.buf = torch.empty(need)
    y = torch.empty(M, lin.n)
    step = Step(M, K, 0, 1, nt, 0, None, None, None, scratch.data_ptr())
    if lib.fs_forward(None, 0, None, ctypes.byref(lin), x.data_ptr(), y.data_ptr(), ctypes.byref(step)) != 0:
        return None
    return y


def _maybe_parts(mod: nn.Module, what: str, keep: list, slots) -> tuple[Linear, int]:
    """(the whole, number of parts): a ``ConcatLinear``'s parts go to ``slots``, the whole then only
    describes them (total rows, their common format)."""
    parts = getattr(mod, "parts", None)
    if parts is None or type(mod).__name__ != "ConcatLinear":
        return linear_struct(mod, what, keep), 0
    if len(parts) > len(slots):
        raise Unsupported(f"{what} has {len(parts)} parts (the kernel takes {len(slots)})")
    structs = [linear_struct(m, f"{what}[{i}]", keep) for i, m in enumerate(parts)]
    if len({(t.fmt, t.k, t.group) for t in structs}) != 1:
        raise Unsupported(f"{what}: its parts differ in format or input size")
    for i, t in enumerate(structs):
        slots[i] = t
    first = structs[0]
    return Linear(first.fmt, sum(t.n for t in structs), first.k, first.group, None, None, F32, None), len(structs)


def norm_struct(mod: nn.Module, what: str) -> Norm:
    w, b = getattr(mod, "weight", None), getattr(mod, "bias", None)
    if isinstance(mod, nn.LayerNorm):
        kind, eps = 0, mod.eps
    elif isinstance(mod, nn.RMSNorm) or hasattr(mod, "variance_epsilon"):
        kind = 1
        eps = getattr(mod, "variance_epsilon", None) or getattr(mod, "eps", None)
        if eps is None:
            eps = torch.finfo(w.dtype if w is not None else torch.float32).eps
        b = None
    else:
        raise Unsupported(f"{what} is a {type(mod).__name__} (the kernel knows LayerNorm and RMSNorm)")
    if w is None:
        raise Unsupported(f"{what} has no weight")
    fmt = _fmt(w.detach(), f"{what}.weight")
    if b is not None and _fmt(b.detach(), f"{what}.bias") != fmt:
        raise Unsupported(f"{what}: weight and bias differ in dtype")
    return Norm(kind, fmt, float(eps), w.data_ptr(), b.data_ptr() if b is not None else None)


def _activation(act) -> int:
    """The kernel's code for ``act``, found by evaluating it (modules and functions alike)."""
    x = torch.linspace(-6, 6, 97)
    try:
        y = act(x)
    except Exception as exc:  # noqa: BLE001 - anything unusual is simply unsupported
        raise Unsupported(f"activation {act!r} failed on a probe: {exc}") from None
    candidates = [(RELU, F.relu(x)), (GELU, F.gelu(x)), (GELU_TANH, F.gelu(x, approximate="tanh")), (SILU, F.silu(x))]
    for code, ref in candidates:
        if isinstance(y, torch.Tensor) and y.shape == x.shape and torch.allclose(y.float(), ref, atol=1e-5, rtol=1e-5):
            return code
    raise Unsupported(f"activation {act!r} is not ReLU, GELU (erf or tanh) or SiLU")


class NativeDecoder:
    """Runs a :class:`FusedRunner`'s single-token steps through the C kernel.

    Structs are rebuilt whenever a module or weight of the runner changed (quantization,
    ``model.to``); the cache pointers are set per call.
    """

    def __init__(self, runner) -> None:
        self.runner, self.lib = runner, library()
        self._checks: list[tuple] | None = None
        self._reason: str | None = None
        self._cache_id: tuple | None = None
        self._scratch = torch.empty(0)
        self.keep: list[torch.Tensor] = []
        self._shm: ShmAllReduce | None = None
        self.tp_group = None

    def __getstate__(self) -> dict:  # ctypes structs hold raw pointers: copies rebuild them
        return {"runner": self.runner}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["runner"])

    # ---------------------------------------------------------------- structs

    def _modules(self) -> tuple[list, list, nn.Module]:
        r = self.runner
        finals = [r._module(p) for p in r.arch.final_paths]
        return [layer.parts() for layer in r.layers], finals, r.root.get_submodule(r.arch.head_path)

    def _build(self, parts: list, finals: list, head: nn.Module) -> None:
        r = self.runner
        if getattr(r.root, "_flexspeed_tp_size", 1) != 1 and getattr(r, "tp_group", None) is None:
            raise Unsupported("the model is tensor-parallel but the runner has no tp_group (init_inference sets it)")
        keep: list[torch.Tensor] = []
        layers = (Layer * len(parts))()
        for i, (layer, (n1, qkv, out, n2, up, down)) in enumerate(zip(r.layers, parts)):
            if not layer.pre_norm:
                raise Unsupported(f"layer {i} normalises after attention (post-norm)")
            p = f"layer {i}"
            hq, hkv, hd = layer.n_heads, layer.n_kv_heads, layer.head_dim
            s = layers[i]
            s.norm1, s.norm2 = norm_struct(n1, f"{p} norm1"), norm_struct(n2, f"{p} norm2")
            s.qkv, s.n_qkv_parts = _maybe_parts(qkv, f"{p} qkv", keep, s.qkv_parts)
            s.up, s.n_up_parts = _maybe_parts(up, f"{p} up", keep, s.up_parts)
            s.out, s.down = linear_struct(out, f"{p} out", keep), linear_struct(down, f"{p} down", keep)
            s.act, s.gated = _activation(layer.act), int(layer.gated)
            s.n_heads, s.n_kv, s.head_dim, s.scale = hq, hkv, hd, float(layer.scale)
            if hq % hkv or s.qkv.n != (hq + 2 * hkv) * hd or s.out.k != hq * hd:
                raise Unsupported(f"{p}: projection shapes do not match {hq} heads, {hkv} kv heads of {hd}")
            if s.down.k != (s.up.n // 2 if layer.gated else s.up.n):
                raise Unsupported(f"{p}: the MLP's up and down projections do not match")
        norms = [m for m in finals if m is not None]
        if len(norms) != 1:
            raise Unsupported("the model has a projection after its final norm (OPT project_out)")
        self.layers, self.final = layers, norm_struct(norms[0], "final norm")
        self.head = linear_struct(head, "lm_head", keep)
        self.keep = keep
        self.tp_group = getattr(r, "tp_group", None) if getattr(r.root, "_flexspeed_tp_size", 1) != 1 else None
        if self.tp_group is not None:  # each rank computes its block of the (replicated) head's rows
            import torch.distributed as dist

            rank, world = dist.get_rank(self.tp_group), dist.get_world_size(self.tp_group)
            per = -(-self.head.n // world)
            r0, r1 = min(self.head.n, rank * per), min(self.head.n, (rank + 1) * per)
            self.head_rows, self.head_per, self.n_vocab = (r0, r1), per, self.head.n
            self.head = _row_slice(self.head, r0, r1)
        self._final_p, self._head_p = ctypes.byref(self.final), ctypes.byref(self.head)
        if any(s.qkv.k != self.head.k for s in layers):
            raise Unsupported("layers and head disagree on the hidden size")

    def _watch(self, used: list[nn.Module], pointers: set[int]) -> list[tuple]:
        """What the structs depend on: every (dict, key, object) on the paths from the root to the
        modules used and every tensor of those modules; for the modules in ``pointers`` (one
        layer's and the head's: ``model.to`` swaps every ``param.data`` at once) the data
        pointer too. About 300 identity checks for OPT-125M, some 15 us per step."""
        root = self.runner.root
        paths: dict[int, str] = {}
        for name, mod in root.named_modules(remove_duplicate=False):
            paths.setdefault(id(mod), name)
        checks: dict[tuple[int, str], tuple] = {}
        for mod in [sub for m in used for sub in m.modules()]:  # a ConcatLinear's parts too
            path = paths.get(id(mod))
            if path:  # each step down from the root
                parent = root
                for part in path.split("."):
                    child = parent._modules[part]
                    checks[(id(parent._modules), part)] = (parent._modules, part, child, None)
                    parent = child
            for d in (mod._parameters, mod._buffers):
                for key, t in d.items():
                    ptr = t.data_ptr() if t is not None and id(mod) in pointers else None
                    checks[(id(d), key)] = (d, key, t, ptr)
        return list(checks.values())

    def _fresh(self) -> bool:
        for d, key, obj, ptr in self._checks:
            cur = d.get(key)
            if cur is not obj or (ptr is not None and cur.data_ptr() != ptr):
                return False
        return True

    def unsupported(self) -> str | None:
        """Why this runner cannot use the kernel now, or ``None`` if it can."""
        if self.lib is None:
            return "the native kernel is not available (no C compiler, or FLEXSPEED_NATIVE=0)"
        if self._checks is not None and self._fresh():
            return self._reason
        parts, finals, head = self._modules()
        used = [m for p in parts for m in p] + [m for m in finals if m is not None] + [head]
        pointers = {id(m) for m in [*(parts[0] if parts else ()), *finals, head] if m is not None}
        self._checks, self._reason, self._cache_id = self._watch(used, pointers), None, None
        if self.runner.own_layers is not None:  # wrappers outside the root's tree: watch them too
            self._checks += [(layer.__dict__, "_modules", layer.__dict__["_modules"], None)
                             for layer in self.runner.own_layers]
        try:
            self._build(parts, finals, head)
        except Unsupported as exc:
            self._reason = str(exc)
        return self._reason

    # ---------------------------------------------------------------- call

    def forward(self, x: torch.Tensor, k: list[torch.Tensor], v: list[torch.Tensor], start: int,
                key_mask: torch.Tensor | None, rope: tuple | None) -> torch.Tensor:
        """fp32 logits (B, 1, V) for embedded tokens ``x`` (B, 1, C) at cache position ``start``.

        ``k``/``v``: the per-layer fp32 or bf16 cache buffers (B, H_kv, T_max, hd), written at ``start``.
        """
        B, _, C = x.shape
        t_max, nt = k[0].shape[2], torch.get_num_threads()
        # the buffers themselves are held (not their addresses: a new cache may reuse some of them)
        current = ((B, t_max, nt), *k, *v)
        held = self._cache_id
        if (held is None or len(held) != len(current) or held[0] != current[0]
                or any(a is not b for a, b in zip(held[1:], current[1:]))):
            if len(k) != len(self.layers) or any(t.dtype not in (torch.float32, torch.bfloat16) or not t.is_contiguous()
                                                  for t in (*k, *v)):
                raise ValueError("the native decode step needs one contiguous fp32 or bf16 key and value buffer "
                                 "per layer")
            for i, s in enumerate(self.layers):
                s.kc, s.vc = k[i].data_ptr(), v[i].data_ptr()
                s.kv_fmt = BF16 if k[i].dtype == torch.bfloat16 else F32
            need = self.lib.fs_scratch_floats(self.layers, len(self.layers), self.head, B, C, t_max, nt)
            if self._scratch.numel() < need:
                self._scratch = torch.empty(need)
            self._cache_id = current
        h = x.reshape(B, C).to(torch.float32, copy=True)
        if self.tp_group is not None:
            return self._forward_tp(h, start, t_max, nt, key_mask, rope)
        logits = torch.empty(B, self.head.n)
        step, keep = self._step(B, C, start, t_max, nt, key_mask, rope)
        rc = self.lib.fs_forward(self.layers, len(self.layers), self._final_p, self._head_p, h.data_ptr(),
                                 logits.data_ptr(), ctypes.byref(step))
        if rc != 0:
            raise RuntimeError(f"native decode kernel rejected the shapes (code {rc})")
        return logits.view(B, 1, -1)  # fp32: the sampler works in fp32 anyway

    def _step(self, B: int, C: int, start: int, t_max: int, nt: int, key_mask: torch.Tensor | None,
              rope: tuple | None) -> tuple[Step, list]:
        """The per-call struct, and the tensors it points into (to be held until the call returns)."""
        step, keep = Step(B, C, start, t_max, nt, 0, None, None, None, self._scratch.data_ptr()), []
        if key_mask is not None:
            valid = key_mask[:, :start + 1]
            if not valid.is_contiguous():
                valid = valid.contiguous()
            keep.append(valid)
            step.valid, step.valid_stride = valid.data_ptr(), valid.stride(0)
        if rope is not None:
            cos, sin = (t.reshape(B, -1).to(torch.float32).contiguous() for t in rope)
            keep += [cos, sin]
            step.cos, step.sin = cos.data_ptr(), sin.data_ptr()
        return step, keep

    def _forward_tp(self, h: torch.Tensor, start: int, t_max: int, nt: int, key_mask: torch.Tensor | None,
                    rope: tuple | None) -> torch.Tensor:
        """Tensor parallel: each half layer's partial projection is summed over the ranks through
        shared memory and added to the residual stream; the head's row blocks are gathered the same
        way (each rank fills its block of a zeroed full vector)."""
        B, C = h.shape
        vocab = self.head_per * dist_world(self.tp_group)
        need = B * max(C, vocab)
        if self._shm is None or self._shm.cap < need:
            self._shm = ShmAllReduce(self.lib, self.tp_group, need)
        step, keep = self._step(B, C, start, t_max, nt, key_mask, rope)
        part = torch.empty(B, C)
        for layer in self.layers:
            for half in (0, 1):
                rc = self.lib.fs_layer_part(ctypes.byref(layer), half, h.data_ptr(), part.data_ptr(), ctypes.byref(step))
                if rc != 0:
                    raise RuntimeError(f"native decode kernel rejected the shapes (code {rc})")
                self._shm(part, accum=h)  # h += sum over ranks
        mine = torch.empty(B, self.head.n)
        rc = self.lib.fs_forward(None, 0, self._final_p, self._head_p, h.data_ptr(), mine.data_ptr(), ctypes.byref(step))
        if rc != 0:
            raise RuntimeError(f"native decode kernel rejected the shapes (code {rc})")
        full = torch.zeros(B, vocab)
        r0, r1 = self.head_rows
        full[:, r0:r1] = mine
        self._shm(full)
        del keep
        return full[:, :self.n_vocab].view(B, 1, -1)


def dist_world(group) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group)


_ESIZE = {F32: 4.0, BF16: 2.0, I8: 1.0, I4: 0.5}


def _row_slice(lin: Linear, r0: int, r1: int) -> Linear:
    """The struct of rows ``r0:r1`` of ``lin`` (pointers offset into the same memory)."""
    if lin.trans:
        raise Unsupported("a transposed (Conv1D) lm_head cannot be split by rows")
    out = Linear.from_buffer_copy(lin)
    out.n = r1 - r0
    out.w = lin.w + int(r0 * lin.k * _ESIZE[lin.fmt])
    if lin.fmt == I8:
        out.scales = lin.scales + r0 * 4
    elif lin.fmt == I4:
        out.scales = lin.scales + r0 * (lin.k // lin.group) * 4  # (n, K/group, 2) bf16
    if lin.bias:
        out.bias = lin.bias + r0 * (4 if lin.bias_fmt == F32 else 2)
    return out
