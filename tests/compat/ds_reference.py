"""DeepSpeed 0.19.8's WarmupLR as a plain function, for reference loops written to DeepSpeed's schedule.

Parity tests and benchmarks that compare flexspeed with a plain PyTorch loop set the loop's lr
from here, never from flexspeed's scheduler, so a change in flexspeed's schedule cannot move
both sides. ``tests/compat/test_schedulers_vs_deepspeed.py`` checks this function against the
values recorded from DeepSpeed's engine. It imports nothing from flexspeed.
"""

from __future__ import annotations

import math

__all__ = ["deepspeed_warmup_lr"]


def deepspeed_warmup_lr(step: int, *, warmup_min_lr: float = 0.0, warmup_max_lr: float,
                        warmup_num_steps: int = 1000, warmup_type: str = "log") -> float:
    """The lr DeepSpeed's engine runs optimizer step ``step`` (1-based, none skipped) with.

    DeepSpeed builds the scheduler at iteration -1 (writing ``warmup_min_lr``) and steps it after
    each optimizer step, so step k runs at iteration k - 2: steps 1 and 2 both use the minimum.
    """
    if step < 1:
        raise ValueError(f"optimizer steps count from 1, got {step}")
    iteration = step - 2
    if iteration < 0:
        return warmup_min_lr
    n = max(2, warmup_num_steps)
    if iteration >= n:
        gamma = 1.0
    elif warmup_type == "log":
        gamma = math.log(iteration + 1) / math.log(n)
    else:
        gamma = iteration / n
    return warmup_min_lr + (warmup_max_lr - warmup_min_lr) * gamma
