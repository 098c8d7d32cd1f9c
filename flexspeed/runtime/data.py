"""The training dataloader: a ``DistributedSampler`` over the data-parallel ranks with the
configured micro-batch size, deterministic for a seed, and resumable (epoch and offset)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset

__all__ = ["FlexDataLoader", "RepeatingLoader"]


class FlexDataLoader:
    """Iterates one epoch per ``iter()``; the sampler's epoch advances each time, as DeepSpeed's does.

    ``state_dict()`` records the epoch and the number of micro-batches consumed in it, so a
    resumed run skips exactly those (same data-parallel size). With a different data-parallel
    size the sampler reshuffles the epoch for the new rank count, and flexspeed resumes at the
    same *global sample* offset: ``offset * old_dp / new_dp`` micro-batches, rounded down.
    """

    def __init__(self, dataset: Dataset, *, batch_size: int, dp_rank: int, dp_world_size: int,
                 collate_fn: Callable | None = None, drop_last: bool = False, seed: int = 0,
                 shuffle: bool = True, num_workers: int = 0, pin_memory: bool = False) -> None:
        self.dataset = dataset
        # A private generator: a fresh iter(DataLoader) otherwise draws from the global torch RNG, which
        # would shift dropout masks between a resumed and an uninterrupted run.
        generator = torch.Generator().manual_seed(seed)
        self.batch_size = batch_size
        self.dp_world_size = dp_world_size
        if isinstance(dataset, IterableDataset):
            self.sampler = None
            self.loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn, drop_last=drop_last,
                                     num_workers=num_workers, pin_memory=pin_memory, generator=generator)
        else:
            self.sampler = DistributedSampler(dataset, num_replicas=dp_world_size, rank=dp_rank, shuffle=shuffle,
                                              seed=seed, drop_last=drop_last)
            self.loader = DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, collate_fn=collate_fn,
                                     drop_last=drop_last, num_workers=num_workers, pin_memory=pin_memory,
                                     generator=generator)
        self.epoch = 0
        self.offset = 0  # micro-batches consumed in the current epoch
        self._skip = 0
        if self.sampler is not None and len(self.loader) == 0:
            raise ValueError(_no_batches_message(len(dataset), batch_size, dp_world_size, drop_last))

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        if self.sampler is not None:
            self.sampler.set_epoch(self.epoch)
        skip, self._skip = self._skip, 0
        self.offset = skip
        it = iter(self.loader)
        for _ in range(skip):
            next(it, None)
        for batch in it:
            self.offset += 1
            yield batch
        self.epoch += 1
        self.offset = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "dp_world_size": self.dp_world_size,
                "batch_size": self.batch_size}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        offset = int(state["offset"])
        old_dp = int(state.get("dp_world_size", self.dp_world_size))
        old_bs = int(state.get("batch_size", self.batch_size))
        samples = offset * old_dp * old_bs  # global samples consumed this epoch
        self._skip = samples // (self.dp_world_size * self.batch_size)
        self.offset = self._skip


def _no_batches_message(n: int, batch_size: int, dp_world_size: int, drop_last: bool) -> str:
    """Why a map-style dataset yields no micro-batch on a rank, and what to change."""
    if n == 0:
        why, fix = "the dataset is empty", "pass a non-empty training_data (or none, and feed batches yourself)"
    else:
        why = (f"each rank gets {n // dp_world_size} sample(s) ({n} // {dp_world_size} ranks), fewer than one "
               "micro-batch, and dataloader_drop_last=true drops the partial batch")
        fix = (f"give at least {batch_size * dp_world_size} samples, lower train_micro_batch_size_per_gpu, or set "
               "dataloader_drop_last to false")
    return (f"the training data yields 0 micro-batches per rank: dataset length {n}, micro-batch {batch_size} "
            f"(train_micro_batch_size_per_gpu), data-parallel world size {dp_world_size}, dataloader_drop_last="
            f"{str(drop_last).lower()}: {why}, so a loop such as `while engine.global_steps < N` would never end. "
            f"Fix: {fix}")


class RepeatingLoader:
    """Iterate ``loader`` forever, starting it again whenever it runs out (DeepSpeed's name).

    The pipeline engine's ``train_batch(data_iter=...)`` pulls micro-batches with ``next()``;
    wrapping the loader keeps it from ending mid-run. Each restart calls ``iter(loader)``, so a
    :class:`FlexDataLoader` advances its sampler's epoch (a new shuffle) every time round.
    """

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self.data_iter = iter(loader)

    def __iter__(self) -> RepeatingLoader:
        return self

    def __next__(self) -> Any:
        try:
            return next(self.data_iter)
        except StopIteration:
            self.data_iter = iter(self.loader)
            return next(self.data_iter)
