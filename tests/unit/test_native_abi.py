"""The native library's declared ABI (csrc/fs_abi.h) and its failure paths.

- The header, the ctypes table in native.py and the compiled library name the same exports.
- A library whose version or struct sizes differ from the ctypes mirrors is refused with an error
  that names what differs and how to fix it.
- Negative status codes raise (out of memory, an id out of range) instead of falling back.
- No compiler (CC=/nonexistent): one warning naming the compiler and the fix; `flexspeed report`
  shows the same; a failed build names the command.
- The adaptive thread count (and waits that sleep at once) give the same tokens as the torch path.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from flexspeed.inference import native, native_abi

needs_lib = pytest.mark.skipif(native.library() is None, reason="no C compiler: the native kernel is not built")


def test_header_and_ctypes_table_name_the_same_exports() -> None:
    assert sorted(native.header_exports()) == sorted(native.EXPORTS)


@needs_lib
@pytest.mark.skipif(shutil.which("nm") is None, reason="needs nm")
def test_library_exports_exactly_the_header() -> None:
    out = subprocess.run(["nm", "-D", "--defined-only", native.library()._name], capture_output=True, text=True,
                         check=True).stdout
    exported = sorted(line.split()[-1] for line in out.splitlines() if line.split()[-1].startswith("fs_"))
    assert exported == sorted(native.EXPORTS)


@needs_lib
def test_loaded_library_matches_the_mirrors() -> None:
    lib = native.library()
    native.check_abi(lib)
    assert lib.fs_abi_version() == native.ABI_VERSION
    assert [lib.fs_struct_size(i) for i in range(len(native.STRUCTS))] == [ctypes.sizeof(c) for c in native.STRUCTS]
    assert lib.fs_struct_size(len(native.STRUCTS)) == -1
    assert native.status()["state"] == "ok"


class _FakeLib:
    """A library stand-in reporting a given version and struct sizes."""

    def __init__(self, version: int, sizes: list[int]) -> None:
        self._name = "fake.so"
        for name in native.EXPORTS:
            setattr(self, name, lambda *a: 0)
        self.fs_abi_version = lambda: version
        self.fs_struct_size = lambda i: sizes[i]


def test_version_mismatch_is_a_clear_error() -> None:
    sizes = [ctypes.sizeof(c) for c in native.STRUCTS]
    old = native.ABI_VERSION - 1
    with pytest.raises(native.NativeABIError,
                       match=rf"fake.so has ABI version {old}, .*expects {native.ABI_VERSION}.*FS_ABI_VERSION"):
        native.check_abi(_FakeLib(old, sizes))


def test_struct_size_mismatch_names_the_struct() -> None:
    sizes = [ctypes.sizeof(c) for c in native.STRUCTS]
    sizes[native.STRUCTS.index(native.Layer)] += 8  # a field added on the C side only
    with pytest.raises(native.NativeABIError, match=r"Layer: C \d+ bytes, ctypes \d+.*FLEXSPEED_NATIVE=0"):
        native.check_abi(_FakeLib(native.ABI_VERSION, sizes))


@needs_lib
def test_a_mirror_out_of_step_with_the_real_library_is_refused(monkeypatch) -> None:
    class Step(ctypes.Structure):  # the mirror without its last field
        _fields_ = native.Step._fields_[:-1]

    structs = list(native.STRUCTS)
    structs[structs.index(native.Step)] = Step
    monkeypatch.setattr(native_abi, "STRUCTS", tuple(structs))
    with pytest.raises(native.NativeABIError, match=f"Step: C {ctypes.sizeof(native.Step)} bytes, ctypes {ctypes.sizeof(Step)}"):
        native.check_abi(native.library())


def test_missing_export_is_refused() -> None:
    fake = _FakeLib(native.ABI_VERSION, [ctypes.sizeof(c) for c in native.STRUCTS])
    del fake.fs_generate
    with pytest.raises(native.NativeABIError, match="lacks the exports \\['fs_generate'\\]"):
        native.check_abi(fake)


def test_negative_codes_raise() -> None:
    with pytest.raises(native.NativeOutOfMemory, match="fs_attention.*out of memory \\(code -2\\)") as info:
        native.check(-2, "fs_attention")
    assert isinstance(info.value, MemoryError)
    with pytest.raises(native.NativeError, match="a tensor-parallel rank stopped answering"):
        native.check(-4, "fs_shm_allreduce")
    assert native.check(7, "fs_generate") == 7


@needs_lib
def test_kernel_errors_raise_instead_of_falling_back() -> None:
    """Real calls that the kernel refuses: an id outside a quantized table, rows outside a weight."""
    from flexspeed.inference.quant import QuantLinear

    q = QuantLinear.from_linear(torch.nn.Linear(64, 10), 8)
    assert torch.equal(native.gather_rows(q, torch.tensor([0, 9])), q.dequantize().float()[[0, 9]])
    with pytest.raises(IndexError, match=r"fs_rows \(ids in \[0, 10\] of a 10-row table\).*code -3"):
        native.gather_rows(q, torch.tensor([0, 10]))
    with pytest.raises(native.NativeIndexError, match="fs_dequant_rows"):
        native.dequant_rows(q, 5, 12, torch.float32)


def _report_native(monkeypatch, capsys) -> tuple[str, dict]:
    from flexspeed.cli import report

    monkeypatch.setattr(report, "PROBES", {"native CPU kernel": report.probe_native})
    rc = report.run(argparse.Namespace(json=False, quick=False))
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("native CPU kernel"))
    return line, {"rc": rc}


def test_missing_compiler_warns_once_and_report_shows_it(monkeypatch, tmp_path, capsys) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("FLEXSPEED_CACHE_DIR", str(tmp_path))
    native.library.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert native.library() is None
            assert native.library() is None  # cached: no second warning
            assert native.argmax_rows(torch.zeros(1, 4)) is None
        msgs = [str(w.message) for w in caught if "native decode kernel" in str(w.message)]
        assert len(msgs) == 1, msgs
        assert "$CC='/nonexistent/cc'" in msgs[0] and "apt-get install gcc" in msgs[0] and "FLEXSPEED_NATIVE=0" in msgs[0]
        st = native.status()
        assert st["state"] == "no compiler" and "/nonexistent/cc" in st["detail"]
        line, res = _report_native(monkeypatch, capsys)
        assert "[FAIL]" in line and "/nonexistent/cc" in line and "apt-get install gcc" in line and res["rc"] == 1
    finally:
        monkeypatch.undo()
        native.library.cache_clear()


@needs_lib
def test_report_probes_the_loaded_library(monkeypatch, capsys) -> None:
    line, res = _report_native(monkeypatch, capsys)
    assert "[OK]" in line and f"ABI {native.ABI_VERSION}" in line and "attention" in line and res["rc"] == 0


_ADAPTIVE_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, %r)
torch.set_num_threads(2)
from test_native import engine_for
from flexspeed.inference import native
from flexspeed.inference.kernels import get_runner
native.set_adaptive(sys.argv[1] == "on")
out = {}
for name in ("opt", "llama"):
    e = engine_for(name, "fp32", None)
    ids = torch.randint(3, 97, (2, 6), generator=torch.Generator().manual_seed(0))
    out[name] = e.generate(ids, max_new_tokens=24, min_new_tokens=24).tolist()
    get_runner(e.module).native_decode = False
    out[name + "-torch"] = e.generate(ids, max_new_tokens=24, min_new_tokens=24).tolist()
out["stats"] = native.pool_stats()
print(json.dumps(out))
"""


