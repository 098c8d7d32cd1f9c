"""The native decode step: a C kernel for one new token per row, built on first use.

torch's CPU matrix-vector kernels stream weights at half the machine's memory bandwidth or less
(oneDNN bf16 14.7 GB/s, ``F.linear`` 9.9 GB/s, the int8/int4 kernels 6-8 GB/s, against 33 GB/s
for ``Tensor.sum``, on the 2-core AVX-512 machine of ``benchmarks/generate.py``), and a decode
step dispatches some 15 operators per layer from Python. ``csrc/decode.c`` runs a stack of
pre-norm decoder layers in one call instead: one parallel job, AVX-512 products that read each
weight byte once (fp32, bf16, int8 per-channel, int4 group-wise in the ``plain`` order),
attention over the fp32 KV cache, and the final norm + ``lm_head``.

The library's whole interface (every export, struct and enum) is declared in ``csrc/fs_abi.h``;
the ctypes mirrors below follow it, and :func:`library` checks the header's ``FS_ABI_VERSION``
and the size of every struct against them when it loads the library (a mismatch raises
:class:`NativeABIError`). A negative return code from the kernel raises :class:`NativeError`
(:class:`NativeOutOfMemory` / :class:`NativeIndexError` for out of memory and an id out of range)
instead of quietly running torch's path.

It is compiled with the system C compiler (``$CC``, else ``gcc`` or ``cc``; ``-O3
-march=native -fopenmp``) into ``$FLEXSPEED_CACHE_DIR`` (default ``~/.cache/flexspeed``), keyed by
the source, the compiler and the CPU, and loaded with ``ctypes`` after torch, so that it shares
torch's OpenMP runtime. With ``FLEXSPEED_NATIVE=0`` :func:`library` is ``None``; without a
compiler, or when the build fails, it is ``None`` after one warning that names the compiler, the
command and the fix, and :func:`status` (shown by ``flexspeed report``) says the same.

:class:`~flexspeed.inference.native_decoder.NativeDecoder` maps a fused runner's modules onto the
kernel's structs (this module holds the build, the structs and the small entry points).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import re
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["library", "status", "attention", "linear_struct", "norm_struct", "quant_matmul", "gather_rows",
           "argmax_rows", "pool_stats", "set_adaptive", "check", "Unsupported", "NativeError", "NativeABIError",
           "NativeOutOfMemory", "NativeIndexError", "ABI_VERSION", "EXPORTS"]

_CSRC = Path(__file__).parent / "csrc"
_SRC = _CSRC / "decode.c"  # includes the csrc/*.h beside it
_HEADER = _CSRC / "fs_abi.h"
_FLAGS = ["-O3", "-fopenmp", "-pthread", "-shared", "-fPIC", "-std=gnu11"]


def _flags() -> list[str]:
    # FLEXSPEED_NATIVE_MARCH picks the target (default: this CPU); e.g. x86-64 builds the portable path
    return [f"-march={os.environ.get('FLEXSPEED_NATIVE_MARCH', 'native')}", *_FLAGS]


# ---------------------------------------------------------------------------------- the ABI (fs_abi.h)

ABI_VERSION = 2  # FS_ABI_VERSION
F32, BF16, I8, I4 = 0, 1, 2, 3  # enum fs_format
RELU, GELU, GELU_TANH, SILU = 0, 1, 2, 3  # enum fs_activation
THREADS_ENV, THREADS_OPENMP, THREADS_POOL = -1, 0, 1  # enum fs_threads_mode
OK, ERR_SHAPE, ERR_NOMEM, ERR_RANGE, ERR_TIMEOUT, ERR_ARG = 0, -1, -2, -3, -4, -5  # enum fs_status
_STATUS_TEXT = {ERR_SHAPE: "shapes that do not fit together", ERR_NOMEM: "out of memory",
                ERR_RANGE: "a token id or position outside its table",
                ERR_TIMEOUT: "a tensor-parallel rank stopped answering", ERR_ARG: "an argument outside its allowed values"}
_P = ctypes.c_void_p
_I = ctypes.c_int32
_L = ctypes.c_int64


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


class Embed(ctypes.Structure):
    _fields_ = [("tok", Linear), ("pos", Linear), ("pos_offset", _I), ("round_bf16", _I)]


class Gen(ctypes.Structure):
    _fields_ = [("T", _I), ("max_new", _I), ("min_new", _I), ("n_eos", _I), ("pad", _I), ("eos", _P), ("seq", _P),
                ("done", _P), ("pos0", _P), ("cos", _P), ("sin", _P), ("logits", _P), ("x", _P)]


class Attn(ctypes.Structure):
    _fields_ = [("B", _I), ("Hq", _I), ("Hkv", _I), ("T", _I), ("hd", _I), ("start", _I), ("causal", _I), ("fmt", _I),
                ("nthreads", _I), ("scale", ctypes.c_float), ("q", _P), ("q_b", _L), ("q_h", _L), ("q_t", _L),
                ("k", _P), ("k_b", _L), ("k_h", _L), ("k_t", _L), ("v", _P), ("v_b", _L), ("v_h", _L), ("v_t", _L),
                ("out", _P), ("o_b", _L), ("o_h", _L), ("o_t", _L), ("mask", _P), ("m_b", _L), ("m_t", _L)]


class PoolStats(ctypes.Structure):
    _fields_ = [("calls", _L), ("explored", _L), ("switches", _L), ("preempted", _L), ("sleeps", _L),
                ("current", _I), ("requested", _I)]


STRUCTS = (Linear, Norm, Layer, Step, Embed, Gen, Attn, PoolStats)  # in enum fs_struct_id's order


def _ptr(cls) -> type:
    return ctypes.POINTER(cls)


# export -> (restype, argtypes), exactly the functions fs_abi.h declares
EXPORTS: dict[str, tuple] = {
    "fs_abi_version": (ctypes.c_int, []),
    "fs_struct_size": (_L, [ctypes.c_int]),
    "fs_fast_path": (ctypes.c_int, []),
    "fs_set_threads": (ctypes.c_int, [ctypes.c_int]),
    "fs_set_adaptive": (ctypes.c_int, [ctypes.c_int]),
    "fs_pool_stats_get": (None, [_ptr(PoolStats)]),
    "fs_scratch_floats": (_L, [_ptr(Layer), ctypes.c_int, _ptr(Linear), ctypes.c_int, ctypes.c_int, ctypes.c_int,
                               ctypes.c_int]),
    "fs_forward": (ctypes.c_int, [_ptr(Layer), ctypes.c_int, _ptr(Norm), _ptr(Linear), _P, _P, _ptr(Step)]),
    "fs_layer_part": (ctypes.c_int, [_ptr(Layer), ctypes.c_int, _P, _P, _ptr(Step)]),
    "fs_generate": (ctypes.c_int, [_ptr(Layer), ctypes.c_int, _ptr(Norm), _ptr(Linear), _ptr(Embed), _ptr(Step),
                                   _ptr(Gen)]),
    "fs_attention": (ctypes.c_int, [_ptr(Attn)]),
    "fs_argmax": (None, [_P, _L, _L, _P]),
    "fs_rows": (ctypes.c_int, [_ptr(Linear), _P, _L, _P]),
    "fs_dequant_rows": (ctypes.c_int, [_ptr(Linear), ctypes.c_int, ctypes.c_int, _P, ctypes.c_int, ctypes.c_int]),
    "fs_shm_bytes": (_L, [ctypes.c_int, _L]),
    "fs_shm_allreduce": (ctypes.c_int, [_P, ctypes.c_int, ctypes.c_int, _L, _P, _L, _L, ctypes.c_double, _P]),
}


class NativeABIError(RuntimeError):
    """The compiled library and native.py's ctypes mirrors disagree (version or a struct's size)."""


class NativeError(RuntimeError):
    """A kernel call returned a negative status code (``code``; ``export`` names the call)."""

    def __init__(self, export: str, code: int, what: str = "") -> None:
        self.export, self.code = export, code
        reason = _STATUS_TEXT.get(code, "an unknown failure")
        super().__init__(f"flexspeed's native kernel failed in {export}{' (' + what + ')' if what else ''}: "
                         f"{reason} (code {code})")


class NativeOutOfMemory(NativeError, MemoryError):
    """The kernel could not allocate a working buffer."""


class NativeIndexError(NativeError, IndexError):
    """A token id or position outside its table."""


def check(rc: int, export: str, what: str = "") -> int:
    """``rc`` when it is not negative; otherwise the error that its ``fs_status`` code names."""
    if rc >= 0:
        return rc
    cls = {ERR_NOMEM: NativeOutOfMemory, ERR_RANGE: NativeIndexError}.get(rc, NativeError)
    raise cls(export, rc, what)


def check_abi(lib) -> None:
    """Raise :class:`NativeABIError` unless ``lib`` has every export of ``EXPORTS``, the same ABI
    version and the same size for every struct as the mirrors here."""
    missing = [name for name in EXPORTS if not hasattr(lib, name)]
    if missing:
        raise NativeABIError(f"the native library {_lib_name(lib)} lacks the exports {missing} that "
                             f"flexspeed/inference/native.py declares; {_ABI_FIX}")
    version = int(lib.fs_abi_version())
    if version != ABI_VERSION:
        raise NativeABIError(f"the native library {_lib_name(lib)} has ABI version {version}, flexspeed/inference/"
                             f"native.py expects {ABI_VERSION}; {_ABI_FIX}")
    wrong = []
    for i, cls in enumerate(STRUCTS):
        size = int(lib.fs_struct_size(i))
        if size != ctypes.sizeof(cls):
            wrong.append(f"{cls.__name__}: C {size} bytes, ctypes {ctypes.sizeof(cls)}")
    if wrong:
        raise NativeABIError(f"the native library {_lib_name(lib)} and its ctypes mirrors in flexspeed/inference/"
                             f"native.py disagree on struct sizes ({'; '.join(wrong)}); {_ABI_FIX}")


_ABI_FIX = ("csrc/fs_abi.h and the mirrors in native.py must change together (bump FS_ABI_VERSION and ABI_VERSION); "
            "delete stale builds in $FLEXSPEED_CACHE_DIR (default ~/.cache/flexspeed) or set FLEXSPEED_NATIVE=0")


def _lib_name(lib) -> str:
    return getattr(lib, "_name", None) or repr(lib)


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    for name, (restype, argtypes) in EXPORTS.items():
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.restype, fn.argtypes = restype, argtypes
    return lib


# ---------------------------------------------------------------------------------- the build


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


def _command(cc: str, out: str) -> list[str]:
    return [cc, *_flags(), "-o", out, str(_SRC), "-lm"]


def _compile(cc: str, out: Path) -> str | None:
    """Compile the kernel to ``out`` (atomically); the compiler's message on failure."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        res = subprocess.run(_command(cc, tmp), capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            return (res.stderr or res.stdout).strip()[-2000:] or f"{cc} exited with {res.returncode}"
        os.replace(tmp, out)  # concurrent builders each write their own file; the last rename wins
        return None
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


