"""The static decode step that CUDA graphs capture, checked on the CPU.

``FusedRunner.static_body`` (every input a tensor, the whole cache read under a key mask) must give
the eager step's logits for every family, with left padding and GQA; ``DecodeGraphs`` pools caches
per shape (least recently used dropped) and, where capture is impossible, runs the same static body.
The capture and replay themselves run in ``tests/gpu``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from flexspeed.inference.attention import decode_attention, decode_valid
from flexspeed.inference.graphs import DecodeGraphs
from flexspeed.inference.kernels import get_runner, inject_kernels
from tests.unit.test_kernels import NAMES, V, build, padded_batch


def test_masked_decode_attention_equals_sdpa_over_the_prefix() -> None:
    g = torch.Generator().manual_seed(0)
    B, hq, hkv, T, hd, end = 3, 8, 2, 12, 16, 7
    q, k, v = torch.randn(B, hq, 1, hd, generator=g), torch.randn(B, hkv, T, hd, generator=g), \
        torch.randn(B, hkv, T, hd, generator=g)
    mask = torch.ones(B, end, dtype=torch.bool)
    mask[1, :3] = False
    valid = torch.zeros(B, T, dtype=torch.bool)
    valid[:, :end] = mask
    want = F.scaled_dot_product_attention(q, k[:, :, :end], v[:, :, :end], attn_mask=mask[:, None, None, :],
                                          scale=0.25, enable_gqa=True)
    torch.testing.assert_close(decode_attention(q, k, v, valid, 0.25), want, rtol=0, atol=1e-5)
    torch.testing.assert_close(decode_valid(T, end, mask[:, None, None, :], q.device), valid)


@pytest.mark.parametrize("name", NAMES)
def test_static_body_matches_the_eager_step(name: str) -> None:
    """Prefill a padded batch eagerly, then each decode step both ways on copies of the cache."""
    model = inject_kernels(build(name))
    runner = get_runner(model)
    ids, mask = padded_batch()
    if name == "gpt":  # flexspeed's GPT takes no mask: no padding
        mask = torch.ones_like(mask)
    B, T = ids.shape
    t_max = 64  # longer than the prompt + steps: the masked tail must not count
    key_mask = torch.ones(B, t_max, dtype=torch.bool)
    key_mask[:, :T] = mask.bool()
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    cache = runner.new_cache(B, t_max)
    with torch.no_grad():
        runner(ids, pos, cache, 0, None if bool(mask.all()) else key_mask)
        nxt, p = ids[:, -1:], pos[:, -1:]
        for start in range(T, T + 3):
            p = p + 1
            twin = type(cache)([k.clone() for k in cache.k], [v.clone() for v in cache.v])
            want = runner(nxt, p, cache, start, None if bool(mask.all()) else key_mask)
            got = runner.static_body(nxt, p, twin, torch.tensor([start]), key_mask)
            torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
            for a, b in zip(twin.k + twin.v, cache.k + cache.v):  # the same keys/values written
                torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
            nxt = want[:, -1].argmax(-1, keepdim=True)


def test_pool_reuses_and_drops_least_recently_used() -> None:
    runner = get_runner(inject_kernels(build("llama")))
    graphs = DecodeGraphs(runner, keep=2)
    a = graphs.cache(2, 64, torch.float32, torch.device("cpu"))
    assert graphs.cache(2, 64, torch.float32, torch.device("cpu")) is a  # same shape: same buffers
    b = graphs.cache(4, 64, torch.float32, torch.device("cpu"))
    assert graphs.owns(a) and graphs.owns(b)
    graphs.cache(2, 64, torch.float32, torch.device("cpu"))  # a is the most recent again
    graphs.cache(1, 128, torch.float32, torch.device("cpu"))  # drops b, the least recently used
    assert graphs.owns(a) and not graphs.owns(b)
    assert a.k[0].shape == (2, 2, 64, 16)  # (B, H_kv, T_max, head_dim): GQA heads


def test_step_without_capture_runs_the_static_body() -> None:
    """Where capture failed, steps still go through the pooled buffers and give the eager logits."""
    model = inject_kernels(build("opt"))
    runner = get_runner(model)
    graphs = DecodeGraphs(runner)
    graphs.failed = "test: no capture"
    ids, mask = padded_batch()
    B, T = ids.shape
    pos = (mask.cumsum(1) - 1).clamp(min=0)
    key_mask = torch.ones(B, T + 1, dtype=torch.bool)
    key_mask[:, :T] = mask.bool()
    eager = runner.new_cache(B, 64)
    pooled = graphs.cache(B, 64, torch.float32, torch.device("cpu"))
    with torch.no_grad():
        for c in (eager, pooled):
            runner(ids, pos, c, 0, key_mask)
        nxt = torch.full((B, 1), 5)
        want = runner(nxt, pos[:, -1:] + 1, eager, T, key_mask)
        got = graphs.step(nxt, pos[:, -1:] + 1, pooled, T, key_mask)  # a key mask shorter than T_max
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    assert graphs.captures == 0


def test_cpu_runner_never_pools_caches() -> None:
    runner = get_runner(inject_kernels(build("gpt")))
    assert runner._graphs is None and runner.new_cache(1, 10).max_len == 10  # no rounding, no pool on the CPU
    assert runner._graphs is None
    assert V == 97