@needs_lib
@pytest.mark.parametrize("mode,spin_us", [("on", "50"), ("on", "0"), ("off", "0")])
def test_adaptive_threads_and_sleeping_waits_give_the_torch_tokens(mode: str, spin_us: str) -> None:
    """On the kernel's own workers (OMP_WAIT_POLICY=PASSIVE) with 2 threads: the adaptive count
    tries 2 and then 1 thread (switches > 0) and every barrier wait may sleep (spin 0 us: each
    one does); the greedy tokens equal the torch path's (fp32)."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", FLEXSPEED_NATIVE_THREADS="pool",
               FLEXSPEED_NATIVE_SPIN_US=spin_us, OMP_NUM_THREADS="2")
    res = subprocess.run([sys.executable, "-c", _ADAPTIVE_SCRIPT % os.path.dirname(__file__), mode], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["opt"] == out["opt-torch"] and out["llama"] == out["llama-torch"]
    stats = out["stats"]
    assert stats["requested"] == 2 and stats["calls"] > 40
    if mode == "on":
        assert stats["switches"] >= 1  # both thread counts ran
    else:
        assert stats["switches"] == 0 and stats["current"] == 2
    if spin_us == "0":
        assert stats["sleeps"] > 0


_CONTROLLER_SCRIPT = r"""
import ctypes, json
from flexspeed.inference import native
lib = native.library()
native.set_adaptive(True)
clock = [1000.0]  # the controller's clock, simulated: the test does not depend on how the machine schedules it

