#!/usr/bin/env bash
# The GPU check: one prepared run on a machine with an NVIDIA GPU (issue "validate every CUDA path").
#
#   bash scripts/gpu_check.sh [SECTIONS]      SECTIONS: comma list of tests,train,decode,offload (default: all)
#
# Writes to $OUT (default /tmp/gpu_check): env.txt (GPU, driver, versions), tests.log and junit.xml (the
# tests/gpu tier), bench.log and bench.json (benchmarks/gpu.py), summary.txt. The tests run beside the
# benchmarks (the tier is small kernels on a few cores; the benchmarks time side by side within their own
# process) unless SERIAL=1. Packages the machine lacks (pydantic, hjson, deepspeed for the comparison) are installed from
# wheels in .whl/ when that folder exists (no network needed); the machine's own CUDA build of torch is used.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
SECTIONS=${1:-tests,train,decode,offload}
TEST_LIMIT=${TEST_LIMIT:-300}
BENCH_LIMIT=${BENCH_LIMIT:-330}
mkdir -p "$OUT"
T0=$(date +%s)
export PYTHONUNBUFFERED=1 PIP_DISABLE_PIP_VERSION_CHECK=1 TOKENIZERS_PARALLELISM=false
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    > "$OUT/pip.log" 2>&1 || echo "wheel install failed (see pip.log)" >> "$OUT/summary.txt"
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
{
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1
  python3 - <<'PY'
import importlib, platform, torch
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "nccl", ".".join(map(str, torch.cuda.nccl.version())) if torch.cuda.is_available() else None)
for name in ("transformers", "accelerate", "safetensors", "pydantic", "deepspeed", "flexspeed"):
    try:
        mod = importlib.import_module(name)
        print(name, getattr(mod, "__version__", "?"), getattr(mod, "__file__", ""))
    except Exception as exc:
        print(name, "MISSING", type(exc).__name__, exc)
PY
  nproc; free -g | head -2
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

pids=()
if [[ ",$SECTIONS," == *",tests,"* ]]; then
  XDIST=""
  python3 -c "import xdist" 2>/dev/null && XDIST="-n 4 --dist loadfile"
  ( timeout "$TEST_LIMIT" python3 -m pytest tests/gpu tests/unit/test_decode_graphs.py -v -rfEs -p no:cacheprovider \
      $XDIST --junitxml "$OUT/junit.xml" > "$OUT/tests.log" 2>&1
    echo "tests: exit $? after $(( $(date +%s) - T0 )) s" >> "$OUT/summary.txt" ) &
  pids+=($!)
fi
# SERIAL=1: the benchmarks start after the tests (clean timings; the run takes longer)
[[ "${SERIAL:-0}" == 1 && ${#pids[@]} -gt 0 ]] && wait "${pids[@]}"
BENCH=$(echo "$SECTIONS" | tr ',' '\n' | grep -v '^tests$' | paste -sd, -)
if [[ -n "$BENCH" ]]; then
  ( timeout "$BENCH_LIMIT" python3 benchmarks/gpu.py --sections "$BENCH" --json "$OUT/bench.json" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
    echo "bench ($BENCH): exit $? after $(( $(date +%s) - T0 )) s" >> "$OUT/summary.txt" ) &
  pids+=($!)
fi
for p in "${pids[@]}"; do wait "$p"; done
{
  echo "== tests"; grep -E "^(FAILED|ERROR|SKIPPED)|passed|failed" "$OUT/tests.log" 2>/dev/null | tail -40
  echo "== bench"; sed -n '/^## /,$p' "$OUT/bench.log" 2>/dev/null
  grep -E "Error|error" "$OUT/bench.log" 2>/dev/null | tail -15
} >> "$OUT/summary.txt"
cat "$OUT/summary.txt"
