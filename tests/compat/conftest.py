"""tests/compat: ``slow``-marked ports run only when asked (``FLEXSPEED_SLOW=1`` or ``-m slow``; see tests/conftest.py).

The default suite keeps DeepSpeed's ported tests inside its time budget; the slower
parametrisations (more ZeRO stages, 4-rank groups, the DeepSpeedExamples scripts) are one
environment variable away: ``FLEXSPEED_SLOW=1 python -m pytest tests/compat``.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ranks2(tmp_path_factory):
    """Outcomes of every collected file's 2-rank cases, run in one spawned group (see _ranks.py)."""
    from tests.compat._ranks import run_group

    return run_group(2, str(tmp_path_factory.mktemp("ranks2")))


@pytest.fixture(scope="session")
def ranks4(tmp_path_factory):
    """Outcomes of every collected file's 4-rank cases, run in one spawned group."""
    from tests.compat._ranks import run_group

    return run_group(4, str(tmp_path_factory.mktemp("ranks4")))
