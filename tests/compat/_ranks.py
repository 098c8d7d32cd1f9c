"""DeepSpeed's ``DistributedTest`` for the ports: one spawned gloo group per test file.

DeepSpeed starts a fresh group of ``world_size`` processes for every test case. Starting one costs
seconds on a 2-core machine, so a ported file registers its multi-rank cases with
:func:`rank_case` and a module-scoped fixture (:func:`group_fixture`) runs all of them, in order,
in one :func:`flexspeed.testing.run_ranks` group (127.0.0.1, gloo, a timeout for the whole
group). Every case runs on every rank; its outcome (per rank: passed, or the traceback) is kept,
and the pytest test of that case asserts it with :func:`expect`, so each DeepSpeed case still
passes or fails on its own line. After each case the ranks meet at a barrier and the case's
process group state (``initialize()`` joins the spawned group; nothing else is created) is left
as it was.
"""

from __future__ import annotations

import importlib
import os
import re
import traceback
from collections.abc import Callable
from typing import Any

import pytest

from flexspeed.testing import run_ranks

_REGISTRY: dict[str, dict[str, tuple[Callable, dict]]] = {}


def rank_case(module: str, case_id: str, fn: Callable, **kwargs: Any) -> None:
    """Register ``fn(tmpdir, **kwargs)`` as multi-rank case ``case_id`` of test module ``module``."""
    _REGISTRY.setdefault(module, {})[case_id] = (fn, kwargs)


def _safe(case_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", case_id)


def _run_group(rank: int, world_size: int, module: str, case_ids: list[str], root: str) -> dict[str, str | None]:
    import torch
    import torch.distributed as dist

    importlib.import_module(module)  # registers its cases in this fresh process
    cases = _REGISTRY[module]
    out: dict[str, str | None] = {}
    for case_id in case_ids:
        fn, kwargs = cases[case_id]
        tmpdir = os.path.join(root, _safe(case_id))
        os.makedirs(tmpdir, exist_ok=True)
        torch.manual_seed(1234)  # DeepSpeed's DistributedTest seeds each case the same way on every rank
        try:
            fn(tmpdir, **kwargs)
            out[case_id] = None
        except BaseException:  # noqa: BLE001 - reported per case, the group goes on
            out[case_id] = traceback.format_exc()
        dist.barrier()
    return out


def run_group(module: str, world_size: int, root: str, timeout: float = 300.0) -> dict[str, list[str | None]]:
    """Run every registered case of ``module`` on ``world_size`` ranks; case -> per-rank outcome."""
    case_ids = list(_REGISTRY.get(module, {}))
    per_rank = run_ranks(_run_group, world_size, (module, case_ids, root), timeout=timeout)
    return {case_id: [r[case_id] for r in per_rank] for case_id in case_ids}


def group_fixture(module: str, world_size: int, timeout: float = 300.0):
    """A module-scoped fixture running ``module``'s multi-rank cases once, in one group."""

    @pytest.fixture(scope="module")
    def _group(tmp_path_factory):
        return run_group(module, world_size, str(tmp_path_factory.mktemp(f"ranks{world_size}")), timeout)

    return _group


def expect(results: dict[str, list[str | None]], case_id: str) -> None:
    """Fail with the first failing rank's traceback if ``case_id`` failed on any rank."""
    outcome = results[case_id]
    failed = [(r, tb) for r, tb in enumerate(outcome) if tb is not None]
    if failed:
        rank, tb = failed[0]
        raise AssertionError(f"{case_id} failed on rank(s) {[r for r, _ in failed]}; rank {rank}:\n{tb}")
