"""``native.attention`` (csrc/fs_attention.h) against torch's SDPA in float64, and its use by the offload runner.

Tolerances: fp32 inputs 1e-5 absolute (outputs are averages of unit-normal values; only the
summation order differs); bf16 inputs 2e-2 against the fp32 math on the same bf16 values (the
output is rounded to bf16: half an ulp near 1 is 4e-3). Cases cover both of the kernel's paths
(prompt-sized work converts a pair's keys once; decode-sized reads the cache rows), head sizes
on the AVX-512 path (64, 128) and off it (24, 48), GQA, a start offset, a padding mask, strided
views, and the portable (non-AVX-512) build.
"""

from __future__ import annotations

import os
import platform

import pytest
import torch
import torch.nn.functional as F

from flexspeed.inference import native

pytestmark = pytest.mark.skipif(native.library() is None, reason="no C compiler: the native kernel is not built")

# (B, Hq, Hkv, T, start, hd): prompts from 0, prompts after a cached prefix, single decode steps
CASES = [(2, 4, 4, 9, 0, 64), (3, 8, 2, 17, 0, 128), (2, 4, 2, 5, 11, 64), (1, 6, 3, 1, 40, 64),
         (4, 4, 4, 1, 7, 128), (2, 4, 2, 13, 3, 48), (2, 2, 1, 1, 9, 24), (1, 4, 4, 3, 0, 64)]


def make(B, hq, hkv, T, start, hd, dtype, seed=0):
    """q as a transposed view of (B, T, Hq, hd); k, v as prefixes of larger cache buffers."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, hq, hd, generator=g).to(dtype).transpose(1, 2)
    t_max = start + T + 6
    k = torch.randn(B, hkv, t_max, hd, generator=g).to(dtype)
    v = torch.randn(B, hkv, t_max, hd, generator=g).to(dtype)
    return q, k, v


def reference(q, k, v, start, mask, causal, scale):
    T, S = q.shape[2], start + q.shape[2]
    allowed = torch.ones(q.shape[0], 1, T, S, dtype=torch.bool)
    if causal:
        allowed &= torch.ones(T, S, dtype=torch.bool).tril(diagonal=start)
    if mask is not None:
        allowed &= mask
    out = F.scaled_dot_product_attention(q.double(), k[:, :, :S].double(), v[:, :, :S].double(), attn_mask=allowed,
                                         scale=scale, enable_gqa=True)
    return out.nan_to_num(0.0)  # no key to attend to: torch gives NaN, the kernel zeros


def padding_mask(B, T, start, seed=1):
    S = start + T
    g = torch.Generator().manual_seed(seed)
    pad = torch.randint(0, max(1, S // 3), (B,), generator=g)
    keys = torch.arange(S)[None, :] >= pad[:, None]  # left padding: (B, S)
    causal = torch.ones(T, S, dtype=torch.bool).tril(diagonal=start)
    return causal[None, None] & keys[:, None, None, :]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_matches_sdpa_fp32(case, masked) -> None:
    B, hq, hkv, T, start, hd = case
    q, k, v = make(*case, torch.float32)
    mask = padding_mask(B, T, start) if masked else None
    causal = not masked
    out = native.attention(q, k, v, start, mask, causal, hd ** -0.5)
    assert out is not None and out.shape == (B, hq, T, hd) and out.dtype == torch.float32
    assert (out.double() - reference(q, k, v, start, mask, causal, hd ** -0.5)).abs().max() < 1e-5


@pytest.mark.parametrize("case", CASES[:5])
def test_matches_fp32_math_bf16(case) -> None:
    B, hq, hkv, T, start, hd = case
    q, k, v = make(*case, torch.bfloat16)
    out = native.attention(q, k, v, start, None, True, 0.3)
    assert out.dtype == torch.bfloat16
    assert (out.double() - reference(q, k, v, start, None, True, 0.3)).abs().max() < 2e-2


def test_query_with_no_key_gets_zeros_and_output_layout() -> None:
    q, k, v = make(2, 4, 4, 5, 0, 64, torch.float32)
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    mask[1, :, 2] = False  # row 1, query 2: every key barred
    out = native.attention(q, k, v, 0, mask, False, 0.125)
    assert torch.equal(out[1, :, 2], torch.zeros(4, 64))
    assert out[0].abs().sum() > 0
    assert out.transpose(1, 2).is_contiguous()  # (B, T, Hq, hd) underneath: the projection's reshape is free


def test_declines_what_it_cannot_run() -> None:
    q, k, v = make(1, 2, 2, 3, 0, 64, torch.float32)
    assert native.attention(q.half(), k.half(), v.half(), 0, None, True, 1.0) is None  # fp16
    assert native.attention(q, k.transpose(-1, -2), v, 0, None, True, 1.0) is None  # strided head dimension
    assert native.attention(q, k[:, :, :2], v, 0, None, True, 1.0) is None  # cache shorter than start + T
    assert native.attention(q, k.bfloat16(), v, 0, None, True, 1.0) is None  # mixed dtypes


def test_offload_runner_logits_equal_with_and_without_the_kernel(monkeypatch) -> None:
    """The offload runner's attention goes through the kernel on the CPU; torch's path gives the same logits."""
    import flexspeed
    from flexspeed.inference.offload import cache as offload_cache
    from flexspeed.models.gpt import GPT, GPTConfig

    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=256)).eval()
    eng = flexspeed.init_inference(model, offload={"w_gpu_percent": 50, "gpu_batch_size": 2, "num_gpu_batches": 2})
    ids = torch.randint(0, 97, (3, 11))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    calls = []
    real = native.attention
    monkeypatch.setattr(native, "attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    runner = eng.runner
    with_kernel = runner.logits(ids, mask)
    assert calls
    monkeypatch.setattr(offload_cache, "NATIVE_ATTENTION", False)
    without = runner.logits(ids, mask)
    keep = mask.bool()
    assert (with_kernel[keep] - without[keep]).abs().max() < 1e-4


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 portable target")
def test_portable_build_matches(portable_build) -> None:
    script = (
        "import json, torch\n"
        "from test_native_attention import CASES, make, reference, padding_mask\n"
        "from flexspeed.inference import native\n"
        "assert native.library().fs_fast_path() == 0\n"
        "errs = []\n"
        "for case in CASES:\n"
        "    q, k, v = make(*case, torch.float32)\n"
        "    m = padding_mask(case[0], case[3], case[4])\n"
        "    out = native.attention(q, k, v, case[4], m, False, 0.2)\n"
        "    errs.append(float((out.double() - reference(q, k, v, case[4], m, False, 0.2)).abs().max()))\n"
        "print(json.dumps(errs))\n")
    errors = portable_build(script, os.path.dirname(__file__))
    assert len(errors) == len(CASES) and max(errors) < 1e-5, errors
