"""Package-level promises: cheap import, lazy public API, torch version gate, CLI help."""

from __future__ import annotations

import subprocess
import sys

import pytest


def test_import_flexspeed_does_not_import_torch():
    code = "import sys, flexspeed; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_every_name_in_all_resolves():
    """Each name in flexspeed.__all__ resolves in a fresh interpreter (a missing module fails here)."""
    code = ("import flexspeed\n"
            "for name in flexspeed.__all__:\n"
            "    assert getattr(flexspeed, name) is not None, name\n"
            "print(len(flexspeed.__all__))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    import flexspeed

    assert int(out.stdout) == len(flexspeed.__all__) and set(flexspeed.__all__) <= set(dir(flexspeed))


@pytest.mark.parametrize("path", [
    "flexspeed.checkpointing", "flexspeed.utils", "flexspeed.utils.zero_to_fp32", "flexspeed.accelerator",
    "flexspeed.runtime.lr_schedules", "flexspeed.ops.adam", "flexspeed.runtime.pipe.topology",
    "flexspeed.runtime.utils", "flexspeed.runtime.config", "flexspeed.runtime.activation_checkpointing.checkpointing",
])
def test_deepspeed_module_paths_import(path):
    """``import flexspeed.X`` where a DeepSpeed script writes ``import deepspeed.X`` / ``deepspeed.X.name``."""
    import importlib

    import flexspeed

    if path == "flexspeed.checkpointing":  # an attribute in DeepSpeed too (deepspeed/__init__ imports it)
        assert flexspeed.checkpointing.__name__ == "flexspeed.runtime.activation_checkpointing.checkpointing"
        return
    module = importlib.import_module(path)
    for name in getattr(module, "__all__", []):
        assert getattr(module, name) is not None, f"{path}.{name}"


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


def _package_sources():
    import pathlib

    import flexspeed

    root = pathlib.Path(flexspeed.__file__).parent
    return root, sorted(root.rglob("*.py"))


def test_no_private_name_imported_across_flexspeed_modules():
    """One concept, one owner: a name another module needs is public in its home module (DESIGN.md section 6).
    Third-party private names (torch, lightning) are outside this rule."""
    import ast

    root, files = _package_sources()
    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("flexspeed")):
                private = [a.name for a in node.names if a.name.startswith("_") and not a.name.startswith("__")]
                if private:
                    found.append(f"{path.relative_to(root)}:{node.lineno} imports {private} from "
                                 f"{'.' * node.level}{node.module or ''}")
    assert not found, "\n".join(found)


def test_no_library_file_over_600_lines():
    root, files = _package_sources()
    long = {str(p.relative_to(root)): n for p in files if (n := len(p.read_text().splitlines())) > 600}
    assert not long, f"split these by concern: {long}"
