"""Weight-only quantization of Linear layers: int8 per output channel, int4 group-wise.

``quantize_linears(model, num_bits=8 | 4, group_size=64)`` replaces every ``nn.Linear`` (and HF
``Conv1D``) in place by a :class:`QuantLinear` that stores low-bit weights and never keeps a
full-precision copy:

- **int8**: symmetric, one fp32 scale per output channel, ``w ~= q * scale`` with
  ``q in [-127, 127]``; 1 byte per weight (about 4x smaller than fp32).
- **int4**: asymmetric per group of ``group_size`` input features (64 by default, as
  FlexLLMGen): ``w ~= q * scale + min`` with ``q in [0, 15]``, two values per byte, scale and
  offset in bf16; 0.5625 bytes per weight at group 64 (about 7x smaller than fp32).

Matmul paths (``QuantLinear.forward``), chosen per call by the number of rows ``M`` of the input:

- few rows (decode, ``M <= kernel_max_rows``) on CPU: PyTorch's low-bit CPU kernels
  ``torch._weight_int8pack_mm`` and ``aten._weight_int4pack_mm_for_cpu``, which read the packed
  weights directly. They are fast in bf16 only (10-30x slower in fp32 on torch 2.13), so other
  activations are rounded to bf16 for the product; the weight quantization error dominates.
- many rows (prefill), other devices, or shapes the kernels reject: the weight is dequantized
  one chunk of output rows at a time (about 1 MB) into the activation dtype and multiplied with
  the dense GEMM, which is compute-bound there anyway.

The int4 CPU kernel wants the bytes in a blocked, CPU-capability-specific order. When that
order is recognised (checked once per process by a round trip), the weights are kept in it and
unpacked on the fly for the dequantizing path; otherwise the plain order (low nibble = even
input feature) is kept and only the dequantizing path is used. ``state_dict`` always holds
the plain order, so checkpoints move between machines.

A Linear whose weight is tied to an ``nn.Embedding`` (GPT-2's and OPT's ``lm_head``) is
quantized once and the embedding is replaced by a :class:`QuantEmbedding` reading the same
low-bit storage, so the tie survives and no full-precision copy remains.
"""

from __future__ import annotations

import fnmatch
import functools
from collections.abc import Iterable

import torch
import torch.nn as nn

from flexspeed.config.errors import ConfigError

__all__ = ["QuantLinear", "QuantEmbedding", "quantize_linears", "int4_kernel_layout", "pack_plain", "unpack_plain"]

_BITS_KEY = "quant.weight.num_bits"
_GROUP_KEY = "quant.weight.group_size"
_CHUNK_ELEMS = 1 << 20  # weights dequantized per chunk (4 MB in fp32): few, large elementwise ops
_KERNEL_GROUPS = (32, 64, 128, 256)  # group sizes aten's int4 CPU kernel accepts
_NATIVE_ROWS = 16  # up to this many rows, "auto" uses flexspeed's native products (flexspeed.inference.native)


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


def _is_linear_like(module: nn.Module) -> bool:
    """``nn.Linear``, HF ``Conv1D`` or a kernel-injected ``PackedLinear``."""
    return isinstance(module, nn.Linear) or _is_conv1d(module) or type(module).__name__ == "PackedLinear"


def _dense_weight(module: nn.Module) -> torch.Tensor:
    """The ``(out, in)`` weight of a Linear-like layer (HF ``Conv1D`` stores ``(in, out)``)."""
    return module.weight.detach().t() if _is_conv1d(module) else module.weight.detach()


# --------------------------------------------------------------------------- int4 byte orders

def unpack_plain(packed: torch.Tensor) -> torch.Tensor:
    """``(N, K/2)`` bytes, low nibble = even column -> ``(N, K)`` values 0..15."""
    n = packed.shape[0]
    return torch.stack([packed & 15, packed >> 4], dim=-1).view(n, -1)


