"""Progress of long loads (flexspeed/utils/progress.py): a bar on a TTY, log lines otherwise, nothing
for fast work or where the flexspeed logger is quiet; wired into checkpoint loading and the offload store."""

from __future__ import annotations

import io
import logging

import pytest
import torch

from flexspeed.utils.logging import logger
from flexspeed.utils.progress import Progress


@pytest.fixture()
def log_lines(monkeypatch):
    """The flexspeed logger's INFO records, captured (whatever the process configured)."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)  # (setLevel clears the logger's isEnabledFor cache)
    monkeypatch.setattr(logger, "disabled", False)
    monkeypatch.setattr(Progress, "default_after", 0.0)
    monkeypatch.setattr(Progress, "default_every", 0.0)
    yield lambda: stream.getvalue().splitlines()
    logger.removeHandler(handler)
    logger.setLevel(level)


def test_bar_on_a_tty(log_lines) -> None:
    out = io.StringIO()
    with Progress("loading", 4, "tensors", stream=out, tty=True) as bar:
        for i in range(4):
            bar.update(1, note=f"{i + 1} MB")
            bar._last = -1e9  # redraw every update (the bar throttles to 10 per second)
    text = out.getvalue()
    frames = text.split("\r")[1:]
    assert len(frames) == 5 and text.endswith("\n"), text  # one frame per update, the final one
    assert "[#######" in frames[0] and " 25% 1/4 tensors, 1 MB" in frames[0]
    assert f"[{'#' * 30}] 100% 4/4 tensors, 4 MB" in frames[-1]
    assert log_lines() == []  # the bar replaces the log lines


def test_log_lines_without_a_tty(log_lines) -> None:
    out = io.StringIO()
    with Progress("offload: placing weights", 3, "layers", stream=out, tty=False) as bar:
        for _ in range(3):
            bar.update(1)
    assert out.getvalue() == ""
    lines = log_lines()
    assert lines[0].startswith("offload: placing weights: 33% (1/3 layers) after")
    assert lines[-1].startswith("offload: placing weights: 100% (3/3 layers) after") and len(lines) == 3


def test_quiet_for_fast_work_and_a_quiet_logger(log_lines, monkeypatch) -> None:
    out = io.StringIO()
    with Progress("fast", 2, stream=out, tty=True, after=60) as bar:
        bar.update(2)
    logger.setLevel(logging.WARNING)
    with Progress("quiet", 2, stream=out, tty=True) as bar:
        bar.update(2)
    assert out.getvalue() == "" and log_lines() == []


def test_a_failure_marks_the_last_line(log_lines) -> None:
    with pytest.raises(ValueError):
        with Progress("load", 2, tty=False) as bar:
            bar.update(1)
            raise ValueError("boom")
    assert log_lines()[-1].endswith("(stopped)")


def test_checkpoint_loading_reports_progress(log_lines, tmp_path) -> None:
    safetensors_torch = pytest.importorskip("safetensors.torch")
    from flexspeed.inference.loading import load_checkpoint
    from flexspeed.models.gpt import GPT

    torch.manual_seed(0)
    src = GPT(n_layer=2, n_embd=32, n_head=4, vocab_size=64, block_size=32)
    safetensors_torch.save_file({k: v.contiguous() for k, v in src.state_dict().items()},
                                str(tmp_path / "model.safetensors"))
    load_checkpoint(GPT(n_layer=2, n_embd=32, n_head=4, vocab_size=64, block_size=32), str(tmp_path))
    lines = [x for x in log_lines() if x.startswith("init_inference: loading checkpoint")]
    assert lines and "100%" in lines[-1] and "tensors" in lines[-1] and "kB" in lines[-1], lines


def test_offload_store_reports_progress(log_lines) -> None:
    import flexspeed
    from flexspeed.models.gpt import GPT

    torch.manual_seed(0)
    model = GPT(n_layer=3, n_embd=64, n_head=4, vocab_size=97, block_size=64).eval()
    flexspeed.init_inference(model, dtype="fp32", offload={"w_gpu_percent": 40})
    lines = [x for x in log_lines() if x.startswith("offload: placing weights")]
    assert lines and "100% (" in lines[-1] and "layers), gpu" in lines[-1], lines
    assert len(lines) == len(set(lines))  # no line twice
