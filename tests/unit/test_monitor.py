"""Monitoring from the config, in one process: the log line with tokens/s, wall-clock breakdown,
CSV and TensorBoard scalars read back from disk, the FLOPs profiler, the progress bar, and the
errors for monitors whose package is missing."""

from __future__ import annotations

import csv
import importlib.util
import math
import os

import pytest
import torch
import torch.distributed as dist

import flexspeed
from flexspeed.config.errors import ConfigError
from flexspeed.models import GPT, GPTConfig
from flexspeed.runtime.flops_profiler import format_count, profile_forward
from flexspeed.runtime.monitor import CsvMonitor, ProgressBar, WallClockTimers, count_tokens, csv_file_name


@pytest.fixture(autouse=True)
def _no_group_leak():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def _gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=16, block_size=8, n_layer=2, n_head=2, n_embd=16))


def _train(cfg: dict, steps: int = 4, progress: bool = False) -> tuple:
    model = _gpt()
    base = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}, "steps_per_print": 2}
    engine, *_ = flexspeed.initialize(model=model, model_parameters=model.parameters(), config={**base, **cfg})
    bar = engine.progress(steps, disable=False) if progress else None
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(steps * 2):
        x = torch.randint(0, 16, (2, 8), generator=g)
        loss = engine(x, x)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    if bar is not None:
        bar.close()
    engine.monitor.close()
    return engine, losses


def test_log_line_has_tokens_per_second(capsys):
    _train({"wall_clock_breakdown": True})
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("[flexspeed] step=")]
    assert any("step=2 loss=" in ln and "tokens/s=" in ln and "samples/s=" in ln for ln in lines), out
    timing = [ln for ln in lines if "time (ms/step)" in ln]
    assert len(timing) == 2 and all(k in timing[0] for k in ("forward=", "backward=", "step=")), out


def test_csv_monitor_layout(tmp_path):
    _, losses = _train({"csv_monitor": {"enabled": True, "output_path": str(tmp_path), "job_name": "run1"}})
    job = tmp_path / "run1"
    names = sorted(os.listdir(job))
    assert names == ["Train_Samples_lr.csv", "Train_Samples_train_loss.csv"], names
    with open(job / "Train_Samples_train_loss.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["step", "train_loss"]
    # x axis = global samples (4 per optimizer step); value = mean of the step's two micro-batch losses
    assert [int(r[0]) for r in rows[1:]] == [4, 8, 12, 16]
    for i, row in enumerate(rows[1:]):
        assert math.isclose(float(row[1]), (losses[2 * i] + losses[2 * i + 1]) / 2, rel_tol=1e-6)
    with open(job / "Train_Samples_lr.csv") as f:
        lr_rows = list(csv.reader(f))
    assert lr_rows[0] == ["step", "lr"] and float(lr_rows[1][1]) == pytest.approx(1e-3)


def test_csv_monitor_timers_and_loss_scale(tmp_path):
    cfg = {"csv_monitor": {"enabled": True, "output_path": str(tmp_path), "job_name": "j"},
           "wall_clock_breakdown": True, "fp16": {"enabled": True, "initial_scale_power": 8}}
    _train(cfg, steps=2)
    names = set(os.listdir(tmp_path / "j"))
    for scalar in ("Train/Samples/loss_scale", "Train/Samples/elapsed_time_ms_forward",
                   "Train/Samples/elapsed_time_ms_backward", "Train/Samples/elapsed_time_ms_step"):
        assert csv_file_name(scalar) in names, (scalar, names)


def test_csv_monitor_restarts_files(tmp_path):
    for value in (1.0, 2.0):
        mon = CsvMonitor(str(tmp_path), "job")
        mon.write_events([("Train/Samples/lr", value, 10)])
    with open(tmp_path / "job" / "Train_Samples_lr.csv") as f:
        assert list(csv.reader(f)) == [["step", "lr"], ["10", "2.0"]]


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, losses = _train({"tensorboard": {"enabled": True, "output_path": str(tmp_path), "job_name": "tb"}})
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"Train/Samples/train_loss", "Train/Samples/lr"} <= set(tags), tags
    events = acc.Scalars("Train/Samples/train_loss")
    assert [e.step for e in events] == [4, 8, 12, 16]
    assert events[-1].value == pytest.approx((losses[-2] + losses[-1]) / 2, rel=1e-5)


