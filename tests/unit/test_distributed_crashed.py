"""``flexspeed.distributed.crashed()``: set by the excepthook ``init_distributed`` installs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap


def test_crashed_is_set_by_an_uncaught_exception():
    # a subprocess: init_distributed installs a process-wide excepthook (autosave's exit flush reads crashed())
    script = textwrap.dedent("""
        import sys, flexspeed, flexspeed.distributed as d
        flexspeed.init_distributed()
        print("before", d.crashed())
        try:
            raise ValueError("boom")
        except ValueError as e:
            sys.excepthook(type(e), e, e.__traceback__)
        print("after", d.crashed())
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert "before False" in proc.stdout and "after True" in proc.stdout, proc.stdout + proc.stderr