_FIX_CC = ("install a C compiler with OpenMP (e.g. `apt-get install gcc`) or point $CC at one; "
           "FLEXSPEED_NATIVE=0 turns the kernel off and silences this")
_state: dict = {"state": "not loaded", "detail": "library() has not been called"}


def status() -> dict:
    """What :func:`library` did: ``state`` (``ok``, ``disabled``, ``no compiler``, ``build failed``,
    ``abi mismatch``), ``detail``, and where known ``fix``, ``compiler``, ``command`` (a failed
    build's) and ``path``. Loads the library first if nothing tried yet."""
    if _state["state"] == "not loaded":
        try:
            library()
        except NativeABIError:
            pass
    return dict(_state)


def _set_state(state: str, detail: str, **extra) -> None:
    _state.clear()
    _state.update(state=state, detail=detail, **extra)


def _not_built(state: str, detail: str, fix: str = _FIX_CC, **extra) -> None:
    _set_state(state, detail, fix=fix, **extra)
    warnings.warn(f"flexspeed's native decode kernel was not built: {detail}\nFix: {fix}. Decoding stays on torch's "
                  "kernels (2-3x slower at batch 1); `flexspeed report` shows this too.", RuntimeWarning, stacklevel=3)


def _find_compiler() -> tuple[str | None, str]:
    """(the compiler's path or None, how it was looked for)."""
    wanted = os.environ.get("CC", "").strip()
    if wanted:  # an explicit choice is honoured, not replaced by another compiler
        cc = shutil.which(shlex.split(wanted)[0]) if shlex.split(wanted) else None
        return cc, f"$CC={wanted!r}"
    return shutil.which("gcc") or shutil.which("cc"), "gcc or cc on PATH ($CC unset)"


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernel, or ``None`` (``FLEXSPEED_NATIVE=0``; no compiler or a failed build: warned
    once, see :func:`status`). Raises :class:`NativeABIError` when the library and the ctypes
    mirrors disagree."""
    if os.environ.get("FLEXSPEED_NATIVE", "1").strip().lower() in ("0", "false", "off", "no"):
        _set_state("disabled", "FLEXSPEED_NATIVE is off (unset it, or set it to 1, to use the kernel)")
        return None
    cc, looked = _find_compiler()
    if cc is None:
        _not_built("no compiler", f"no C compiler found (looked for {looked})", compiler=looked)
        return None
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        _not_built("no compiler", f"the C compiler {cc} did not run ({type(exc).__name__}: {exc})", compiler=cc)
        return None
    sources = b"".join(p.read_bytes() for p in sorted(_CSRC.iterdir()) if p.suffix in (".c", ".h"))
    key = hashlib.sha256(sources + " ".join([cc, version, *_flags(), _cpu_id()]).encode()).hexdigest()[:16]
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
        command = shlex.join(_command(cc, str(candidate)))
        _not_built("build failed", f"`{command}` failed:\n{error}", compiler=cc, command=command)
        return None
    if path is None:
        _not_built("build failed", f"no writable cache directory ($FLEXSPEED_CACHE_DIR, {tempfile.gettempdir()})",
                   "set FLEXSPEED_CACHE_DIR to a writable directory", compiler=cc)
        return None
    lib = _declare(ctypes.CDLL(str(path)))
    try:
        check_abi(lib)
    except NativeABIError as exc:
        _set_state("abi mismatch", str(exc), compiler=cc, path=str(path))
        raise
    _set_state("ok", f"built with {cc} for {'AVX-512' if lib.fs_fast_path() else 'portable C'}, ABI {ABI_VERSION}",
               compiler=cc, path=str(path))
    return lib


def header_exports() -> list[str]:
    """The function names ``csrc/fs_abi.h`` declares (what ``EXPORTS`` must mirror)."""
    text = re.sub(r"/\*.*?\*/", "", _HEADER.read_text(), flags=re.S)
    return re.findall(r"^\s*(?:const\s+)?[A-Za-z_][A-Za-z0-9_]*\s*\**\s*(fs_[a-z0-9_]+)\s*\(", text, flags=re.M)


def pool_stats() -> dict | None:
    """Counters of the kernel's threads (calls, re-measurements, thread-count switches, time slices
    lost inside calls, waits that slept, the thread count last used / asked for), or ``None``."""
    lib = library()
    if lib is None:
        return None
    s = PoolStats()
    lib.fs_pool_stats_get(ctypes.byref(s))
    return {name: getattr(s, name) for name, _ in PoolStats._fields_}


def set_adaptive(on: bool | None) -> bool | None:
    """Turn the adaptive thread count on / off (``None``: back to ``FLEXSPEED_NATIVE_ADAPTIVE``);
    the previous setting, or ``None`` without the kernel."""
    lib = library()
    if lib is None:
        return None
    return bool(lib.fs_set_adaptive(-1 if on is None else int(on)))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, mask: torch.Tensor | None,
              causal: bool, scale: float) -> torch.Tensor | None:
    """``softmax(scale q k^T) v`` of T new queries over cache keys ``[0, start + T)``, in C.

    Args:
        q: (B, Hq, T, hd); k, v: (B, Hkv, >= start + T, hd), any strides but a contiguous last
            dimension (a cache buffer is read in place); all fp32 or all bf16, on the CPU.
        mask: bool (B or 1, 1, T, start + T), True where a query may attend, or ``None``.
        causal: query i also sees only keys ``<= start + i``.
    Returns:
        (B, Hq, T, hd) in q's dtype, a view of a (B, T, Hq, hd) buffer (so the output projection's
        reshape is free); a query with no key to attend to gets zeros. ``None`` where the kernel
        does not apply (no kernel, another dtype or device, a strided last dimension).
    Raises:
        NativeOutOfMemory: the kernel could not allocate its working buffers.
    """
    lib = library()
    if lib is None or q.device.type != "cpu" or q.dtype not in (torch.float32, torch.bfloat16):
        return None
    if k.dtype != q.dtype or v.dtype != q.dtype or any(t.stride(-1) != 1 for t in (q, k, v)):
        return None
    B, hq, T, hd = q.shape
    hkv = k.shape[1]
    if k.shape[0] != B or v.shape[:2] != k.shape[:2] or k.shape[2] < start + T or v.shape[2] < start + T \
            or hq % hkv or hd > 512:
        return None
    out = torch.empty(B, T, hq, hd, dtype=q.dtype)
    a = Attn(B=B, Hq=hq, Hkv=hkv, T=T, hd=hd, start=start, causal=int(causal), fmt=BF16 if q.dtype == torch.bfloat16
             else F32, nthreads=torch.get_num_threads(), scale=scale)
    for name, t in (("q", q), ("k", k), ("v", v)):
        setattr(a, name, t.data_ptr())
        for dim, stride in zip(("_b", "_h", "_t"), t.stride()):
            setattr(a, name + dim, stride)
    a.out, a.o_b, a.o_h, a.o_t = out.data_ptr(), T * hq * hd, hd, hq * hd
    if mask is not None:
        m = mask.reshape(mask.shape[0], T, -1)
        if m.dtype != torch.bool or m.shape[-1] != start + T or m.shape[0] not in (1, B):
            return None
        if m.stride(-1) != 1:
            m = m.contiguous()
        a.mask, a.m_b, a.m_t = m.data_ptr(), m.stride(0) if m.shape[0] > 1 else 0, m.stride(1)
    check(lib.fs_attention(ctypes.byref(a)), "fs_attention", f"B={B} Hq={hq} T={T} hd={hd} start={start}")
    return out.transpose(1, 2)


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


def table_struct(mod: nn.Module, what: str, keep: list) -> tuple[Linear, torch.dtype]:
    """The kernel's view of an embedding table (``nn.Embedding`` or a ``QuantEmbedding`` tied to
    an int8 / plain int4 head) and the dtype its lookups return."""
    from flexspeed.inference.quant import QuantEmbedding

    if isinstance(mod, QuantEmbedding):
        return linear_struct(mod.source, what, keep), mod._dtype_probe.dtype
    if isinstance(mod, nn.Embedding) and mod.max_norm is None:
        w = mod.weight.detach()
        return Linear(_fmt(w, f"{what}.weight"), w.shape[0], w.shape[1], 0, w.data_ptr(), None, F32, None), w.dtype
    raise Unsupported(f"{what} is a {type(mod).__name__} (the kernel reads nn.Embedding and QuantEmbedding tables)")


def embed_struct(tok: nn.Module, pos: nn.Module | None, offset: int, keep: list) -> tuple[Embed, torch.dtype]:
    """The kernel's token (+ learned position) lookup, and the dtype the model's lookup returns."""
    t, dtype = table_struct(tok, "token embedding", keep)
    p, pdtype = (table_struct(pos, "position embedding", keep) if pos is not None else (Linear(), dtype))
    if dtype not in (torch.float32, torch.bfloat16) or pdtype != dtype:
        raise Unsupported(f"embedding lookups in {dtype} / {pdtype} (the kernel repeats fp32 and bf16 lookups)")
    return Embed(t, p, int(offset), int(dtype == torch.bfloat16)), dtype


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


def _quant_struct(mod, on_cpu: bool) -> tuple[ctypes.CDLL, Linear] | None:
    """(the kernel, the struct of a ``QuantLinear``) when both apply, else ``None``."""
    lib = library()
    if lib is None or not on_cpu:
        return None
    try:
        return lib, linear_struct(mod, "QuantLinear")
    except Unsupported:
        return None


def gather_rows(mod, rows: torch.Tensor) -> torch.Tensor | None:
    """Rows ``rows`` (R,) of a CPU ``QuantLinear``'s weight, dequantized to fp32 (R, K), or ``None``
    without the kernel: the embedding lookup of a quantized tied head, one call per step. An id
    outside the table raises :class:`NativeIndexError` (an ``IndexError``)."""
    found = _quant_struct(mod, rows.device.type == "cpu")
    if found is None:
        return None
    lib, lin = found
    ids = rows.reshape(-1).to(torch.long).contiguous()
    out = torch.empty(ids.numel(), lin.k)
    check(lib.fs_rows(ctypes.byref(lin), ids.data_ptr(), ids.numel(), out.data_ptr()), "fs_rows",
          f"ids in [{int(ids.min()) if ids.numel() else 0}, {int(ids.max()) if ids.numel() else 0}] of a "
          f"{lin.n}-row table")
    return out


def dequant_rows(mod, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor | None:
    """Rows ``r0:r1`` of a CPU ``QuantLinear``'s weight in ``dtype`` (fp32 or bf16), dequantized by
    the kernel on torch's threads (the prompt's path: ~10x the dozen torch ops it replaces), or
    ``None`` without the kernel."""
    found = _quant_struct(mod, mod.qweight.device.type == "cpu" and dtype in (torch.float32, torch.bfloat16))
    if found is None:
        return None
    lib, lin = found
    out = torch.empty(r1 - r0, lin.k, dtype=dtype)
    check(lib.fs_dequant_rows(ctypes.byref(lin), r0, r1, out.data_ptr(), int(dtype == torch.bfloat16),
                              torch.get_num_threads()), "fs_dequant_rows", f"rows {r0}:{r1} of {lin.n}")
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
    found = _quant_struct(mod, x2.device.type == "cpu")
    if found is None:
        return None
    lib, lin = found
    M, K = x2.shape
    x = x2.to(torch.float32).contiguous()
    nt = torch.get_num_threads()
    need = int(lib.fs_scratch_floats(None, 0, ctypes.byref(lin), M, K, 1, nt))
    scratch = getattr(_SCRATCH, "buf", None)
    if scratch is None or scratch.numel() < need:
        scratch = _SCRATCH.buf = torch.empty(need)
    y = torch.empty(M, lin.n)
    step = Step(M, K, 0, 1, nt, 0, None, None, None, scratch.data_ptr())
    check(lib.fs_forward(None, 0, None, ctypes.byref(lin), x.data_ptr(), y.data_ptr(), ctypes.byref(step)),
          "fs_forward", f"({M}, {K}) @ ({lin.n}, {lin.k}).T")
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


def norm_struct(mod: nn.Module, what: str, keep: list[torch.Tensor] | None = None, one_plus: bool = False) -> Norm:
    """The kernel's view of a LayerNorm or RMSNorm. ``one_plus``: Gemma's RMSNorm, which scales by
    ``1 + weight`` in fp32; the kernel reads an fp32 copy of ``1 + weight`` appended to ``keep``
    (``hidden`` floats per norm), so the model's own parameter is read, not changed."""
    w, b = getattr(mod, "weight", None), getattr(mod, "bias", None)
    if one_plus:
        eps = getattr(mod, "eps", None) or getattr(mod, "variance_epsilon", None)
        if w is None or eps is None or keep is None:
            raise Unsupported(f"{what}: a (1 + weight) RMSNorm needs its weight and eps")
        w1 = (1.0 + w.detach().float()).contiguous()
        keep.append(w1)
        return Norm(1, _fmt(w1, f"{what}.weight"), float(eps), w1.data_ptr(), None)
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
