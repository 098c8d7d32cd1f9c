"""Every ``flexspeed`` subcommand, given bad arguments, answers with a short message that names what
is wrong and exits non-zero; never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from flexspeed.cli.main import SUBCOMMANDS, main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BAD = {  # subcommand -> (arguments, a word the message must contain)
    "demo": (["--config", "/nonexistent/ds.json", "--steps", "1"], "/nonexistent/ds.json"),
    "launch": (["--nproc-per-node", "1", "/nonexistent/train.py"], "/nonexistent/train.py"),
    "check-config": (["/nonexistent/ds.json"], "/nonexistent/ds.json"),
    "export": (["/nonexistent/ckpt", "/tmp/flexspeed-never-written.safetensors"], "/nonexistent/ckpt"),
    "plot": (["/nonexistent/monitor"], "/nonexistent/monitor"),
    "generate": (["--model", "/nonexistent/model", "--benchmark"], "/nonexistent/model"),
    "report": (["--no-such-flag"], "--no-such-flag"),
    "serve": (["--model", "/nonexistent/model"], "/nonexistent/model"),
}


def test_every_subcommand_is_covered() -> None:
    assert set(BAD) >= set(SUBCOMMANDS), set(SUBCOMMANDS) - set(BAD)


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_arguments_give_one_short_message(name: str) -> None:
    args, word = BAD[name]
    res = subprocess.run([sys.executable, "-m", "flexspeed", name, *args], capture_output=True, text=True,
                         cwd=ROOT, timeout=120, env={**os.environ, "FLEXSPEED_DEBUG": "0"})
    out = res.stdout + res.stderr
    assert res.returncode != 0, out
    assert "Traceback" not in out, out
    assert word in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) <= 4, res.stderr  # argparse: usage + one line


def test_unexpected_user_errors_are_caught_by_the_dispatcher(monkeypatch, capsys) -> None:
    """A subcommand that raises (a missing file found late, a bad value) still gives one line."""
    import flexspeed.cli.report as report

    def boom(args):
        raise FileNotFoundError("[Errno 2] No such file or directory: '/x/y'")

    monkeypatch.setattr(report, "run", boom)
    assert main(["report"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("flexspeed report: error:") and "/x/y" in err and len(err.splitlines()) == 1
    monkeypatch.setenv("FLEXSPEED_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        main(["report"])
