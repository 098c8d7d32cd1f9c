"""``deepspeed.utils.groups`` on flexspeed's process groups: the data-parallel and sequence-parallel queries
that transformers and Accelerate make.

The groups come from :class:`~flexspeed.distributed.parallel_dims.ParallelDims` over the current process group
(``from_process_group``: flexspeed's engines outside pipelines use the world as the data-parallel group, as
DeepSpeed does without an ``mpu``). flexspeed has no sequence parallelism: its degree is 1 and this rank is rank 0
of it, as DeepSpeed answers without a sequence-parallel ``mpu``; asking for the sequence-parallel *group*
raises DeepSpeed's ``KeyError`` with the fix. Like DeepSpeed's, these need ``torch.distributed``
started. The data-parallel group is the default group itself (what a one-dimensional mesh over the
whole world uses), so no query is a collective and nothing here keeps a group alive after
``destroy_process_group()``.
"""

from __future__ import annotations

import torch.distributed as dist

from flexspeed.distributed.parallel_dims import ParallelDims

__all__ = ["_get_data_parallel_group", "_get_data_parallel_world_size", "_get_data_parallel_rank",
           "_get_data_parallel_group_ranks", "_get_model_parallel_world_size", "_get_sequence_parallel_group",
           "_get_sequence_parallel_world_size", "_get_sequence_parallel_rank", "_get_sequence_data_parallel_group",
           "_get_sequence_data_parallel_world_size", "_get_sequence_data_parallel_rank",
           "_get_expert_parallel_group_dict"]


def _require_dist() -> None:
    if not dist.is_initialized():
        raise RuntimeError("deepspeed.utils.groups needs torch.distributed started (dist is not initialized). Fix: "
                           "call deepspeed.init_distributed() (or deepspeed.initialize) first")


def _dims() -> ParallelDims:
    """The degrees over the current process group (arithmetic only: no mesh is built)."""
    _require_dist()
    return ParallelDims.from_process_group()


def _get_data_parallel_group() -> dist.ProcessGroup:
    """The data-parallel process group: all ranks, the default group."""
    _require_dist()
    return dist.distributed_c10d._get_default_group()


def _get_data_parallel_world_size() -> int:
    return dist.get_world_size(group=_get_data_parallel_group())


def _get_data_parallel_rank() -> int:
    return dist.get_rank(group=_get_data_parallel_group())


def _get_data_parallel_group_ranks() -> list[int]:
    return _dims().ranks_along("dp", dist.get_rank())


def _get_model_parallel_world_size() -> int:
    """Tensor x pipeline degree of the data-parallel layout these queries describe (1)."""
    dims = _dims()
    return dims.tp * dims.pp


def _get_sequence_parallel_world_size() -> int:
    _require_dist()
    return 1


def _get_sequence_parallel_rank() -> int:
    return 0


def _get_sequence_parallel_group() -> dist.ProcessGroup:
    raise KeyError("No sequence parallel group found: flexspeed does not implement DeepSpeed's Ulysses sequence "
                   "parallelism (deepspeed.runtime.sequence_parallel). Fix: set the sequence-parallel size to 1 "
                   "(Accelerate's ParallelismConfig sp_size, transformers' parallelism_config), or run with DeepSpeed")


def _get_sequence_data_parallel_group() -> dist.ProcessGroup:
    return _get_data_parallel_group()


def _get_sequence_data_parallel_world_size() -> int:
    return _get_data_parallel_world_size()


def _get_sequence_data_parallel_rank() -> int:
    return _get_data_parallel_rank()


def _get_expert_parallel_group_dict() -> dict:
    """No expert-parallel groups are registered here (flexspeed's MoE keeps its own, see flexspeed.moe)."""
    return {}