def calls(key, ms, lost, n):  # ms: milliseconds of a call on (1, 2) threads, back to back
    arr = (ctypes.c_double * 2)(*(m * 1e-3 for m in ms))
    out = []
    for _ in range(n):
        out.append(lib.fs_adapt_simulate(key, 2, arr, lost, clock[0]))
        clock[0] += arr[out[-1] - 1]
    return out

def pause(seconds):
    clock[0] += seconds

out = {}
out["idle"] = calls(1, (2.0, 1.0), 0, 300)          # 2 threads twice as fast, nothing lost
out["contended"] = calls(1, (1.6, 3.0), 10, 60)     # then every call loses slices; 2 threads slower
out["still"] = calls(1, (1.6, 3.0), 10, 100)
pause(0.05)                                         # the load stops: no lost slice for 50 ms
out["quiet"] = calls(1, (2.0, 1.0), 0, 20)
out["small"] = calls(2, (0.5, 1.0), 0, 200)         # a shape on which 1 thread wins with nothing lost
calls(4, (2.0, 1.0), 0, 20)                          # on 2 threads after its first look at 1
started = []
while len(started) < 40 and 1 not in started:       # a load: until a burst on 1 thread begins
    started += calls(4, (1.6, 3.0), 10, 1)
out["started"] = started
pause(0.05)                                         # the load goes in the middle of that burst
out["dropped"] = calls(4, (2.0, 1.0), 0, 10)
calls(5, (2.0, 1.0), 0, 20)                          # on 2 threads after its first look at 1
out["won"] = calls(5, (1.0, 3.0), 0, 40)            # 2 threads slow, nothing lost (waits woken late): 1 wins
calls(5, (1.0, 3.0), 10, 10)                         # then the load shows: its threads lose slices
pause(0.05)                                         # the load goes
out["after_fewer"] = calls(5, (2.0, 1.0), 0, 6)
print(json.dumps(out))
"""


@needs_lib
def test_adaptive_controller_follows_the_load_and_returns_when_it_stops() -> None:
    """The adaptive thread count's controller alone (fs_adapt_simulate: chosen count, simulated
    call times and lost time slices), in a fresh process: idle it looks at 1 thread once and then
    stays on 2 (no periodic look while no thread loses its core); under contention it moves to 1
    thread within a few bursts and stays; once no slice is lost for 20 ms it is back on 2 at once;
    a shape on which 1 thread won with nothing lost stays on 1 (no oscillation) until a load comes
    and goes; a re-measurement under way when the load goes is dropped."""
    res = subprocess.run([sys.executable, "-c", _CONTROLLER_SCRIPT], env=dict(os.environ, OMP_NUM_THREADS="2"),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    idle = out["idle"]
    assert idle[:2] == [2, 2] and idle.count(1) == 4 and set(idle[10:]) == {2}, idle
    contended = out["contended"]
    assert contended[:4] == [2] * 4 and contended[-20:].count(1) >= 16, contended  # a burst of 4 to look at 2
    assert out["still"].count(1) >= 88, out["still"]  # only the periodic looks at 2 threads, backing off
    assert set(out["quiet"]) == {2}, out["quiet"]
    small = out["small"]
    assert small[-100:].count(2) <= 8, small
    assert out["started"][-1] == 1 and set(out["dropped"]) == {2}, out  # the burst's rest is dropped
    # a win of fewer threads with nothing lost does not outlive a load: back on 2 at once when it goes
    assert out["won"][-12:].count(1) >= 9 and set(out["after_fewer"]) == {2}, out


@needs_lib
@pytest.mark.skipif(native.library() is None or not native.library().fs_fast_path(),
                    reason="the portable build has no fast products to measure")
def test_products_benchmark_smoke() -> None:
    """benchmarks/native_products.py builds its harness over the kernel's own source and measures
    every format against a plain read (one repetition)."""
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "native_products.py"
    spec = importlib.util.spec_from_file_location("bench_native_products", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--reps", "1", "--threads", "2"])
    assert [r["format"] for r in rows] == ["bf16", "int8", "int4 g64", "bf16 Conv1D"]
    assert all(r["products_ms"] > 0 and r["read_ms"] > 0 and r["mb"] > 60 for r in rows)
