"""Module -> struct: the native kernel's view of a model's projections, norms and tables.

Each function reads one module (``nn.Linear``, HF ``Conv1D``, ``QuantLinear``, a ``ConcatLinear``
of parts, LayerNorm / RMSNorm, ``nn.Embedding`` / ``QuantEmbedding``) into the ctypes structs of
:mod:`flexspeed.inference.native_abi`, or raises :class:`Unsupported` naming the module and why;
the structs point into the module's own tensors (and into copies appended to ``keep``, which must
outlive them). :class:`~flexspeed.inference.native_decoder.NativeDecoder` builds its layers from
these.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from flexspeed.inference.native_abi import (BF16, F32, GELU, GELU_TANH, I4, I8, RELU, SILU, Embed, Linear,
                                            Norm)

__all__ = ["Unsupported", "linear_struct", "table_struct", "embed_struct", "parts_struct", "norm_struct",
           "activation_code"]


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


def parts_struct(mod: nn.Module, what: str, keep: list, slots) -> tuple[Linear, int]:
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


def activation_code(act) -> int:
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
