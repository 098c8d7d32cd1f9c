"""The distributed dataloader: disjoint rank shards, determinism, epochs, resume."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import TensorDataset

from flexspeed.runtime.data import FlexDataLoader


@pytest.fixture(autouse=True)
def _no_group_leak():
    """initialize() in one process starts a gloo group; later tests expect none."""
    yield
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _ds(n=40):
    return TensorDataset(torch.arange(n))


def _ids(loader, k=None):
    out = []
    for i, (b,) in enumerate(loader):
        if k is not None and i == k:
            break
        out += b.tolist()
    return out


def test_ranks_see_disjoint_shards_covering_the_data():
    a = _ids(FlexDataLoader(_ds(), batch_size=4, dp_rank=0, dp_world_size=2))
    b = _ids(FlexDataLoader(_ds(), batch_size=4, dp_rank=1, dp_world_size=2))
    assert not set(a) & set(b) and sorted(a + b) == list(range(40))


def test_deterministic_and_epochs_reshuffle():
    l1 = FlexDataLoader(_ds(), batch_size=4, dp_rank=0, dp_world_size=1)
    l2 = FlexDataLoader(_ds(), batch_size=4, dp_rank=0, dp_world_size=1)
    e0 = _ids(l1)
    assert e0 == _ids(l2)
    assert _ids(l1) != e0 and l1.epoch == 2


def test_drop_last_and_len():
    loader = FlexDataLoader(_ds(42), batch_size=4, dp_rank=0, dp_world_size=2, drop_last=True)
    assert len(loader) == 5 and all(len(b[0]) == 4 for b in loader)


def test_resume_same_world_size_continues_exactly():
    full = FlexDataLoader(_ds(), batch_size=4, dp_rank=0, dp_world_size=2)
    all_ids = _ids(full)
    part = FlexDataLoader(_ds(), batch_size=4, dp_rank=0, dp_world_size=2)
    it = iter(part)
    seen = [x for _ in range(2) for x in next(it)[0].tolist()]
    state = part.state_dict()
    assert state["offset"] == 2 and state["epoch"] == 0
    resumed = FlexDataLoader(_ds(), batch_size=4, dp_rank=0, dp_world_size=2)
    resumed.load_state_dict(state)
    assert seen + _ids(resumed) == all_ids


def test_resume_changed_world_size_keeps_global_sample_offset():
    state = {"epoch": 1, "offset": 2, "dp_world_size": 2, "batch_size": 4}  # 16 global samples consumed
    loader = FlexDataLoader(_ds(), batch_size=4, dp_rank=0, dp_world_size=4)
    loader.load_state_dict(state)
    assert loader.offset == 1 and loader.epoch == 1  # 16 / (4 ranks * 4) = 1 micro-batch


def test_iterating_does_not_touch_the_global_rng():
    loader = FlexDataLoader(_ds(), batch_size=4, dp_rank=0, dp_world_size=1)
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    _ids(loader)
    assert torch.equal(torch.rand(1), expected)


@pytest.mark.parametrize(("n", "drop_last", "want"), [
    (0, False, "dataset length 0, micro-batch 4 .* world size 2, dataloader_drop_last=false: the dataset is empty"),
    (7, True, "dataset length 7, micro-batch 4 .* world size 2, dataloader_drop_last=true: each rank gets 3"),
])
def test_zero_batches_per_rank_is_an_error(n, drop_last, want):
    with pytest.raises(ValueError, match=want):
        FlexDataLoader(_ds(n), batch_size=4, dp_rank=0, dp_world_size=2, drop_last=drop_last)
    assert len(FlexDataLoader(_ds(n or 1), batch_size=4, dp_rank=0, dp_world_size=2)) == 1  # a partial batch is kept


def test_initialize_refuses_a_dataset_shorter_than_a_batch_with_drop_last():
    import flexspeed
    from tests.distributed._parity import make_dataset, make_model

    model = make_model(seed=0)
    cfg = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 4, "dataloader_drop_last": True,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    with pytest.raises(ValueError, match="dataset length 3, micro-batch 4 .* world size 1, dataloader_drop_last=true"):
        flexspeed.initialize(model=model, model_parameters=model.parameters(), training_data=make_dataset(n=3),
                             config=cfg)
