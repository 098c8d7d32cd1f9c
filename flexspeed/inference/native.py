"""The native decode step: a C kernel for one new token per row, built on first use.

torch's CPU matrix-vector kernels stream weights at half the machine's memory bandwidth or less
(oneDNN bf16 14.7 GB/s, ``F.linear`` 9.9 GB/s, the int8/int4 kernels 6-8 GB/s, against 33 GB/s
for ``Tensor.sum``, on the 2-core AVX-512 machine of ``benchmarks/generate.py``), and a decode
step dispatches some 15 operators per layer from Python. ``csrc/decode.c`` runs a stack of
pre-norm decoder layers in one call instead: one parallel job, AVX-512 products that read each
weight byte once (fp32, bf16, int8 per-channel, int4 group-wise in the ``plain`` order),
attention over the fp32 KV cache, and the final norm + ``lm_head``.

The library's whole interface (every export, struct and enum) is declared in ``csrc/fs_abi.h``;
its ctypes mirrors live in :mod:`~flexspeed.inference.native_abi` (re-exported here), and
:func:`library` checks the header's ``FS_ABI_VERSION`` and the size of every struct against them
when it loads the library (a mismatch raises :class:`NativeABIError`). A negative return code
from the kernel raises :class:`NativeError` (:class:`NativeOutOfMemory` / :class:`NativeIndexError`
for out of memory and an id out of range) instead of quietly running torch's path.

It is compiled with the system C compiler (``$CC``, else ``gcc`` or ``cc``; ``-O3
-march=native -fopenmp``) into ``$FLEXSPEED_CACHE_DIR`` (default ``~/.cache/flexspeed``), keyed by
the source, the compiler and the CPU, and loaded with ``ctypes`` after torch, so that it shares
torch's OpenMP runtime. With ``FLEXSPEED_NATIVE=0`` :func:`library` is ``None``; without a
compiler, or when the build fails, it is ``None`` after one warning that names the compiler, the
command and the fix, and :func:`status` (shown by ``flexspeed report``) says the same.

:class:`~flexspeed.inference.native_decoder.NativeDecoder` maps a fused runner's modules onto the
kernel's structs (:mod:`~flexspeed.inference.native_structs`); this module holds the build and
the small entry points.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

# the ABI's mirrors and errors, and the module -> struct mapping, re-exported: `native.Step`, `native.check_abi`
from flexspeed.inference.native_abi import (ABI_VERSION, BF16, EXPORTS, F32, STRUCTS, Attn, Embed, Gen, Layer,
                                            Linear, NativeABIError, NativeError, NativeIndexError, NativeOutOfMemory,
                                            Norm, PoolStats, Step, check, check_abi, declare, header_exports)
from flexspeed.inference.native_structs import (Unsupported, embed_struct, linear_struct, norm_struct,
                                                table_struct)

__all__ = ["library", "status", "attention", "quant_matmul", "gather_rows", "dequant_rows", "argmax_rows",
           "pool_stats", "set_adaptive",
           # re-exported from native_abi / native_structs
           "ABI_VERSION", "EXPORTS", "STRUCTS", "Linear", "Norm", "Layer", "Step", "Embed", "Gen", "Attn", "PoolStats",
           "check", "check_abi", "header_exports", "NativeError", "NativeABIError", "NativeOutOfMemory",
           "NativeIndexError", "Unsupported", "linear_struct", "norm_struct", "table_struct", "embed_struct"]

_CSRC = Path(__file__).parent / "csrc"
_SRC = _CSRC / "decode.c"  # includes the csrc/*.h beside it
_FLAGS = ["-O3", "-fopenmp", "-pthread", "-shared", "-fPIC", "-std=gnu11"]


def _flags() -> list[str]:
    # FLEXSPEED_NATIVE_MARCH picks the target (default: this CPU); e.g. x86-64 builds the portable path
    return [f"-march={os.environ.get('FLEXSPEED_NATIVE_MARCH', 'native')}", *_FLAGS]


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
    lib = declare(ctypes.CDLL(str(path)))
    try:
        check_abi(lib)
    except NativeABIError as exc:
        _set_state("abi mismatch", str(exc), compiler=cc, path=str(path))
        raise
    _set_state("ok", f"built with {cc} for {'AVX-512' if lib.fs_fast_path() else 'portable C'}, ABI {ABI_VERSION}",
               compiler=cc, path=str(path))
    return lib


# ---------------------------------------------------------------------------------- entry points


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
