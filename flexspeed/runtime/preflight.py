"""Everything ``initialize()`` checks in a config that needs neither the model nor a process group.

:func:`check_buildable` builds the config's optimizer (and, over it, its scheduler) with the very
functions ``initialize()`` uses, over stand-in parameters, and imports the monitors the config
enables. It runs inside :func:`flexspeed.config.resolve_config`, so ``flexspeed check-config``,
``build_config`` and ``initialize()`` reject a bad config at the same place with the same
:class:`~flexspeed.config.ConfigError` (key, value and fix).

What is left to ``initialize()`` depends on what only it has: the model (hidden size for
``"auto"``, a ``PipelineModule``'s stage count), client optimizer/scheduler objects, the device
(CPU offload below stage 2 on a GPU), and the world size a launcher reports.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from flexspeed.config.schema import FlexConfig

__all__ = ["check_buildable"]


def check_buildable(cfg: FlexConfig) -> None:
    """Dry-build the optimizer and scheduler sections of a resolved ``FlexConfig``.

    Args:
        cfg: the resolved config (no ``"auto"`` left in ``optimizer``/``scheduler``).
    Raises:
        ConfigError: whatever ``initialize()`` would raise for these sections, with the same key.
    """
    optimizer = _stand_in_optimizer(cfg)
    _check_scheduler(cfg, optimizer)
    _check_monitors(cfg)


def _param_groups_needed(cfg: FlexConfig) -> int:
    """Param groups the stand-in optimizer gets: the longest per-group list in ``scheduler.params``."""
    if cfg.scheduler is None:
        return 1
    lengths = [len(v) for v in cfg.scheduler.params.values() if isinstance(v, (list, tuple))]
    return max([1, *lengths])  # an empty list is the scheduler's to reject, with its own key


def _stand_in_optimizer(cfg: FlexConfig) -> torch.optim.Optimizer | None:
    """The config's optimizer over one-element stand-in parameters, as ``initialize()`` builds it."""
    if cfg.optimizer is None:
        return None
    from flexspeed.runtime.optimizers import build_optimizer
    from flexspeed.runtime.zero import check_shardable

    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))]} for _ in range(_param_groups_needed(cfg))]
    optimizer = build_optimizer(cfg.optimizer.type, dict(cfg.optimizer.params), groups)
    check_shardable(optimizer, cfg.zero_optimization.stage, cfg.zero_allow_untested_optimizer)
    return optimizer


def _check_scheduler(cfg: FlexConfig, optimizer: torch.optim.Optimizer | None) -> None:
    if cfg.scheduler is None:
        return
    from flexspeed.runtime.schedulers import build_scheduler, validate_scheduler_params

    if optimizer is None:  # the optimizer comes from initialize(optimizer=...): check the params alone
        validate_scheduler_params(cfg.scheduler.type, dict(cfg.scheduler.params))
        return
    build_scheduler(cfg.scheduler.type, dict(cfg.scheduler.params), optimizer)


def _check_monitors(cfg: FlexConfig) -> None:
    from flexspeed.runtime.monitor import require_monitor_packages

    require_monitor_packages(cfg)
