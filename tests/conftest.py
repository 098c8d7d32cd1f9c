import json
import os
import subprocess
import sys

import pytest

# Keep each test process to one intra-op thread: CI has 2 cores and spawns several ranks.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_configure(config):
    """``-m slow`` selects the slow tier: it also sets FLEXSPEED_SLOW=1 for spawned rank groups."""
    if "slow" in (config.getoption("-m") or "") and "not slow" not in config.getoption("-m"):
        os.environ["FLEXSPEED_SLOW"] = "1"


def pytest_collection_modifyitems(config, items):
    """The default suite (CI) skips ``slow``-marked tests; ``FLEXSPEED_SLOW=1`` or ``-m slow`` runs them."""
    if os.environ.get("FLEXSPEED_SLOW") == "1":
        return
    skip = pytest.mark.skip(reason="slow tier: run with FLEXSPEED_SLOW=1 (or -m slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def portable_build(tmp_path):
    """``run(script, folder)``: ``script`` in a subprocess whose native kernel is built for generic
    x86-64 (the plain-C path) into a fresh cache, with ``folder`` first on ``sys.path`` (so it can
    import the calling test module); returns the JSON its last output line holds."""

    def run(script: str, folder: str):
        env = dict(os.environ, FLEXSPEED_NATIVE_MARCH="x86-64", FLEXSPEED_CACHE_DIR=str(tmp_path / "cache"))
        code = f"import sys; sys.path.insert(0, {folder!r})\n" + script
        res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert res.returncode == 0, res.stderr[-3000:]
        return json.loads(res.stdout.strip().splitlines()[-1])

    return run
