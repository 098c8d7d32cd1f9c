"""``flexspeed report`` runs what it reports: probes pass here, a failing probe is shown as such with
its reason and makes the exit code 1, a missing optional package comes with its install command."""

from __future__ import annotations

import json

import pytest

import flexspeed.cli.report as report
from flexspeed.cli.main import main


def test_probes_pass_on_this_machine() -> None:
    assert "weights equal" in report.probe_checkpoint()  # two real ranks: save, load, compare
    assert "equal torch" in report.probe_native()
    assert "one step" in report.probe_training()


def test_failing_probe_and_missing_package_are_reported(monkeypatch, capsys) -> None:
    def broken() -> str:
        raise RuntimeError("not built: no C compiler on PATH")

    monkeypatch.setattr(report, "PROBES", {"native CPU kernel": broken, "fine": lambda: "ok"})
    monkeypatch.setitem(report.OPTIONAL, "no_such_package_xyz", ("something", "pip install no-such-package-xyz"))
    assert main(["report"]) == 1
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("native CPU kernel"))
    assert "[FAIL]" in line and "no C compiler" in line
    assert "pip install no-such-package-xyz" in out
    assert main(["report", "--json"]) == 1
    info = json.loads(capsys.readouterr().out)
    assert info["probes"]["fine"]["ok"] and not info["probes"]["native CPU kernel"]["ok"]
    assert info["optional"]["no_such_package_xyz"]["installed"] is False


def test_quick_skips_probes(monkeypatch, capsys) -> None:
    monkeypatch.setattr(report, "PROBES", {"never": lambda: pytest.fail("probe ran under --quick")})
    assert main(["report", "--quick", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["probes"] == {}
