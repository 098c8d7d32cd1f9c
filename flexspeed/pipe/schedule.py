"""Choosing, validating and inspecting the ``torch.distributed.pipelining`` schedules.

``pipeline.schedule`` in the config picks one of:

- ``"1f1b"`` (default): ``Schedule1F1B`` - after a warm-up of ``stages - stage_id`` forwards,
  each stage alternates one forward and one backward, so at most ``stages`` micro-batches of
  activations are alive on stage 0. Needs ``gradient_accumulation_steps >= stages``.
- ``"gpipe"``: ``ScheduleGPipe`` - all forwards, then all backwards (fill-drain): the same
  bubble as 1F1B but activations for every micro-batch are alive at once.
- ``"interleaved_1f1b"``: ``ScheduleInterleaved1F1B`` - each rank runs
  ``pipeline.virtual_stages`` non-adjacent model chunks, shrinking the bubble by that factor.

``execution_order()`` runs a schedule's real ``step()`` in one process with recording
stand-in stages (no communication), so the exact order of forward/backward actions each rank
performs can be printed and unit-tested without a process group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch.distributed.pipelining import Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B

from flexspeed.config.errors import ConfigError, did_you_mean

__all__ = ["SCHEDULES", "validate_schedule", "build_schedule", "execution_order", "format_order",
           "bubble_fraction"]

SCHEDULES: dict[str, type] = {
    "1f1b": Schedule1F1B,
    "gpipe": ScheduleGPipe,
    "interleaved_1f1b": ScheduleInterleaved1F1B,
}


def validate_schedule(name: str, num_stages: int, virtual_stages: int, n_microbatches: int) -> None:
    """Raise ``ConfigError`` when the schedule cannot run this pipeline shape.

    Args:
        name: ``pipeline.schedule``.
        num_stages: pipeline-parallel degree.
        virtual_stages: ``pipeline.virtual_stages``.
        n_microbatches: ``gradient_accumulation_steps`` (micro-batches per ``train_batch``).
    """
    if name not in SCHEDULES:
        raise ConfigError(f"pipeline.schedule={name!r} is not one of {sorted(SCHEDULES)}."
                          + did_you_mean(name, SCHEDULES), key="pipeline.schedule")
    if virtual_stages < 1:
        raise ConfigError(f"pipeline.virtual_stages={virtual_stages} must be >= 1", key="pipeline.virtual_stages")
    if name != "interleaved_1f1b" and virtual_stages != 1:
        raise ConfigError(f"pipeline.virtual_stages={virtual_stages} needs pipeline.schedule='interleaved_1f1b' "
                          f"(got {name!r}), the only schedule that runs several model chunks per rank. Fix: set "
                          "the schedule to 'interleaved_1f1b' or virtual_stages to 1", key="pipeline.virtual_stages")
    if name == "1f1b" and n_microbatches < num_stages:
        raise ConfigError(f"pipeline.schedule='1f1b' needs at least one micro-batch per stage: "
                          f"gradient_accumulation_steps={n_microbatches} < {num_stages} stages. Fix: raise "
                          f"gradient_accumulation_steps to >= {num_stages} (a larger count also shrinks the bubble), "
                          "or use pipeline.schedule='gpipe'", key="gradient_accumulation_steps")
    if name == "interleaved_1f1b":
        rounds = max(1, n_microbatches // num_stages)
        if n_microbatches % rounds != 0:
            ok = [m for m in range(num_stages, 4 * num_stages + 1) if m % max(1, m // num_stages) == 0]
            raise ConfigError(f"pipeline.schedule='interleaved_1f1b' runs micro-batches in rounds of "
                              f"{num_stages} (the stage count); gradient_accumulation_steps={n_microbatches} is not "
                              f"a multiple of its {rounds} rounds. Fix: use a count such as {ok[:6]}",
                              key="gradient_accumulation_steps")


def build_schedule(name: str, stages: list[Any], n_microbatches: int, loss_fn: Callable) -> Any:
    """The torch schedule object for ``stages`` (this rank's ``PipelineStage`` objects).

    Gradient scaling by the micro-batch count is left to ``loss_fn`` (``scale_grads=False``),
    so a parameter shared by two local chunks is never scaled twice.
    """
    cls = SCHEDULES[name]
    if name == "interleaved_1f1b":
        return cls(stages, n_microbatches, loss_fn=loss_fn, scale_grads=False)
    if len(stages) != 1:
        raise AssertionError(f"{name} runs one stage per rank, got {len(stages)}")
    return cls(stages[0], n_microbatches, loss_fn=loss_fn, scale_grads=False)


class _RecordingStage:
    """Duck-typed stand-in for ``PipelineStage`` that records compute actions and sends nothing."""

    def __init__(self, stage_index: int, num_stages: int, group_size: int, group_rank: int, log: list[str]) -> None:
        self.stage_index, self.num_stages = stage_index, num_stages
        self.group_size, self.group_rank = group_size, group_rank
        self.log = log
        self.has_backward = False
        self.output_chunks: list[Any] = []
        self.submod = torch.nn.Identity()
        self.device = torch.device("cpu")
        self.stage_index_to_group_rank: dict[int, int] = {}
        self.args_recv_info: dict[int, tuple] = {0: ()}
        self.act_send_info: dict[int, list] = {}

    @property
    def is_first(self) -> bool:
        return self.stage_index == 0

    @property
    def is_last(self) -> bool:
        return self.stage_index == self.num_stages - 1

    def forward_one_chunk(self, mb: int, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.log.append(f"{self.stage_index}F{mb}")
        return torch.zeros(())

    def backward_one_chunk(self, mb: int, loss: Any = None, full_backward: bool = True,
                           last_backward: bool = False) -> None:
        self.log.append(f"{self.stage_index}B{mb}")

    def _no_ops(self, *args: Any, **kwargs: Any) -> list:
        return []

    def _nothing(self, *args: Any, **kwargs: Any) -> None:
        return None

    get_fwd_recv_ops = get_bwd_recv_ops = get_fwd_send_ops = get_bwd_send_ops = _no_ops
    _get_init_p2p_neighbors_ops = _no_ops
    clear_runtime_states = _prepare_forward_infra = _prepare_backward_infra = _nothing
    perform_reduce_grad = scale_grads = set_local_fwd_input = set_local_bwd_input = _nothing
    get_local_bwd_output = _nothing


def execution_order(name: str, num_stages: int, n_microbatches: int, virtual_stages: int = 1) -> dict[int, list[str]]:
    """The compute actions each pipeline rank performs in one ``train_batch``, in order.

    Runs the real torch schedule's ``step()`` in this process with stand-in stages.
    Actions read ``"<stage>F<micro-batch>"`` / ``"<stage>B<micro-batch>"`` (torch's notation).

    Args:
        name: schedule name ("1f1b", "gpipe", "interleaved_1f1b").
        num_stages: pipeline ranks.
        n_microbatches: micro-batches per step.
        virtual_stages: chunks per rank (interleaved only).
    Returns:
        rank -> list of actions.
    """
    validate_schedule(name, num_stages, virtual_stages, n_microbatches)
    total = num_stages * virtual_stages
    order: dict[int, list[str]] = {}
    for rank in range(num_stages):
        log: list[str] = []
        stages = [_RecordingStage(rank + k * num_stages, total, num_stages, rank, log) for k in range(virtual_stages)]
        schedule = build_schedule(name, stages, n_microbatches, loss_fn=lambda out, target: out)
        schedule.step(torch.zeros(n_microbatches), target=torch.zeros(n_microbatches), return_outputs=False)
        order[rank] = log
    return order


def format_order(order: dict[int, list[str]]) -> str:
    """A text grid: one column per rank, one row per action slot."""
    ranks = sorted(order)
    rows = max(len(order[r]) for r in ranks)
    lines = ["slot " + "".join(f"{'rank ' + str(r):>9}" for r in ranks)]
    for i in range(rows):
        cells = "".join(f"{order[r][i] if i < len(order[r]) else '':>9}" for r in ranks)
        lines.append(f"{i:>4} {cells}")
    return "\n".join(lines)


def bubble_fraction(num_stages: int, n_microbatches: int, virtual_stages: int = 1) -> float:
    """Idle fraction of a synchronous schedule: ``(p - 1) / (v * m + p - 1)`` (p stages, m micro-batches)."""
    p, m, v = num_stages, n_microbatches, virtual_stages
    return (p - 1) / (v * m + p - 1)