def test_missing_tensorboard_names_the_key(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(ConfigError, match=r"tensorboard\.enabled.*pip install tensorboard"):
        _train({"tensorboard": {"enabled": True}}, steps=1)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_missing_wandb_names_the_key():
    with pytest.raises(ConfigError, match=r"wandb\.enabled.*pip install wandb"):
        _train({"wandb": {"enabled": True}}, steps=1)


def test_flops_profiler_report(tmp_path):
    out = tmp_path / "prof" / "flops.txt"
    cfg = {"flops_profiler": {"enabled": True, "profile_step": 2, "module_depth": 2, "top_modules": 2,
                              "output_file": str(out)}}
    _train(cfg, steps=3)
    text = out.read_text()
    assert text.count("flexspeed flops profiler") == 1 and "profiled step:" in text and text.count(" 2\n") >= 1
    # the two linear layers of each block dominate: the report lists per-module rows down to depth 2
    assert "transformer" in text and "lm_head" in text and "step latency" in text
    assert ".h.0.attn" not in text  # depth 3 is cut off by module_depth=2


def test_profile_forward_counts_linear_flops():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    prof = profile_forward(model, torch.randn(3, 8))
    # a matmul (B, I) x (I, O) costs 2*B*I*O FLOPs
    assert prof.total_flops == 2 * 3 * 8 * 16 + 2 * 3 * 16 * 4
    by_name = {m.name: m for m in prof.modules}
    assert by_name["0"].flops == 2 * 3 * 8 * 16 and by_name["0"].params == 8 * 16 + 16
    assert by_name[""].params == sum(p.numel() for p in model.parameters())
    assert all(m.latency_s >= 0 for m in prof.modules) and by_name[""].latency_s > 0
    assert "fwd+bwd FLOPs" in prof.table()


def test_profile_forward_through_a_wrapper():
    inner = torch.nn.Sequential(torch.nn.Linear(8, 8))

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.module = inner

        def forward(self, x):
            return self.module(x)

    from flexspeed.runtime.flops_profiler import ForwardProfiler

    prof = ForwardProfiler(inner)
    prof.start()
    Wrapper()(torch.randn(2, 8))
    result = prof.stop()
    assert {m.name: m.flops for m in result.modules} == {"": 256, "0": 256}


def test_progress_bar_updates(capsys):
    _train({}, steps=3, progress=True)
    err = capsys.readouterr().err
    assert "3/3" in err and "loss=" in err and "tok_s=" in err, err


def test_progress_bar_off_when_not_a_terminal(capsys):
    bar = ProgressBar(5)  # pytest's captured stderr is not a terminal
    assert not bar.enabled
    bar.update(1, loss="1.0")
    bar.write("plain line")
    bar.close()
    out, err = capsys.readouterr()
    assert out == "plain line\n" and err == ""


def test_helpers():
    assert count_tokens((torch.zeros(3, 5), torch.zeros(2)), {}) == 15
    assert count_tokens((), {"input_ids": torch.zeros(2, 7)}) == 14
    assert count_tokens(({"input_ids": torch.zeros(4, 2)},), {}) == 8
    assert count_tokens((1, "a"), {}) == 0
    assert csv_file_name("Train/Samples/train_loss") == "Train_Samples_train_loss.csv"
    assert format_count(1_234_567) == "1.23 M" and format_count(12) == "12"
    timers = WallClockTimers()
    with timers.time("a"):
        pass
    timers.stop("never-started")
    assert set(timers.take()) == {"a"} and timers.take() == {}


def test_training_continues_after_the_bar_closes(capsys):
    model = _gpt()
    engine, *_ = flexspeed.initialize(model=model, model_parameters=model.parameters(), config={
        "train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
        "steps_per_print": 1})
    x = torch.randint(0, 16, (2, 8))
    with engine.progress(1, disable=False):
        engine.backward(engine(x, x))
        engine.step()
    engine.backward(engine(x, x))
    engine.step()
    out = capsys.readouterr().out
    assert "[flexspeed] step=2 loss=" in out, out
