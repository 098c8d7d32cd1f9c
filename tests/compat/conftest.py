"""tests/compat: ``slow``-marked ports run only when asked (``FLEXSPEED_SLOW=1`` or ``-m slow``).

The default suite keeps DeepSpeed's ported tests inside its time budget; the slower
parametrisations (more ZeRO stages, 4-rank groups, the DeepSpeedExamples scripts) are one
environment variable away: ``FLEXSPEED_SLOW=1 python -m pytest tests/compat``.
"""

from __future__ import annotations

import os

import pytest


def pytest_configure(config):
    if "slow" in (config.getoption("-m") or "") and "not slow" not in config.getoption("-m"):
        os.environ["FLEXSPEED_SLOW"] = "1"  # the spawned rank groups register their slow cases too


def pytest_collection_modifyitems(config, items):
    if os.environ.get("FLEXSPEED_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow: run with FLEXSPEED_SLOW=1 (or -m slow)")
    for item in items:
        if "slow" in item.keywords and item.path.is_relative_to(os.path.dirname(__file__)):
            item.add_marker(skip)


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
