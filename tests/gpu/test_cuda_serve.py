"""Continuous batching on the device: every slot runs every step through the runner's captured CUDA graph, and
every request still gets HF's greedy tokens (rows joining and leaving, the busy columns moved both ways)."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from tests.gpu.conftest import DEV, HAS_CUDA

tf = pytest.importorskip("transformers")


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_slot_batching_on_the_device_gives_hf_tokens(tmp_path, family: str) -> None:
    from flexspeed.inference.kernels import get_runner, inject_kernels
    from flexspeed.serve.batching import SlotBatcher
    from tests.unit._textmodels import save_model
    from tests.unit.test_serve_engine import _drive

    save_model(str(tmp_path), family, vocab=97, positions=128)
    model = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval().to(DEV)
    runner = get_runner(inject_kernels(copy.deepcopy(model)))
    batcher = SlotBatcher(runner, slots=3, cache_len=48)
    assert batcher.full_batch == HAS_CUDA and batcher.device.type == DEV.type
    rng = random.Random(2)
    reqs = [([7, 8], 20, 0), ([5] * 30, 10, 2)]
    reqs += [([rng.randrange(3, 97) for _ in range(rng.randint(1, 25))], rng.randint(1, 22), rng.randint(3, 40))
             for _ in range(10)]
    outs = _drive(batcher, reqs)
    for i, (prompt, m, _) in enumerate(reqs):
        ref = model.generate(torch.tensor([prompt], device=DEV), max_new_tokens=m, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
        assert outs[i] == ref[0, len(prompt):].tolist(), f"request {i}"
    assert batcher.moves >= 2
    if HAS_CUDA:  # single-token steps replayed one graph bound to the batcher's cache
        graphs = runner._graphs
        assert graphs is not None and graphs.failed is None and graphs.captures == 1 and graphs.owns(batcher.cache)
