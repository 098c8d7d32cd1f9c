"""DeepSpeed's ``DistributedTest`` for the ports: one spawned gloo group per world size per session.

DeepSpeed starts a fresh group of ``world_size`` processes for every test case. Starting one costs
about ten seconds on a 2-core machine (the cases themselves take a fraction of a second), so a
ported file registers its multi-rank cases with :func:`rank_case`, and the session fixtures
``ranks2`` / ``ranks4`` (``conftest.py``) run every registered case of every collected file, in
order, in one :func:`flexspeed.testing.run_ranks` group (127.0.0.1, gloo, a timeout for the whole
group). Every case runs on every rank with the same seed; its outcome (per rank: passed, or the
traceback) is kept, and the pytest test of that case asserts it with :func:`expect`, so each
DeepSpeed case still passes or fails on its own line. After each case the ranks meet at a barrier.
"""

from __future__ import annotations

import importlib
import os
import re
import time
import traceback
from collections.abc import Callable
from typing import Any

from flexspeed.testing import run_ranks

# world size -> module -> case id -> (body, kwargs)
_REGISTRY: dict[int, dict[str, dict[str, tuple[Callable, dict]]]] = {}


def slow_enabled() -> bool:
    """``slow`` ports run (``FLEXSPEED_SLOW=1``; ``-m slow`` sets it, see conftest.py)."""
    return os.environ.get("FLEXSPEED_SLOW") == "1"


def rank_case(module: str, case_id: str, fn: Callable, *, world_size: int = 2, slow: bool = False,
              **kwargs: Any) -> None:
    """Register ``fn(tmpdir, **kwargs)`` as case ``case_id`` of test module ``module`` on ``world_size``
    ranks (a ``slow`` case runs only when :func:`slow_enabled`)."""
    if slow and not slow_enabled():
        return
    _REGISTRY.setdefault(world_size, {}).setdefault(module, {})[case_id] = (fn, kwargs)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def _run_group(rank: int, world_size: int, plan: list[tuple[str, str]], root: str) -> dict:
    import torch
    import torch.distributed as dist

    for module in dict.fromkeys(m for m, _ in plan):
        importlib.import_module(module)  # registers its cases in this fresh process
    out: dict[tuple[str, str], str | None] = {}
    for module, case_id in plan:
        fn, kwargs = _REGISTRY[world_size][module][case_id]
        tmpdir = os.path.join(root, _safe(module.rsplit(".", 1)[-1]), _safe(case_id))
        os.makedirs(tmpdir, exist_ok=True)
        torch.manual_seed(1234)  # every rank starts each case from the same seed
        started = time.perf_counter()
        try:
            fn(tmpdir, **kwargs)
            out[(module, case_id)] = None
        except BaseException:  # noqa: BLE001 - reported per case, the group goes on
            out[(module, case_id)] = traceback.format_exc()
        dist.barrier()
        if rank == 0 and os.environ.get("FLEXSPEED_COMPAT_TIMES") == "1":
            print(f"[ranks{world_size}] {time.perf_counter() - started:6.2f}s {module}::{case_id}", flush=True)
    return out


def run_group(world_size: int, root: str, timeout: float = 900.0) -> dict[tuple[str, str], list[str | None]]:
    """Run every registered case on ``world_size`` ranks; (module, case) -> per-rank outcome."""
    plan = [(m, c) for m, cases in _REGISTRY.get(world_size, {}).items() for c in cases]
    if not plan:
        return {}
    per_rank = run_ranks(_run_group, world_size, (plan, root), timeout=timeout)
    return {key: [r[key] for r in per_rank] for key in plan}


class KnownGap(AssertionError):
    """A case failed the way its ``xfail(strict=True, raises=KnownGap)`` marker says it does."""


def expect(results: dict, module: str, case_id: str, gap: str | None = None) -> None:
    """Fail with the first failing rank's traceback if ``case_id`` of ``module`` failed on any rank.

    ``gap``: the case is a known gap (marked ``xfail(strict=True, raises=KnownGap)``); its failure must
    contain this text on a failing rank, and then raises :class:`KnownGap` (any other failure an
    ``AssertionError``, which the marker does not accept).
    """
    outcome = results[(module, case_id)]
    failed = [(r, tb) for r, tb in enumerate(outcome) if tb is not None]
    if failed:
        rank, tb = failed[0]
        message = f"{case_id} failed on rank(s) {[r for r, _ in failed]}; rank {rank}:\n{tb}"
        if gap is not None and gap in tb:
            raise KnownGap(message)
        raise AssertionError(message)
