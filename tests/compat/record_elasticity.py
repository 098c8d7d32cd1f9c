"""Record DeepSpeed's elastic batch-size arithmetic (``compute_elastic_config``) for a grid of configs.

DeepSpeed 0.19.8 removed elastic training (its config refuses the ``elasticity`` section), so the
reference is the last source that shipped it: ``deepspeed/elasticity/{elasticity,config,constants}.py``
of DeepSpeed's repository as of commit edaa7221 (version 0.19.6 in development, after #8237 "Keep the
elastic batch size within max_train_batch_size"). Copy those three files into a directory, then run,
with an environment that has numpy and packaging (e.g. DeepSpeed 0.19.8's venv):

    /work/dsvenv/bin/python tests/compat/record_elasticity.py DIR [--out PATH]

The files are imported as a small stand-alone package (with stand-ins for DeepSpeed's version and
logger modules); nothing of DeepSpeed is committed. The JSON (``fixtures/elasticity.json``) holds
every case's section and world size next to DeepSpeed's result - ``[batch, valid_world_sizes]`` or
``[batch, valid_world_sizes, micro]`` - or the exception it raised; ``tests/unit/test_elasticity.py``
replays them through :mod:`flexspeed.config.elasticity`.
"""

from __future__ import annotations

import argparse
import importlib
import itertools
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "elasticity.json"
SOURCE_COMMIT = "edaa7221267243c7be7fb49c5d5f5c4fb97b4641"


def cases() -> list[dict]:
    """The grid: sections (versions 0.1 and 0.2) x world sizes, deterministic."""
    out = []
    for max_batch, micros, (lo, hi), prefer in itertools.product(
            (16, 100, 2000), ([2], [2, 4], [2, 4, 6], [3, 5], [1, 8]), ((1, 10000), (2, 8), (1, 4)), (True, False)):
        base = {"enabled": True, "max_train_batch_size": max_batch, "micro_batch_sizes": micros, "min_gpus": lo,
                "max_gpus": hi, "prefer_larger_batch": prefer}
        sections = [{**base, "version": 0.1}] + [{**base, "version": 0.2, "num_gpus_per_node": n} for n in (1, 2)]
        for section in sections:
            worlds = ([0] if section["version"] == 0.1 else []) + [1, 2, 3, 4, 8]
            out += [{"section": section, "world_size": w} for w in worlds]
    return out


def _load(src: Path):
    root = Path(tempfile.mkdtemp())
    pkg = root / "dsref"
    (pkg / "elasticity").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "git_version_info.py").write_text("version = '0.19.6'\n")
    (pkg / "utils.py").write_text("import logging\nlogger = logging.getLogger('dsref')\n")
    (pkg / "elasticity" / "__init__.py").write_text("")
    for name in ("elasticity.py", "config.py", "constants.py"):
        shutil.copy(src / name, pkg / "elasticity" / name)
    sys.path.insert(0, str(root))
    return importlib.import_module("dsref.elasticity.elasticity")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", type=Path, help="directory with DeepSpeed's elasticity.py, config.py, constants.py")
    parser.add_argument("--out", type=Path, default=FIXTURE)
    args = parser.parse_args()
    os.environ.pop("WORLD_SIZE", None)
    os.environ.pop("DEEPSPEED_ELASTICITY_CONFIG", None)
    ref = _load(args.source)
    records = []
    for case in cases():
        try:
            got = ref.compute_elastic_config({"elasticity": case["section"]}, "0.19.6", world_size=case["world_size"])
            record = {**case, "result": [int(got[0]), [int(g) for g in got[1]], *[int(m) for m in got[2:]]]}
        except Exception as e:  # noqa: BLE001 - DeepSpeed's refusals are part of the reference
            record = {**case, "error": type(e).__name__}
        records.append(record)
    lines = ",\n".join(json.dumps(r, separators=(",", ":")) for r in records)  # one case per line
    args.out.write_text(f'{{"source": "DeepSpeed {SOURCE_COMMIT} deepspeed/elasticity", "cases": [\n{lines}\n]}}\n')
    print(f"wrote {len(records)} cases ({sum('error' in r for r in records)} errors) to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
