"""Attention pieces shared by the fused runner (``kernels.py``) and the offload runner.

One step of a decoder over a preallocated KV cache needs the same three things whichever runner
drives it: the mask of the new tokens against the cache (:func:`step_context`), rotary position
embeddings (:func:`apply_rope`) and attention of one query per row over a cache buffer: written
for Inductor to fuse in the compiled decode step (:func:`static_attention`), or as two batched
matmuls under a key mask (:func:`decode_attention`: the CUDA-graph step and eager 16-bit decoding
of the offload runner). Prefill and the eager fused step use SDPA; the CPU decode steps the native
kernel (``native.attention``, the native decoder). Four implementations: SDPA and the native
kernel are the fast paths measured in docs/inference.md; the compiled and masked forms exist
because Inductor and CUDA graphs need static shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["StepContext", "step_context", "apply_rope", "static_attention", "decode_attention", "decode_valid",
           "window_keys"]


@dataclass
class StepContext:
    """What every layer of one forward step shares (built once per step by a runner)."""

    start: int
    """Cache position of the first new token."""
    mask: torch.Tensor | None = None
    """Boolean ``(B, 1, T, start + T)``, True where a query may attend; ``None`` with ``is_causal`` or T == 1."""
    is_causal: bool = False
    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    """Rotary ``(cos, sin)``, each ``(B, T, head_dim)`` (Llama); ``None`` otherwise."""


def step_context(T: int, start: int, key_mask: torch.Tensor | None, device: torch.device,
                 rope: tuple[torch.Tensor, torch.Tensor] | None = None, window: int | None = None) -> StepContext:
    """The mask of ``T`` new tokens written at cache positions ``start:start+T``.

    Args:
        key_mask: ``(B, >= start+T)`` bool, False at left padding; ``None`` when no row is padded.
        window: sliding attention window (a query at cache column ``i`` attends columns
            ``> i - window``, as HF's Mistral/Qwen2 masks), ``None``: full causal attention.
    Returns:
        No mask when SDPA's own causal flag (prefill from 0) or nothing at all (one new token)
        is exact; else a boolean ``(B or 1, 1, T, start+T)`` mask: causal within the new tokens,
        everything cached before them, never a padded key.
    """
    end = start + T
    if window is not None and end <= window:
        window = None  # no query reaches past its window yet
    if key_mask is None and window is None and (start == 0 or T == 1):
        return StepContext(start, None, T > 1, rope)
    causal = torch.ones(T, end, dtype=torch.bool, device=device).tril(diagonal=start)  # (T, end)
    if window is not None:
        causal &= ~torch.ones(T, end, dtype=torch.bool, device=device).tril(diagonal=start - window)
    mask = causal[None, None] if key_mask is None else causal[None, None] & key_mask[:, None, None, :end]
    return StepContext(start, mask, False, rope)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding in the rotate-half convention (HF Llama): ``x * cos + rotate_half(x) * sin``."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


def static_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """One query per row over the whole static cache, masked; written for Inductor to fuse.

    Args:
        q: (B, Hq, 1, hd); k, v: (B, Hkv, T_max, hd); valid: (B, T_max) bool.
    Returns:
        (B, Hq, 1, hd) in q's dtype (fp32 accumulation).
    """
    B, hq, _, hd = q.shape
    hkv = k.shape[1]
    qf = q.float().view(B, hkv, hq // hkv, 1, hd)  # (B, Hkv, G, 1, hd)
    s = (qf * k.float()[:, :, None]).sum(-1) * scale  # (B, Hkv, G, T_max)
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    y = (s.softmax(-1)[..., None] * v.float()[:, :, None]).sum(-2)  # (B, Hkv, G, hd)
    return y.view(B, hq, 1, hd).to(q.dtype)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor,
                     scale: float) -> torch.Tensor:
    """One query per row over the whole ``(B, Hkv, T_max, hd)`` cache, keys chosen by a tensor mask.

    ``softmax(q k^T) v`` as two batched matmuls with the query heads of a group stacked, softmax in
    fp32. The whole contiguous cache buffer is read in place, where a ``[:end]`` slice is not
    contiguous and a 16-bit CPU matmul first copies it (4x slower at batch 32 with OPT-1.3B's
    heads); every shape is static and nothing is read on the host, so a CUDA graph replays it for
    every step of a generation. The unwritten tail must be finite (buffers start zeroed). The eager
    decode step of the fused runner's CUDA graphs and the offload runner's torch path share it
    (:func:`decode_valid` builds ``valid`` from an end position).

    Args:
        q: (B, Hq, 1, hd); valid: (B or 1, T_max) bool, keys that may be attended.
    Returns:
        (B, Hq, 1, hd) in q's dtype.
    """
    B, hq, _, hd = q.shape
    hkv = k.shape[1]
    qk = q.to(k.dtype).reshape(B, hkv, hq // hkv, hd)  # (B, Hkv, G, hd): the query heads of a group stacked
    s = torch.matmul(qk, k.transpose(-1, -2)).float() * scale  # (B, Hkv, G, T_max)
    s = s.masked_fill(~valid.view(valid.shape[0], 1, 1, -1), float("-inf"))
    y = torch.matmul(s.softmax(-1).to(v.dtype), v)  # (B, Hkv, G, hd)
    return y.reshape(B, hq, 1, hd).to(q.dtype)


def window_keys(index: torch.Tensor | int, t_max: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """(1, T_max) bool: the columns a query at cache column ``index`` may attend under a sliding
    ``window`` (those ``> index - window``), or ``None`` without a window."""
    if window is None:
        return None
    return (torch.arange(t_max, device=device) > index - window)[None]


def decode_valid(t_max: int, end: int, mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The keys a decode step may attend: positions ``< end``, and where ``mask`` (B, ..., end) is True.

    Returns:
        (B, T_max) bool, or (1, T_max) without ``mask``.
    """
    valid = (torch.arange(t_max, device=device) < end)[None]  # (1, T_max)
    if mask is None:
        return valid
    rows = mask.reshape(mask.shape[0], -1)  # (B, end)
    valid = valid.expand(rows.shape[0], t_max).clone()
    valid[:, :end] &= rows
    return valid