def pack_plain(q: torch.Tensor) -> torch.Tensor:
    """``(N, K)`` values 0..15 -> ``(N, K/2)`` bytes, low nibble = even column."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def _unpack_blocked(packed: torch.Tensor, n_rows: int, k: int, r0: int, r1: int, kind: str,
                    block: int) -> torch.Tensor:
    """Rows ``r0:r1`` of a weight packed by aten's int4 CPU packer -> ``(r1 - r0, K)`` values.

    The packer stores blocks of ``block`` output rows one after another; inside a full block,
    for every input feature, ``block/2`` bytes: ``"lanes"`` (AVX2/AVX-512 builds) pairs row ``d``
    with row ``d + block/2``, ``"pairs"`` (scalar builds, and every partial last block) pairs
    rows ``2d`` and ``2d + 1``. ``r0`` must start a block; ``r0:r1`` must not straddle the
    last, partial block.
    """
    flat = packed.view(-1)
    full_end = (n_rows // block) * block
    if r0 >= full_end:  # the partial last block: always pairs of adjacent rows
        t = n_rows - full_end
        by = flat[full_end * k // 2:].view(k, t // 2)
        return torch.stack([by & 15, by >> 4], dim=-1).view(k, t).t()[r0 - full_end:r1 - full_end]
    nb = (r1 - r0) // block
    by = flat[r0 * k // 2:r1 * k // 2].view(nb, k, block // 2)
    lo, hi = by & 15, by >> 4
    vals = torch.cat([lo, hi], -1) if kind == "lanes" else torch.stack([lo, hi], -1).view(nb, k, block)
    return vals.transpose(1, 2).reshape(nb * block, k)  # (rows, K)


def _gather_blocked(packed: torch.Tensor, n_rows: int, k: int, rows: torch.Tensor, kind: str,
                    block: int) -> torch.Tensor:
    """Arbitrary ``rows`` (R,) of a blocked int4 weight -> ``(R, K)`` values (embedding lookups)."""
    flat = packed.view(-1)
    cols = torch.arange(k, device=rows.device)
    full_end = (n_rows // block) * block
    half = block // 2
    r = (rows % block)[:, None]
    base = (rows // block * (block * k // 2))[:, None]
    if kind == "lanes":
        byte, shift = base + cols * half + r % half, 4 * (r // half)
    else:
        byte, shift = base + cols * half + r // 2, 4 * (r % 2)
    t = max(n_rows - full_end, 2)
    j = (rows - full_end)[:, None]
    tail_byte, tail_shift = full_end * k // 2 + cols * (t // 2) + j // 2, 4 * (j % 2)
    in_tail = (rows >= full_end)[:, None]
    byte = torch.where(in_tail, tail_byte, byte)
    shift = torch.where(in_tail, tail_shift, shift)
    return (flat[byte] >> shift.to(torch.uint8)) & 15


def _gather_plain(packed: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    return unpack_plain(packed[rows])


@functools.cache
def int4_kernel_layout() -> tuple[str, int] | None:
    """The byte order of ``aten._convert_weight_to_int4pack_for_cpu`` on this machine, or ``None``.

    Found by packing a random matrix and unpacking it with each known order; the matmul kernel is
    checked against the dequantized product too. ``None`` (op missing or order unknown) means
    int4 weights stay in the plain order and use the dequantizing path.
    """
    ops = torch.ops.aten
    if not (hasattr(ops, "_convert_weight_to_int4pack_for_cpu") and hasattr(ops, "_weight_int4pack_mm_for_cpu")):
        return None
    gen = torch.Generator().manual_seed(0)
    n, k, g = 80, 128, 64  # one or more full blocks plus a partial one, for every known block size
    q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
    try:
        packed = ops._convert_weight_to_int4pack_for_cpu(q, 1)
    except RuntimeError:
        return None
    for kind, block in (("lanes", 64), ("lanes", 32), ("pairs", 32), ("pairs", 64)):
        try:
            parts = [_unpack_blocked(packed, n, k, r0, min(r0 + block, n), kind, block)
                     for r0 in range(0, n, block)]
        except RuntimeError:
            continue
        if not torch.equal(torch.cat(parts).to(torch.int32), q):
            continue
        scale = torch.rand(k // g, n, generator=gen) + 0.5  # check the kernel's (q - 8) * s + z
        zero = torch.randn(k // g, n, generator=gen)
        sz = torch.stack([scale, zero], -1).to(torch.bfloat16)
        x = torch.randn(3, k, generator=gen).to(torch.bfloat16)
        w = (q.view(n, k // g, g).float() - 8) * sz[..., 0].t().float()[..., None] + sz[..., 1].t().float()[..., None]
        ref = x.float() @ w.view(n, k).t()
        got = ops._weight_int4pack_mm_for_cpu(x, packed, g, sz).float()
        if torch.allclose(got, ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item()):
            return kind, block
    return None


# --------------------------------------------------------------------------- modules

class QuantLinear(nn.Module):
    """A Linear layer with int8 or int4 weights (see the module docstring for the formats).

    Buffers: ``qweight`` (int8 ``(N, K)``, or uint8 ``(N, K/2)`` for int4), ``qparams`` (the fp32
    per-channel scales for int8, or bf16 ``(K/group, N, [scale, zero])`` for int4, stored as
    raw bits in an integer buffer so that ``model.to(dtype)`` leaves them alone), and ``bias``
    (in the model dtype). int4 dequantizes as ``(q - 8) * scale + zero``, i.e. ``q * scale +
    min`` with ``min = zero - 8 * scale``.

    Attributes:
        kernel: ``"auto"`` (flexspeed's native products for up to 16 rows where they are built,
            else aten's low-bit CPU kernel for up to ``kernel_max_rows`` rows, the dequantizing
            path otherwise), ``"kernel"`` (aten's) or ``"dequant"`` to force one path.
        kernel_max_rows: largest row count sent to the low-bit kernel under ``"auto"``.
    """

    def __init__(self, in_features: int, out_features: int, num_bits: int = 8, group_size: int = 64,
                 bias: bool = True, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 layout: str = "plain", block: int = 0) -> None:
        super().__init__()
        _check_args(num_bits, group_size, in_features, "QuantLinear")
        self.in_features, self.out_features = in_features, out_features
        self.num_bits, self.group_size = num_bits, group_size if num_bits == 4 else in_features
        self.layout, self.block = layout, block
        # the int4 CPU kernel needs a multiple of 16 output rows: pad with zero rows (GPT-2's vocab)
        self.rows = out_features if layout == "plain" else -(-out_features // 16) * 16
        self.kernel = "auto"
        # crossovers measured on OPT-125M shapes (bf16, torch 2.13 CPU): above them dequantizing
        # into a dense GEMM wins, as the kernels are GEMV-shaped
        # (3072x768, one thread: int8 kernel 1.0 ms at 16 rows vs 1.3 dequantizing, 3.6 vs 2.5 at 48;
        # int4 7.2 vs 7.7 at 128 rows, 10.8 vs 9.2 at 192)
        self.kernel_max_rows = 32 if num_bits == 8 else 128
        if num_bits == 8:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("qparams", torch.zeros(out_features, dtype=torch.int32, device=device))
            # the scales in bf16 for the CPU kernel, kept ready (as bits) so no cast runs per call
            self.register_buffer("kernel_scales", torch.zeros(out_features, dtype=torch.int16, device=device),
                                 persistent=False)
        else:
            self.register_buffer("qweight", torch.zeros(self.rows, in_features // 2, dtype=torch.uint8, device=device))
            self.register_buffer("qparams", torch.zeros(in_features // group_size, self.rows, 2,
                                                        dtype=torch.int16, device=device))
        self.register_buffer("bias", torch.zeros(out_features, dtype=dtype, device=device) if bias else None)

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_linear(cls, linear: nn.Module, num_bits: int = 8, group_size: int = 64,
                    int4_layout: str = "auto") -> QuantLinear:
        """Quantize an ``nn.Linear`` or HF ``Conv1D`` (its weight is left untouched).

        Args:
            linear: the layer; its weight dtype becomes the dtype of the bias.
            num_bits: 8 or 4.
            group_size: input features per int4 group (must divide ``in_features``); ignored
                for int8, which uses one scale per output channel.
            int4_layout: ``"auto"`` (aten's blocked order where its CPU kernel exists) or
                ``"plain"`` (two values per byte in column order: what flexspeed's native decode
                kernel and the offload store read).
        """
        w = _dense_weight(linear)  # (N, K)
        n, k = w.shape
        layout, block = "plain", 0
        if int4_layout not in ("auto", "plain"):
            raise ValueError(f"int4_layout={int4_layout!r}: use 'auto' or 'plain'")
        if num_bits == 4 and int4_layout == "auto" and w.device.type == "cpu" and group_size in _KERNEL_GROUPS:
            found = int4_kernel_layout()
            if found is not None:
                layout, block = found
        b = getattr(linear, "bias", None)
        q = cls(k, n, num_bits, group_size, bias=b is not None, dtype=w.dtype, device=w.device,
                layout=layout, block=block)
        if b is not None:
            q.bias.copy_(b.detach())
        q._quantize_from(w)
        return q

    @torch.no_grad()
    def _quantize_from(self, w: torch.Tensor) -> None:
        rows = max(64, (1 << 22) // max(1, self.in_features) // 64 * 64)  # bound the fp32 temporaries
        if self.rows > w.shape[0]:
            w = torch.cat([w, w.new_zeros(self.rows - w.shape[0], w.shape[1])])  # quantizes to exact zeros
        for r0 in range(0, self.rows, rows):
            r1 = min(r0 + rows, self.rows)
            chunk = w[r0:r1].float()  # (n, K)
            if self.num_bits == 8:
                scale = chunk.abs().amax(dim=1) / 127
                scale = torch.where(scale > 0, scale, torch.ones_like(scale))
                self.qweight[r0:r1] = torch.round(chunk / scale[:, None]).clamp_(-127, 127).to(torch.int8)
                self.qparams[r0:r1] = scale.view(torch.int32)
                self.kernel_scales[r0:r1] = scale.to(torch.bfloat16).view(torch.int16)
                continue
            n, g = r1 - r0, self.group_size
            grouped = chunk.view(n, -1, g)  # (n, K/g, g)
            lo, hi = grouped.amin(-1), grouped.amax(-1)
            scale = ((hi - lo) / 15).to(torch.bfloat16).float()
            scale = torch.where(scale > 0, scale, torch.ones_like(scale))
            zero = (lo + 8 * scale).to(torch.bfloat16).float()  # stored rounded: quantize against it
            q = torch.round((grouped - zero[..., None]) / scale[..., None] + 8).clamp_(0, 15).view(n, -1)
            sz = torch.stack([scale, zero], -1).to(torch.bfloat16).transpose(0, 1)  # (K/g, n, 2)
            self.qparams[:, r0:r1] = sz.view(torch.int16)
            if self.layout == "plain":
                self.qweight[r0:r1] = pack_plain(q)
            else:  # chunks start on a block, so the packer's blocks line up with the whole matrix's
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
                self.qweight[r0:r1] = packed.view(n, -1)

    # ---------------------------------------------------------------- inspection

    @property
    def scales(self) -> torch.Tensor:
        """int8: fp32 ``(N,)``; int4: bf16 ``(K/group, N, 2)`` holding ``[scale, zero]``."""
        return self.qparams.view(torch.float32 if self.num_bits == 8 else torch.bfloat16)

    def weight_bytes(self) -> int:
        """Bytes of the quantized weight and its scales (the bias is not counted)."""
        return self.qweight.numel() * self.qweight.element_size() + self.qparams.numel() * self.qparams.element_size()

    def extra_repr(self) -> str:
        fmt = "int8 per-channel" if self.num_bits == 8 else f"int4 group={self.group_size} layout={self.layout}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{fmt}, weight_bytes={self.weight_bytes()}")

    def _row_chunks(self) -> list[tuple[int, int]]:
        """Output-row ranges for the dequantizing path (aligned to the packer's blocks)."""
        align = self.block or 1
        step = max(align, _CHUNK_ELEMS // self.in_features // align * align)
        end = (self.rows // align) * align
        chunks = [(r, min(r + step, end)) for r in range(0, end, step)]
        return chunks + ([(end, self.rows)] if end < self.rows else [])

    def _values(self, r0: int, r1: int) -> torch.Tensor:
        """int4 values 0..15 of output rows ``r0:r1``, ``(r1 - r0, K)`` uint8."""
        if self.layout == "plain":
            return unpack_plain(self.qweight[r0:r1])
        return _unpack_blocked(self.qweight, self.rows, self.in_features, r0, r1, self.layout, self.block)

    def _dequant(self, vals: torch.Tensor, rows: slice | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Low-bit values of some rows -> weights ``(R, K)`` in ``dtype``."""
        if self.num_bits == 8:
            return vals.to(dtype) * self.scales[rows].to(dtype)[:, None]
        sz = self.scales[:, rows].transpose(0, 1).to(dtype)  # (R, K/g, 2)
        grouped = vals.view(vals.shape[0], -1, self.group_size).to(dtype) - 8
        return (grouped * sz[..., :1] + sz[..., 1:]).view(vals.shape[0], self.in_features)

    def dequantize_rows(self, r0: int, r1: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Weights of output rows ``r0:r1`` (``r0`` on a chunk boundary for blocked int4)."""
        if self.qweight.device.type == "cpu" and r1 <= self.out_features:
            from flexspeed.inference.native import dequant_rows

            fast = dequant_rows(self, r0, r1, dtype)  # flexspeed's native dequantization, where built
            if fast is not None:
                return fast
        vals = self.qweight[r0:r1] if self.num_bits == 8 else self._values(r0, r1)
        return self._dequant(vals, slice(r0, r1), dtype)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole ``(N, K)`` weight (for tests and inspection; allocates it)."""
        return torch.cat([self.dequantize_rows(r0, r1, dtype) for r0, r1 in self._row_chunks()])[:self.out_features]

    def gather_rows(self, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Weights of arbitrary output rows ``(R,)`` -> ``(R, K)`` (embedding lookups)."""
        if rows.device.type == "cpu" and rows.numel() <= _NATIVE_ROWS:
            from flexspeed.inference.native import gather_rows

            fast = gather_rows(self, rows)  # one call instead of a dozen small torch ops
            if fast is not None:
                return fast.to(dtype)
        if self.num_bits == 8:
            vals = self.qweight[rows]
        elif self.layout == "plain":
            vals = _gather_plain(self.qweight, rows)
        else:
            vals = _gather_blocked(self.qweight, self.rows, self.in_features, rows, self.layout, self.block)
        return self._dequant(vals, rows, dtype)

    # ---------------------------------------------------------------- compute

    def _use_kernel(self, x2: torch.Tensor) -> bool:
        if self.kernel == "dequant" or x2.device.type != "cpu" or (self.num_bits == 4 and self.layout == "plain"):
            return False
        return self.kernel == "kernel" or x2.shape[0] <= self.kernel_max_rows

    def _kernel_mm(self, x2: torch.Tensor) -> torch.Tensor:
        xb = x2.to(torch.bfloat16).contiguous()  # (M, K); the CPU kernels are fast in bf16 only
        if self.num_bits == 8:
            y = torch._weight_int8pack_mm(xb, self.qweight, self.kernel_scales.view(torch.bfloat16))
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.qweight, self.group_size, self.scales)
        return y.to(x2.dtype)  # (M, N)

    def _dequant_mm(self, x2: torch.Tensor) -> torch.Tensor:
        out = torch.empty(x2.shape[0], self.rows, dtype=x2.dtype, device=x2.device)  # (M, N padded)
        for r0, r1 in self._row_chunks():
            out[:, r0:r1] = x2 @ self.dequantize_rows(r0, r1, x2.dtype).t()
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        if self.kernel == "auto" and x2.device.type == "cpu" and x2.shape[0] <= _NATIVE_ROWS:
            from flexspeed.inference.native import quant_matmul

            y = quant_matmul(self, x2)  # flexspeed's native products (bias included), where built
            if y is not None:
                return y.to(x.dtype).view(*x.shape[:-1], self.out_features)
        y = self._kernel_mm(x2) if self._use_kernel(x2) else self._dequant_mm(x2)
        if self.rows != self.out_features:
            y = y[:, :self.out_features]  # drop the padding rows
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*x.shape[:-1], self.out_features)

    # ---------------------------------------------------------------- portable checkpoints

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.num_bits == 4 and self.layout != "plain":  # save the machine-independent order, unpadded
            vals = torch.cat([self._values(r0, r1) for r0, r1 in self._row_chunks()])[:self.out_features]
            destination[prefix + "qweight"] = pack_plain(vals)
            destination[prefix + "qparams"] = self.qparams[:, :self.out_features].clone()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        keys = (prefix + "qweight", prefix + "qparams")
        blocked = self.num_bits == 4 and self.layout != "plain" and all(k in state_dict for k in keys)
        own = {k: v for k, v in state_dict.items() if k not in keys} if blocked else state_dict
        super()._load_from_state_dict(own, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if blocked:  # plain order, unpadded -> this machine's kernel order, padded
            for k in keys:
                if k in missing_keys:
                    missing_keys.remove(k)
            vals = unpack_plain(state_dict[keys[0]]).to(torch.int32)  # (N, K)
            n = vals.shape[0]
            if n < self.rows:
                vals = torch.cat([vals, vals.new_zeros(self.rows - n, vals.shape[1])])
            self.qweight.copy_(torch.ops.aten._convert_weight_to_int4pack_for_cpu(vals.contiguous(), 1))
            self.qparams.zero_()
            self.qparams[:, :n] = state_dict[keys[1]]
        if self.num_bits == 8:
            self.kernel_scales.copy_(self.scales.to(torch.bfloat16).view(torch.int16))


class QuantEmbedding(nn.Module):
    """An embedding that reads its rows from a tied :class:`QuantLinear` (``lm_head``).

    Output dtype follows the module's floating dtype (``model.to(dtype)`` updates it).
    """

    def __init__(self, source: QuantLinear, dtype: torch.dtype, padding_idx: int | None = None) -> None:
        super().__init__()
        self.source = source
        self.padding_idx = padding_idx
        self.register_buffer("_dtype_probe", torch.empty(0, dtype=dtype), persistent=False)

    @property
    def num_embeddings(self) -> int:
        return self.source.out_features

    @property
    def embedding_dim(self) -> int:
        return self.source.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.source.gather_rows(ids.reshape(-1), self._dtype_probe.dtype)  # (B*T, C)
        return rows.view(*ids.shape, self.embedding_dim)  # (B, T, C)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, tied to a QuantLinear"


# --------------------------------------------------------------------------- model pass

def _check_args(num_bits: int, group_size: int, in_features: int | None, where: str) -> None:
    if num_bits not in (4, 8):
        raise ConfigError(f"num_bits={num_bits!r} is not supported; use 8 (int8, one scale per output channel) "
                          "or 4 (int4, group-wise scale and offset)", key=_BITS_KEY)
    if num_bits == 8:
        return
    if not isinstance(group_size, int) or group_size < 2 or group_size % 2:
        raise ConfigError(f"group_size={group_size!r} must be an even integer >= 2 (64 is the usual choice)",
                          key=_GROUP_KEY)
    if in_features is not None and in_features % group_size:
        divisors = [g for g in (256, 128, 64, 32, 16) if in_features % g == 0]
        hint = f"e.g. group_size={divisors[0]}" if divisors else "or exclude this layer"
        raise ConfigError(f"group_size={group_size} does not divide in_features={in_features} of {where}; "
                          f"choose a group size that divides it ({hint})", key=_GROUP_KEY)


def quantize_linears(module: nn.Module, num_bits: int, group_size: int = 64, *,
                     exclude: Iterable[str] = (), tied_embeddings: bool = True, int4_layout: str = "auto") -> nn.Module:
    """Replace the Linear layers (``nn.Linear``, HF ``Conv1D``, ``PackedLinear``) by :class:`QuantLinear`, in place.

    Args:
        module: the model (already in its compute dtype; kernel-injected or not).
        num_bits: 8 or 4.
        group_size: input features per int4 group; must divide every quantized layer's input.
        exclude: glob patterns of qualified module names to leave alone (``"lm_head"``,
            ``"*.mlp.*"``).
        tied_embeddings: quantize a Linear whose weight is an embedding's, and make the embedding
            read the quantized rows (``False``: leave such Linears, usually ``lm_head``, alone).
        int4_layout: see :meth:`QuantLinear.from_linear`.
    Returns:
        ``module`` (a bare Linear passed as ``module`` is returned as a new :class:`QuantLinear`).
    Raises:
        ConfigError: unsupported ``num_bits``/``group_size``, naming the key and the fix.
    """
    _check_args(num_bits, group_size, None, "the model")
    if _is_linear_like(module):
        return QuantLinear.from_linear(module, num_bits, group_size, int4_layout)
    patterns = list(exclude)
    embeddings = {id(m.weight): (n, m) for n, m in module.named_modules() if isinstance(m, nn.Embedding)}
    done: dict[int, QuantLinear] = {}
    sites = [(n, m) for n, m in module.named_modules(remove_duplicate=False) if _is_linear_like(m)]
    for name, lin in sites:
        if any(fnmatch.fnmatchcase(name, p) for p in patterns):
            continue
        tied = embeddings.get(id(lin.weight)) if not hasattr(lin, "tied_embedding") else _untied(module, lin)
        if tied is not None and not tied_embeddings:
            continue
        if id(lin) not in done:
            if num_bits == 4:
                _check_args(num_bits, group_size, _dense_weight(lin).shape[1], repr(name))
            done[id(lin)] = QuantLinear.from_linear(lin, num_bits, group_size, int4_layout)
        q = done[id(lin)]
        _set_submodule(module, name, q)
        if tied is not None:
            emb_name, emb = tied
            _set_submodule(module, emb_name, QuantEmbedding(q, emb.weight.dtype, emb.padding_idx))
    return module


def _untied(root: nn.Module, packed: nn.Module) -> tuple[str, nn.Module] | None:
    """The embedding a kernel-injected ``PackedLinear`` head was tied to, if it is still there."""
    name = packed.tied_embedding
    if name is None:
        return None
    try:
        emb = root.get_submodule(name)
    except AttributeError:
        return None
    return (name, emb) if isinstance(emb, nn.Embedding) else None


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)
