"""``flexspeed.zero.Init``: a model built on the meta device and materialised as local shards by
``initialize()`` - same weights as an eager build, peak memory about one shard, trainable - and
``GatheredParameters``. One spawned group of 4 ranks (shards are a quarter: a clear signal)."""

from __future__ import annotations

import ctypes
import gc
import re

import pytest
import torch
import torch.nn as nn

from flexspeed.testing import run_ranks
from tests.distributed._parity import global_batches, make_dataset, make_model, reference_run
from tests.distributed.test_zero_parity import full_state, zero_config

WORLD = 4
WIDTH, DEPTH = 1024, 32  # 32 x (1024 x 1024 + 1024) fp32 = 134 MB


class Stack(nn.Module):
    """Blocks in a ModuleList (sharded one by one at stage 3); init = each Linear's reset_parameters."""

    def __init__(self, width: int = WIDTH, depth: int = DEPTH) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.norm = nn.LayerNorm(width)
        self.register_buffer("scale", torch.full((width,), 0.5))  # a constructor-made buffer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.norm(x) * self.scale


def _rss_kb() -> tuple[int, int]:
    status = open("/proc/self/status").read()
    return (int(re.search(r"VmHWM:\s+(\d+)", status).group(1)), int(re.search(r"VmRSS:\s+(\d+)", status).group(1)))


def _peak_delta_bytes(build) -> tuple[object, int]:
    """Run ``build()``; return its result and the peak resident memory it added (Linux)."""
    gc.collect()
    try:  # hand freed heap pages back to the OS, so the measurement starts clean
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass
    with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark to the current RSS
        f.write("5")
    _, before = _rss_kb()
    out = build()
    peak, _ = _rss_kb()
    return out, (peak - before) * 1024


def _stack_config(stage: int = 3) -> dict:
    return {"train_batch_size": WORLD, "train_micro_batch_size_per_gpu": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
            "zero_optimization": {"stage": stage}, "steps_per_print": 1000}


def _build_init():
    import flexspeed

    torch.manual_seed(7)
    with flexspeed.zero.Init():
        model = Stack()
    meta = all(p.is_meta for p in model.parameters()) and not model.scale.is_meta
    engine, *_ = flexspeed.initialize(model=model, config=_stack_config())
    return engine, meta


def _build_eager():
    import flexspeed

    torch.manual_seed(7)
    model = Stack()
    engine, *_ = flexspeed.initialize(model=model, config=_stack_config())
    return engine


def _gathered(engine, rank: int) -> dict:
    import flexspeed

    weight = engine.module.layers[3].weight
    with flexspeed.zero.GatheredParameters([weight]) as (full,):  # read-only: changes are dropped
        shape = tuple(full.shape)
        full.fill_(9.0)
    unchanged = not bool((weight.full_tensor() == 9.0).any())
    with flexspeed.zero.GatheredParameters(weight, modifier_rank=0) as (full,):
        if rank == 0:
            full.fill_(1.5)
    changed = bool((weight.full_tensor() == 1.5).all())
    return {"shape": shape, "unchanged": unchanged, "changed": changed}


def _gpt_under_init(rank: int, world: int) -> dict:
    """A GPT built under Init with its own init as param_init_fn, then 4 steps of training."""
    import flexspeed
    from flexspeed.models import GPT

    with flexspeed.zero.Init(seed=3, param_init_fn=GPT.init_weights):
        model = make_model()
    cfg = zero_config(stage=3, precision="fp32", gas=1, micro=4, world=world)
    cfg["gradient_clipping"] = 0.5
    engine, _, loader, _ = flexspeed.initialize(model=model, config=cfg, training_data=make_dataset(),
                                               model_parameters=model.parameters())
    start = full_state(engine.module)
    it = iter(loader)
    for _ in range(4):
        x, y = next(it)
        engine.backward(engine(x, y))
        engine.step()
    return {"start": start, "end": full_state(engine.module)}


def _ranks(rank: int, world: int) -> dict:
    gpt = _gpt_under_init(rank, world)  # first: it also loads every module initialize() imports
    (engine, meta), init_peak = _peak_delta_bytes(_build_init)
    init_weights = full_state(engine.module)
    gathered = _gathered(engine, rank)
    del engine
    eager, eager_peak = _peak_delta_bytes(_build_eager)
    eager_weights = full_state(eager.module)
    same = all(torch.equal(init_weights[k], v) for k, v in eager_weights.items())
    return {"meta": meta, "init_peak": init_peak, "eager_peak": eager_peak, "same": same,
            "gathered": gathered, "gpt": gpt}


@pytest.fixture(scope="module")
def ranks() -> list[dict]:
    return run_ranks(_ranks, world_size=WORLD, timeout=240)


def test_zero_init_materialises_shards_only_and_matches_eager_build(ranks):
    full_bytes = DEPTH * (WIDTH * WIDTH + WIDTH) * 4
    init_mib = [round(r["init_peak"] / 2**20) for r in ranks]
    eager_mib = [round(r["eager_peak"] / 2**20) for r in ranks]
    print(f"model {full_bytes / 2**20:.0f} MiB; peak RSS added per rank: zero.Init {init_mib} MiB, eager {eager_mib} MiB")
    for rank, r in enumerate(ranks):
        assert r["meta"], "parameters built under zero.Init must be on the meta device, buffers real"
        assert r["same"], f"rank {rank}: zero.Init weights differ from the eager build with the same seed"
        # a quarter of the model plus one layer's temporary full copy; the eager build holds it all
        assert r["init_peak"] < 0.45 * full_bytes, (rank, r["init_peak"], full_bytes)
        assert r["eager_peak"] > 0.95 * full_bytes, (rank, r["eager_peak"], full_bytes)


def test_gathered_parameters_reads_and_writes_shards(ranks):
    for r in ranks:
        assert r["gathered"] == {"shape": (WIDTH, WIDTH), "unchanged": True, "changed": True}, r["gathered"]


def test_model_built_under_init_trains_like_pytorch(ranks):
    start = ranks[0]["gpt"]["start"]
    assert all(torch.equal(r["gpt"]["start"][k], v) for r in ranks for k, v in start.items())
    # param_init_fn ran: GPT's N(0, 0.02) weights, not Linear's default uniform init
    w = start["transformer.h.0.attn.c_attn.weight"]
    assert 0.015 < float(w.std()) < 0.025, float(w.std())
    model = make_model()
    model.load_state_dict(start)
    batches = global_batches(make_dataset(), world=WORLD, micro=4, gas=1, steps=4)
    _, ref = reference_run(model, batches, lr=1e-3, clip=0.5)
    for k, v in ref.items():
        torch.testing.assert_close(ranks[0]["gpt"]["end"][k], v, rtol=0, atol=1e-5, msg=k)
