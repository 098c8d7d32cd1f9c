"""The native library's ABI as Python sees it: ctypes mirrors of ``csrc/fs_abi.h``.

The library's whole interface (every export, struct and enum) is declared in ``csrc/fs_abi.h``;
the mirrors below follow it, and :func:`check_abi` (called by
:func:`flexspeed.inference.native.library` when it loads the library) checks the header's
``FS_ABI_VERSION`` and the size of every struct against them (a mismatch raises
:class:`NativeABIError`). A negative return code from the kernel raises :class:`NativeError`
(:class:`NativeOutOfMemory` / :class:`NativeIndexError` for out of memory and an id out of range)
through :func:`check`, instead of quietly running torch's path.
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

__all__ = ["ABI_VERSION", "EXPORTS", "STRUCTS", "Linear", "Norm", "Layer", "Step", "Embed", "Gen", "Attn", "PoolStats", "TP",
           "NativeABIError", "NativeError", "NativeOutOfMemory", "NativeIndexError", "check", "check_abi",
           "declare", "header_exports", "HEADER", "F32", "BF16", "I8", "I4", "RELU", "GELU", "GELU_TANH", "SILU"]

HEADER = Path(__file__).parent / "csrc" / "fs_abi.h"


ABI_VERSION = 6  # FS_ABI_VERSION
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
                ("act", _I), ("gated", _I), ("parallel", _I), ("rot_dim", _I), ("n_heads", _I), ("n_kv", _I),
                ("head_dim", _I), ("scale", ctypes.c_float), ("kc", _P), ("vc", _P), ("kv_fmt", _I), ("n_qkv_parts", _I),
                ("n_up_parts", _I), ("qkv_parts", Linear * 3), ("up_parts", Linear * 2)]


class TP(ctypes.Structure):
    _fields_ = [("seg", _P), ("rank", _I), ("world", _I), ("cap", _L), ("call", _L), ("timeout_s", ctypes.c_double),
                ("vocab", _I)]


class Step(ctypes.Structure):
    _fields_ = [("B", _I), ("C", _I), ("start", _I), ("t_max", _I), ("nthreads", _I), ("valid_stride", _I),
                ("valid", _P), ("cos", _P), ("sin", _P), ("scratch", _P), ("tp", ctypes.POINTER(TP))]


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


STRUCTS = (Linear, Norm, Layer, Step, Embed, Gen, Attn, PoolStats, TP)  # in enum fs_struct_id's order


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
    "fs_adapt_simulate": (ctypes.c_int, [ctypes.c_uint64, ctypes.c_int, _P, _L, ctypes.c_double]),
    "fs_scratch_floats": (_L, [_ptr(Layer), ctypes.c_int, _ptr(Linear), ctypes.c_int, ctypes.c_int, ctypes.c_int,
                               ctypes.c_int]),
    "fs_forward": (ctypes.c_int, [_ptr(Layer), ctypes.c_int, _ptr(Norm), _ptr(Linear), _P, _P, _ptr(Step)]),
    "fs_generate": (ctypes.c_int, [_ptr(Layer), ctypes.c_int, _ptr(Norm), _ptr(Linear), _ptr(Embed), _ptr(Step),
                                   _ptr(Gen)]),
    "fs_attention": (ctypes.c_int, [_ptr(Attn)]),
    "fs_argmax": (None, [_P, _L, _L, _P]),
    "fs_rows": (ctypes.c_int, [_ptr(Linear), _P, _L, _P]),
    "fs_dequant_rows": (ctypes.c_int, [_ptr(Linear), ctypes.c_int, ctypes.c_int, _P, ctypes.c_int, ctypes.c_int]),
    "fs_shm_bytes": (_L, [ctypes.c_int, _L]),
    "fs_shm_allreduce": (ctypes.c_int, [_ptr(TP), _P, _L, _P]),
}


class NativeABIError(RuntimeError):
    """The compiled library and native_abi.py's ctypes mirrors disagree (version or a struct's size)."""


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
                             f"flexspeed/inference/native_abi.py declares; {_ABI_FIX}")
    version = int(lib.fs_abi_version())
    if version != ABI_VERSION:
        raise NativeABIError(f"the native library {_lib_name(lib)} has ABI version {version}, flexspeed/inference/"
                             f"native_abi.py expects {ABI_VERSION}; {_ABI_FIX}")
    wrong = []
    for i, cls in enumerate(STRUCTS):
        size = int(lib.fs_struct_size(i))
        if size != ctypes.sizeof(cls):
            wrong.append(f"{cls.__name__}: C {size} bytes, ctypes {ctypes.sizeof(cls)}")
    if wrong:
        raise NativeABIError(f"the native library {_lib_name(lib)} and its ctypes mirrors in flexspeed/inference/"
                             f"native_abi.py disagree on struct sizes ({'; '.join(wrong)}); {_ABI_FIX}")


_ABI_FIX = ("csrc/fs_abi.h and the mirrors in native_abi.py must change together (bump FS_ABI_VERSION and "
            "ABI_VERSION); "
            "delete stale builds in $FLEXSPEED_CACHE_DIR (default ~/.cache/flexspeed) or set FLEXSPEED_NATIVE=0")


def _lib_name(lib) -> str:
    return getattr(lib, "_name", None) or repr(lib)


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """``lib`` with the return and argument types of every export in ``EXPORTS`` set."""
    for name, (restype, argtypes) in EXPORTS.items():
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.restype, fn.argtypes = restype, argtypes
    return lib


def header_exports() -> list[str]:
    """The function names ``csrc/fs_abi.h`` declares (what ``EXPORTS`` must mirror)."""
    text = re.sub(r"/\*.*?\*/", "", HEADER.read_text(), flags=re.S)
    return re.findall(r"^\s*(?:const\s+)?[A-Za-z_][A-Za-z0-9_]*\s*\**\s*(fs_[a-z0-9_]+)\s*\(", text, flags=re.M)
