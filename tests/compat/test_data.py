"""Port of DeepSpeed's ``tests/unit/runtime/test_data.py``.

Cases: test_repeating_loader, TestDataLoaderDropLast.test (train_batch_size 1/4 x drop_last True/False).

Plumbing: world size 1, in this process. The engine's loader is flexspeed's; the test sets
``num_local_io_workers`` on it as DeepSpeed's does (an attribute flexspeed's loader does not read:
it builds no worker pool of its own).
"""

from __future__ import annotations

import pytest
import torch

import flexspeed as deepspeed
from flexspeed.accelerator import get_accelerator
from flexspeed.utils import RepeatingLoader
from tests.compat._ds_common import SimpleModel, destroy_group, random_dataset


@pytest.fixture(autouse=True)
def _clean_group():
    yield
    destroy_group()


def test_repeating_loader():
    loader = RepeatingLoader([1, 2, 3])
    for _ in range(50):
        assert next(loader) == 1
        assert next(loader) == 2
        assert next(loader) == 3


@pytest.mark.parametrize("train_batch_size, drop_last", [(1, True), (4, True), (1, False), (4, False)])
class TestDataLoaderDropLast:
    def test(self, train_batch_size, drop_last):
        config_dict = {"train_batch_size": train_batch_size, "dataloader_drop_last": drop_last, "steps_per_print": 1}
        hidden_dim = 10
        model = SimpleModel(hidden_dim)
        optimizer = torch.optim.AdamW(params=model.parameters())
        train_dataset = random_dataset(total_samples=50, hidden_dim=hidden_dim, device=torch.device("cpu"),
                                       dtype=torch.float32)
        model, _, training_dataloader, _ = deepspeed.initialize(config=config_dict, model=model,
                                                                training_data=train_dataset, optimizer=optimizer)
        training_dataloader.num_local_io_workers = 0  # We can't do nested mp.pool
        for batch in training_dataloader:
            x = batch[0].to(get_accelerator().current_device_name())
            y = batch[1].to(get_accelerator().current_device_name())
            loss = model(x, y)
            model.backward(loss)
            model.step()
