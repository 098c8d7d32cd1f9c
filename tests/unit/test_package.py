"""Package-level promises: cheap import, lazy public API, torch version gate, CLI help."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_import_flexspeed_does_not_import_torch():
    code = "import sys, flexspeed; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_public_api_names():
    import flexspeed

    for name in ("initialize", "init_distributed", "add_config_arguments", "ConfigError", "comm"):
        assert getattr(flexspeed, name) is not None
    with pytest.raises(AttributeError):
        flexspeed.does_not_exist  # noqa: B018


@pytest.mark.parametrize("version,ok", [("2.13.0+cpu", True), ("2.10.0", True), ("2.9.1", False),
                                        ("1.13.1+cu117", False), ("2.11.0a0+git", True)])
def test_torch_version_gate(version, ok):
    from flexspeed._torch_check import check_torch_version

    if ok:
        check_torch_version(version)
    else:
        with pytest.raises(RuntimeError, match="flexspeed needs torch >= 2.10"):
            check_torch_version(version)


def test_cli_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "flexspeed", "--help"], capture_output=True, text=True, check=True)
    assert "check-config" in out.stdout and "report" in out.stdout


def test_report_json():
    import json

    out = subprocess.run([sys.executable, "-m", "flexspeed", "report", "--json"], capture_output=True, text=True,
                         check=True)
    info = json.loads(out.stdout)
    assert info["backends"]["gloo"] is True and info["torch"].startswith("2.")
