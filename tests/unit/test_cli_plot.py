"""``flexspeed plot``: CSV monitor files in, a PNG of the loss and lr curves out."""

from __future__ import annotations

import importlib.util

import pytest

from flexspeed.cli.main import main
from flexspeed.cli.plot import find_run_dir, read_scalar
from flexspeed.runtime.monitor import CsvMonitor


def _run(tmp_path, job="job", steps=30):
    mon = CsvMonitor(str(tmp_path), job)
    for i in range(1, steps + 1):
        mon.write_events([("Train/Samples/train_loss", 3.0 / i, 8 * i), ("Train/Samples/lr", 1e-3 * i / steps, 8 * i)])
    return tmp_path / job


def test_read_scalar_and_find_run_dir(tmp_path):
    run_dir = _run(tmp_path)
    steps, values = read_scalar(str(run_dir), "Train/Samples/train_loss")
    assert steps[:3] == [8, 16, 24] and values[0] == 3.0 and len(values) == 30
    assert find_run_dir(str(tmp_path)) == str(run_dir)  # the output_path with a single job
    _run(tmp_path, job="other")
    with pytest.raises(FileNotFoundError, match="several runs"):
        find_run_dir(str(tmp_path))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="enable csv_monitor"):
        find_run_dir(str(empty))


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib is not installed")
def test_plot_writes_png(tmp_path, capsys):
    run_dir = _run(tmp_path)
    assert main(["plot", str(run_dir), "--smooth", "5"]) == 0
    png = run_dir / "curves.png"
    assert f"wrote {png}" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = tmp_path / "sub" / "x.png"
    assert main(["plot", str(run_dir), "-o", str(out), "--title", "t"]) == 0 and out.is_file()


def test_plot_missing_run(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "missing")]) == 1
    assert "does not exist" in capsys.readouterr().err
