#!/usr/bin/env bash
# A user's first contact: `pip install .` (not editable, no extras) in a fresh venv, then the documented
# commands from outside the repository: the demo's short mode, an export of its checkpoint, the report.
# Run by .ci/run before the test suite.   bash scripts/plain_install_check.sh [WORKDIR]
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
WORK=${1:-$(mktemp -d /tmp/flexspeed-plain.XXXXXX)}
mkdir -p "$WORK"
python3 -m venv "$WORK/venv"
"$WORK/venv/bin/pip" install -q --disable-pip-version-check torch==2.13.0 "$REPO"
cd "$WORK"   # away from the checkout, so the installed package is what runs
FS="$WORK/venv/bin/flexspeed"
"$FS" demo --steps 40 --out "$WORK/demo" --timeout 600
"$FS" export "$WORK/demo/checkpoint" "$WORK/export.safetensors"
"$FS" report > "$WORK/report.txt"
"$WORK/venv/bin/python" - "$WORK" <<'PY'
import json, os, sys
work = sys.argv[1]
res = json.load(open(os.path.join(work, "demo", "results.json")))
assert os.path.getsize(os.path.join(work, "export.safetensors")) > 0
import flexspeed
assert "site-packages" in flexspeed.__file__, flexspeed.__file__  # the installed copy, not the checkout
print(f"plain install: demo accuracy {res['accuracy']:.3f}, export written, report probes passed ({flexspeed.__file__})")
PY
