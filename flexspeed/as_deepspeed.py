"""``python -m flexspeed.as_deepspeed script.py [args...]``: run a script with flexspeed as its DeepSpeed.

Inside the script (and the processes it starts), ``import deepspeed`` is flexspeed's compatibility
layer and ``importlib.metadata.version("deepspeed")`` reports ``0.19.8+flexspeed.<version>``, so Hugging
Face's Trainer (``deepspeed=ds_config.json``), Accelerate's DeepSpeed plugin and Lightning's DeepSpeed
strategy run on flexspeed. ``-m module`` runs a module instead of a file. Nothing is installed: see
:mod:`flexspeed.integrations.identity`. Several processes: ``flexspeed launch --as-deepspeed ...``.
"""

from __future__ import annotations

import os
import runpy
import sys

__all__ = ["main"]

_USAGE = "usage: python -m flexspeed.as_deepspeed [-m module | script.py] [args ...]"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_USAGE + "\n\n" + (__doc__ or "").strip(), file=sys.stderr if not argv else sys.stdout)
        return 2 if not argv else 0
    module = argv[0] == "-m"
    if module:
        argv = argv[1:]
        if not argv:
            print(_USAGE, file=sys.stderr)
            return 2
    target = argv[0]
    if not module and not os.path.isfile(target):
        print(f"flexspeed.as_deepspeed: script {target!r} does not exist (use -m to run a module)", file=sys.stderr)
        return 2
    from flexspeed.integrations.identity import activate

    activate()
    sys.argv = [target, *argv[1:]]
    if module:
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    else:
        sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
        runpy.run_path(target, run_name="__main__")
    return 0


if __name__ == "__main__":
    sys.exit(main())
