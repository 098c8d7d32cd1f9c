"""tests/compat: ``slow``-marked ports run only when asked (``FLEXSPEED_SLOW=1`` or ``-m slow``).

The default suite keeps DeepSpeed's ported tests inside its time budget; the slower
parametrisations (more ZeRO stages, 4-rank groups, the DeepSpeedExamples scripts) are one
environment variable away: ``FLEXSPEED_SLOW=1 python -m pytest tests/compat``.
"""

from __future__ import annotations

import os

import pytest


def pytest_collection_modifyitems(config, items):
    if os.environ.get("FLEXSPEED_SLOW") == "1" or "slow" in (config.getoption("-m") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with FLEXSPEED_SLOW=1 (or -m slow)")
    for item in items:
        if "slow" in item.keywords and item.path.is_relative_to(os.path.dirname(__file__)):
            item.add_marker(skip)
