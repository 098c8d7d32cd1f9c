"""``flexspeed serve`` as a user runs it: a real process on 127.0.0.1 answering the openai client with HF's
greedy text and stopping cleanly on Ctrl-C; one-line errors for a missing extra, a bad folder, a busy port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from tests.unit._textmodels import Reference, make_folder

pytest.importorskip("transformers")

from flexspeed.cli.main import main  # noqa: E402
from flexspeed.testing import free_port  # noqa: E402


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    return make_folder(str(tmp_path_factory.mktemp("llama")), "llama")


@pytest.mark.parametrize("offload", [False, True])
def test_serve_process_answers_and_stops_on_a_signal(llama, tmp_path, offload: bool) -> None:
    openai = pytest.importorskip("openai")
    port = free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.getcwd(), os.environ.get("PYTHONPATH", "")]))
    extra = ["--percent", "50", "50", "0", "100", "100", "0", "--gpu-batch-size", "2", "--offload-dir",
             str(tmp_path / "off")] if offload else ["--max-num-seqs", "2"]
    proc = subprocess.Popen([sys.executable, "-m", "flexspeed", "serve", "--model", llama, "--port", str(port),
                             "--served-model-name", "tiny", "--threads", "1", "--log-level", "warning", *extra],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the server did not come up within 120 s"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)
        out = client.completions.create(model="tiny", prompt="Kalo mi ne", max_tokens=10, temperature=0)
        assert out.choices[0].text == Reference(llama).text("Kalo mi ne", 10)
        proc.send_signal(signal.SIGTERM if offload else signal.SIGINT)  # either stops it cleanly
        assert proc.wait(60) == 0
        stdout, stderr = proc.communicate(timeout=10)
        assert b"Traceback" not in stderr, stderr.decode()[-3000:]
        assert f"serving 'tiny' at http://127.0.0.1:{port}/v1".encode() in stdout
        assert (b"static batching (offloaded): up to 2 requests" if offload else b"continuous batching: 2 slots") in stdout
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_serve_without_its_extra_says_which_pip_command_fixes_it(llama, monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn raises ImportError
    assert main(["serve", "--model", llama]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'flexspeed[serve]'" in err and "uvicorn" in err


def test_serve_errors_name_the_problem(llama, tmp_path, capsys) -> None:
    assert main(["serve", "--model", str(tmp_path / "nowhere"), "--port", str(free_port())]) == 2
    assert "model folder" in capsys.readouterr().err
    assert main(["serve", "--model", llama, "--max-num-seqs", "0"]) == 2
    assert "--max-num-seqs=0 must be >= 1" in capsys.readouterr().err
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["serve", "--model", llama, "--port", str(busy.getsockname()[1])]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


def test_help_reads_well(capsys) -> None:
    for name in ("serve", "generate"):
        with pytest.raises(SystemExit) as e:
            main([name, "--help"])
        assert e.value.code == 0
        out = capsys.readouterr().out
        assert "examples:" in out and f"flexspeed {name}" in out and "--max-num-seqs" in out


@pytest.mark.slow
def test_serve_benchmark_quick_run(request) -> None:
    """benchmarks/serve.py --quick end to end (about 15 s): ``pytest -m slow`` runs it."""
    if "slow" not in (request.config.getoption("markexpr") or ""):
        pytest.skip("a slow check: select it with -m slow")
    pytest.importorskip("openai")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    res = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "serve.py"), "--quick"], capture_output=True,
                         text=True, timeout=600, cwd=root)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("| serve, ")]
    assert len(rows) == 2 and all(r.rstrip(" |").endswith("2/2") for r in rows), res.stdout  # same greedy text as HF
