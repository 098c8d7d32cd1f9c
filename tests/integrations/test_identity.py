"""The opt-in DeepSpeed identity (``python -m flexspeed.as_deepspeed``, ``flexspeed launch --as-deepspeed``):
``import deepspeed`` is flexspeed's compatibility layer there, the version checks of transformers, accelerate
and Lightning accept the reported distribution, children inherit it, and nothing changes without it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(argv: list[str], env: dict | None = None, python: str = sys.executable, timeout: float = 240
         ) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    full.pop("FLEXSPEED_AS_DEEPSPEED", None)
    return subprocess.run([python, *argv], env=full, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


CHECKS = textwrap.dedent('''
    import importlib.metadata, importlib.util, json, subprocess, sys
    out = {}
    import deepspeed
    out["module"] = deepspeed.__name__
    out["version"] = importlib.metadata.version("deepspeed")
    out["__version__"] = deepspeed.__version__
    from transformers.integrations.deepspeed import is_deepspeed_available
    from transformers.dependency_versions_check import dep_version_check
    dep_version_check("deepspeed")  # raises if the version does not satisfy transformers' pin
    out["transformers"] = is_deepspeed_available()
    from accelerate.utils import is_deepspeed_available as acc_available
    from accelerate.utils.versions import compare_versions
    out["accelerate"] = acc_available() and compare_versions("deepspeed", ">=", "0.14.4")
    try:
        from lightning.fabric.strategies.deepspeed import _DEEPSPEED_AVAILABLE, _DEEPSPEED_GREATER_EQUAL_0_16
        out["lightning"] = bool(_DEEPSPEED_AVAILABLE) and bool(_DEEPSPEED_GREATER_EQUAL_0_16)
    except ImportError:
        out["lightning"] = None
    import torch, torch.distributed as dist
    with deepspeed.zero.Init():  # DeepSpeed's Init starts torch.distributed (one process here)
        layer = torch.nn.Linear(3, 2)
    out["init_dist"] = dist.is_initialized() and dist.get_world_size() == 1
    out["placeholder"] = [tuple(layer.weight.shape), tuple(layer.weight.ds_shape), layer.weight.device.type]
    layer.cpu()
    from deepspeed.runtime.zero import partition_parameters as pp
    import flexspeed.zero
    import deepspeed.runtime.zero.partition_parameters as pp2
    out["same_init"] = (pp.Init is deepspeed.zero.Init and issubclass(pp.Init, flexspeed.zero.Init)
                        and pp.GatheredParameters is flexspeed.zero.GatheredParameters and pp2 is pp)
    out["spec_kept"] = sys.modules["flexspeed.zero"].__spec__.name == "flexspeed.zero"
    child = subprocess.run([sys.executable, "-c", "import deepspeed; print(deepspeed.__name__)"],
                           capture_output=True, text=True)
    out["child"] = child.stdout.strip()
    try:
        import deepspeed.no_such_module  # noqa: F401
    except ModuleNotFoundError as e:
        out["missing"] = str(e)
    print("RESULT" + json.dumps(out))
''')


def _result(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stdout + proc.stderr
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def test_as_deepspeed_identity(tmp_path):
    script = tmp_path / "checks.py"
    script.write_text(CHECKS)
    out = _result(_run(["-m", "flexspeed.as_deepspeed", str(script)]))
    assert out["module"] == "flexspeed.integrations.deepspeed"
    assert out["version"].startswith("0.19.8+flexspeed.") and out["__version__"] == out["version"]
    assert out["transformers"] and out["accelerate"] and out["lightning"] in (True, None)
    assert out["same_init"] and out["spec_kept"]
    assert out["init_dist"] and out["placeholder"] == [[0], [2, 3], "cpu"]  # (JSON lists)
    assert out["child"] == "flexspeed.integrations.deepspeed"  # children inherit the identity
    assert "compatibility layer has no such module" in out["missing"]


def test_identity_folder_removed_at_exit(tmp_path):
    script = tmp_path / "where.py"
    script.write_text("import os; print('DIR', os.environ['FLEXSPEED_AS_DEEPSPEED'])")
    proc = _run(["-m", "flexspeed.as_deepspeed", str(script)])
    assert proc.returncode == 0, proc.stderr
    folder = proc.stdout.split("DIR ", 1)[1].strip()
    assert folder and not os.path.exists(folder)


def test_without_the_flag_nothing_changes():
    code = ("import importlib.util, importlib.metadata as m, json\n"
            "spec = importlib.util.find_spec('deepspeed')\n"
            "try: v = m.version('deepspeed')\n"
            "except m.PackageNotFoundError: v = None\n"
            "import flexspeed, flexspeed.zero, flexspeed.runtime.engine\n"
            "print('RESULT' + json.dumps({'origin': spec.origin if spec else None, 'version': v}))")
    out = _result(_run(["-c", code]))
    assert out["version"] is None or "flexspeed" not in out["version"]
    assert out["origin"] is None or "flexspeed" not in out["origin"]


DSVENV = Path("/work/dsvenv/bin/python")


@pytest.mark.skipif(not DSVENV.exists(), reason="needs a Python with the real DeepSpeed installed")
def test_real_deepspeed_beside_is_untouched(tmp_path):
    """With a real DeepSpeed installed, a plain process sees it; one under the identity sees flexspeed."""
    code = "import importlib.metadata as m; print('RESULT' + __import__('json').dumps(m.version('deepspeed')))"
    plain = _run(["-c", code], python=str(DSVENV))
    assert plain.returncode == 0 and "flexspeed" not in _result(plain)
    script = tmp_path / "v.py"
    script.write_text(code)
    shadowed = _run(["-m", "flexspeed.as_deepspeed", str(script)], python=str(DSVENV))
    if shadowed.returncode != 0 and "No module named" in shadowed.stderr:
        pytest.skip(f"the DeepSpeed Python cannot import flexspeed's dependencies: {shadowed.stderr[-200:]}")
    assert "+flexspeed." in _result(shadowed)


def test_launch_as_deepspeed_two_workers(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text("import os, deepspeed, importlib.metadata as m\n"
                      "open(os.path.join(os.path.dirname(__file__), 'r' + os.environ['RANK']), 'w').write("
                      "deepspeed.__name__ + ' ' + m.version('deepspeed'))\n")
    proc = _run(["-m", "flexspeed", "launch", "--nproc-per-node", "2", "--as-deepspeed", str(script)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for r in (0, 1):
        name, version = (tmp_path / f"r{r}").read_text().split()
        assert name == "flexspeed.integrations.deepspeed" and "+flexspeed." in version
    plain = _run(["-m", "flexspeed", "launch", "--nproc-per-node", "1", str(script)])
    assert plain.returncode != 0 and "No module named 'deepspeed'" in plain.stdout + plain.stderr


def test_stale_identity_folder_of_a_killed_maker_is_removed_next_start(tmp_path):
    """SIGKILL runs no exit handler, so the maker's folder stays; the next start removes it (maker gone), and keeps
    a live maker's folder, a folder without an owner file and a symlink named like one."""
    import signal

    from flexspeed.integrations.identity import remove_stale_identity_dirs

    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(tmp_path)}
    env.pop("FLEXSPEED_AS_DEEPSPEED", None)
    code = ("import os, signal, sys\nfrom flexspeed.integrations.identity import activate\n"
            "print(activate(), flush=True)\n"
            "sys.stdin.readline() if len(sys.argv) > 1 else os.kill(os.getpid(), signal.SIGKILL)\n")
    live = subprocess.Popen([sys.executable, "-c", code, "wait"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        kept = live.stdout.readline().strip()
        killed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        assert killed.returncode == -signal.SIGKILL
        stale = killed.stdout.strip()
        assert os.path.isdir(stale) and os.path.dirname(stale) == str(tmp_path)
        (tmp_path / "flexspeed-as-deepspeed-noowner").mkdir()
        os.symlink(stale, tmp_path / "flexspeed-as-deepspeed-link")
        assert remove_stale_identity_dirs(str(tmp_path)) == [stale]
        assert not os.path.exists(stale) and os.path.isdir(kept)
        assert (tmp_path / "flexspeed-as-deepspeed-noowner").is_dir()
        assert os.path.islink(tmp_path / "flexspeed-as-deepspeed-link")
        # the next start does it by itself
        again = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
        stale2 = again.stdout.strip()
        assert os.path.isdir(stale2)
        fresh = subprocess.run([sys.executable, "-c", "from flexspeed.integrations.identity import activate; "
                                "print(activate())"], capture_output=True, text=True, env=env, timeout=120)
        assert fresh.returncode == 0, fresh.stderr
        assert not os.path.exists(stale2) and os.path.isdir(kept)
    finally:
        live.stdin.write("\n")
        live.stdin.close()
        live.wait(timeout=60)
    assert not os.path.exists(kept)  # its maker exited normally
