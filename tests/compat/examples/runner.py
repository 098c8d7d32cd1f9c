"""Run a DeepSpeedExamples script on flexspeed with only its ``deepspeed`` imports changed.

``run_script(path, argv, setup)`` reads the script, rewrites its imports of ``deepspeed``
(``import deepspeed`` -> ``import flexspeed as deepspeed``, ``from deepspeed.x import y`` ->
``from flexspeed.x import y``, ``import deepspeed.comm as dist`` -> ``import flexspeed.comm as
dist``) and nothing else, installs the stand-ins of ``_fakes.py`` (data of the real shapes, no
download), sets ``sys.argv`` and runs it as ``__main__``. ``setup`` names the per-script plumbing:

- ``pipeline``: ``torch.cuda.set_device`` is a no-op (the script calls it unconditionally; this
  machine has no GPU); fake torchvision.
- ``cifar``: fake torchvision.
- ``hello``: fake ``datasets``/``fire``/``loguru``/``pytz``/``sh`` and a local tokenizer. The
  script names its experiment directory from numpy's random letters (it seeds numpy itself) and
  the current second, on every rank, before any process group exists; the fake ``pytz`` makes
  that second a fixed one, so every rank names the same directory (see ``_fakes._FixedClock``).

The scripts themselves are not in this repository: ``DSEXAMPLES_DIR`` (a DeepSpeedExamples
checkout) points at them. Without it the tests run ``repro_*.py``, short reproductions of each
script's DeepSpeed calls (see PORTING.md).
"""

from __future__ import annotations

import os
import re
import runpy
import sys
import tempfile

_IMPORTS = [
    (re.compile(r"^(\s*)import deepspeed\.comm as (\w+)\s*$", re.M), r"\1import flexspeed.comm as \2"),
    (re.compile(r"^(\s*)import deepspeed\s*$", re.M), r"\1import flexspeed as deepspeed"),
    (re.compile(r"^(\s*)from deepspeed(\.[\w.]+)? import ", re.M), r"\1from flexspeed\2 import "),
]


def rewrite_imports(source: str) -> tuple[str, int]:
    """The script with its deepspeed imports pointing at flexspeed; and how many lines changed."""
    changed = 0
    for pattern, replacement in _IMPORTS:
        source, n = pattern.subn(replacement, source)
        changed += n
    return source, changed


def _setup(kind: str) -> None:
    from tests.compat.examples import _fakes

    if kind in ("pipeline", "cifar"):
        _fakes.install_torchvision()
    if kind == "pipeline":
        import torch

        torch.cuda.set_device = lambda *a, **k: None
    if kind == "hello":
        _fakes.install_hello_deepspeed_modules()


def _watch_engines() -> list:
    """Keep every engine ``flexspeed.initialize`` returns (to report its counters after the script)."""
    import flexspeed
    import flexspeed.runtime.initialize as init_module

    engines: list = []
    original = init_module.initialize

    def initialize(*args, **kwargs):
        out = original(*args, **kwargs)
        engines.append(out[0])
        return out

    flexspeed.initialize = init_module.initialize = initialize
    return engines


def run_script(path: str, argv: list[str], setup: str, sizes: dict | None = None) -> dict:
    """Run ``path`` (rewritten) as ``__main__`` with ``argv``; return what it did: the number of import
    lines changed, its global names, and per engine it built ``(type, global_steps, skipped_steps,
    world size)``."""
    from tests.compat.examples import _fakes

    if sizes:
        _fakes.SIZES.update(sizes)
    _setup(setup)
    engines = _watch_engines()
    with open(path) as f:
        source, changed = rewrite_imports(f.read())
    if changed == 0:
        raise ValueError(f"{path}: no deepspeed import to change")
    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as tmp:
        tmp.write(source)
    sys.argv = [path, *argv]
    try:
        result = runpy.run_path(tmp.name, run_name="__main__")
    finally:
        os.unlink(tmp.name)
    return {"imports_changed": changed, "names": sorted(k for k in result if not k.startswith("_")),
            "engines": [(type(e).__name__, int(e.global_steps), int(e.skipped_steps), int(e.world_size))
                        for e in engines]}


def run_rank(rank: int, world: int, path: str, argv: list[str], setup: str, sizes: dict | None = None) -> dict:
    """``run_script`` on one rank of a ``flexspeed.testing.run_ranks`` group."""
    import torch.distributed as dist

    out = run_script(path, argv, setup, sizes)
    out["process_group_left"] = dist.is_initialized()
    return out
