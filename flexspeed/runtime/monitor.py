"""Training monitoring from the config: the log line, timers, scalar writers, FLOPs profile, progress bar.

The engine owns one :class:`Monitor` (``engine.monitor``, built by :func:`build_monitor`) and
calls it at four points: around the forward (token count, timer, FLOPs profile), around the
backward and the optimizer step (timers), and once per optimizer step (:meth:`Monitor.on_step`).
Everything is decided once at construction, so the hot path tests two booleans and does
nothing else when a feature is off.

What each config key does:

- ``steps_per_print``: every that many optimizer steps rank 0 prints loss, lr, samples/s and
  tokens/s. Tokens are counted as the number of elements of the first tensor argument of each
  training forward (``input_ids`` of shape ``(B, T)`` -> ``B*T``) on rank 0, times the
  data-parallel size - exact for language models with equal batch shapes on every rank.
- ``wall_clock_breakdown``: rank 0 times forward, backward and optimizer step (synchronising
  CUDA first) and prints their mean milliseconds per step in the same rhythm.
- ``csv_monitor`` / ``tensorboard`` / ``wandb``: rank 0 writes scalars every optimizer step,
  with the global sample count as the x axis, under DeepSpeed's names:
  ``Train/Samples/train_loss`` (mean loss of the step's micro-batches on rank 0),
  ``Train/Samples/lr`` (first param group), ``Train/Samples/loss_scale`` (fp16 only), and with
  ``wall_clock_breakdown`` ``Train/Samples/elapsed_time_ms_{forward,backward,step}``. The CSV
  writer makes one file per scalar, ``<output_path>/<job_name>/Train_Samples_train_loss.csv``,
  with a ``step,<last name part>`` header and ``step,value`` rows.
- ``flops_profiler``: see :mod:`flexspeed.runtime.flops_profiler`.
- :meth:`Monitor.progress` (``engine.progress(total_steps)``): a tqdm bar on rank 0 with loss,
  lr and tokens/s; tqdm turns it off by itself when stderr is not a terminal.
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch

from flexspeed.config.errors import ConfigError

if TYPE_CHECKING:
    from flexspeed.config.schema import FlexConfig

__all__ = ["Monitor", "build_monitor", "require_monitor_packages", "CsvMonitor", "TensorBoardMonitor", "WandbMonitor", "WallClockTimers",
           "ProgressBar", "count_tokens", "csv_file_name"]

Event = tuple[str, float, int]  # (name, value, x: global samples)


def csv_file_name(name: str) -> str:
    """The CSV file a scalar goes to: ``"Train/Samples/lr"`` -> ``"Train_Samples_lr.csv"``."""
    return name.replace("/", "_").replace(" ", "_") + ".csv"


def count_tokens(args: tuple, kwargs: dict) -> int:
    """Elements of the first tensor among the forward's arguments (0 if there is none)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.numel()
        if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
            return value[0].numel()
        if isinstance(value, dict):
            return count_tokens((), value)
    return 0


# ---- scalar writers ---------------------------------------------------------------------------------
class CsvMonitor:
    """One CSV file per scalar under ``output_path/job_name`` (default output path: ``./csv_monitor``)."""

    def __init__(self, output_path: str, job_name: str) -> None:
        self.log_dir = os.path.join(output_path or "csv_monitor", job_name)
        os.makedirs(self.log_dir, exist_ok=True)
        self._started: set[str] = set()

    def write_events(self, events: list[Event]) -> None:
        for name, value, step in events:
            fname = csv_file_name(name)
            path = os.path.join(self.log_dir, fname)
            fresh = fname not in self._started
            # a new run truncates what an older run with the same job name left behind
            with open(path, "w" if fresh else "a", newline="") as f:
                writer = csv.writer(f)
                if fresh:
                    writer.writerow(["step", name.rsplit("/", 1)[-1]])
                    self._started.add(fname)
                writer.writerow([step, value])

    def flush(self) -> None:
        """Nothing buffered: every write opens, appends and closes."""

    def close(self) -> None:
        """Nothing to release."""


def _import_summary_writer() -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ConfigError(
            f"tensorboard.enabled is true but TensorBoard cannot be imported ({e}). Fix: pip install "
            "tensorboard (or flexspeed[monitor]), or set tensorboard.enabled to false", key="tensorboard.enabled"
        ) from e
    return SummaryWriter


def _import_wandb() -> Any:
    try:
        import wandb
    except ImportError as e:
        raise ConfigError(
            "wandb.enabled is true but the 'wandb' package is not installed. Fix: pip install wandb (export "
            "WANDB_MODE=offline to log without a network), or set wandb.enabled to false", key="wandb.enabled"
        ) from e
    return wandb


def require_monitor_packages(config: FlexConfig) -> None:
    """Import the packages of the scalar writers ``config`` enables (the check ``build_monitor`` makes).

    Raises:
        ConfigError: an enabled monitor's package cannot be imported (the message names the key).
    """
    if config.tensorboard.enabled:
        _import_summary_writer()
    if config.wandb.enabled:
        _import_wandb()


class TensorBoardMonitor:
    """TensorBoard event files under ``output_path/job_name`` (default output path: ``./tensorboard``)."""

    def __init__(self, output_path: str, job_name: str) -> None:
        SummaryWriter = _import_summary_writer()  # noqa: N806 - a class
        self.log_dir = os.path.join(output_path or "tensorboard", job_name)
        self.writer = SummaryWriter(log_dir=self.log_dir)

    def write_events(self, events: list[Event]) -> None:
        for name, value, step in events:
            self.writer.add_scalar(name, value, step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbMonitor:
    """Weights & Biases; ``WANDB_MODE=offline`` (read by wandb itself) logs without a network."""

    def __init__(self, project: str, group: str | None, team: str | None) -> None:
        wandb = _import_wandb()
        self._wandb = wandb
        self.run = wandb.init(project=project, group=group, entity=team)

    def write_events(self, events: list[Event]) -> None:
        for name, value, step in events:
            self._wandb.log({name: value}, step=step)

    def flush(self) -> None:
        """wandb streams on its own."""

    def close(self) -> None:
        self.run.finish()


# ---- timers and progress ----------------------------------------------------------------------------
class WallClockTimers:
    """Named stopwatches that add up milliseconds until :meth:`take` reads and clears them."""

    def __init__(self, synchronize: bool = False) -> None:
        self.synchronize = synchronize
        self._start: dict[str, float] = {}
        self._total_ms: dict[str, float] = {}

    def _now(self) -> float:
        if self.synchronize:
            torch.cuda.synchronize()
        return time.perf_counter()

    def start(self, name: str) -> None:
        self._start[name] = self._now()

    def stop(self, name: str) -> None:
        began = self._start.pop(name, None)
        if began is not None:
            self._total_ms[name] = self._total_ms.get(name, 0.0) + (self._now() - began) * 1e3

    @contextmanager
    def time(self, name: str) -> Iterator[None]:
        self.start(name)
        try:
            yield
        finally:
            self.stop(name)

    def take(self) -> dict[str, float]:
        """The milliseconds accumulated per name since the last call; clears them."""
        out, self._total_ms = self._total_ms, {}
        return out


class ProgressBar:
    """A tqdm bar over optimizer steps, on rank 0 only; tqdm disables it when stderr is no terminal.

    Use it as a context manager or call :meth:`close`. ``enabled`` says whether anything is drawn.
    """

    def __init__(self, total: int, *, rank: int = 0, desc: str = "train", initial: int = 0,
                 disable: bool | None = None) -> None:
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc=desc, initial=initial, unit="step", dynamic_ncols=True,
                         disable=True if rank != 0 else disable, leave=True)
        self.enabled = not self._bar.disable

    def update(self, n: int = 1, **postfix: Any) -> None:
        if self.enabled:
            if postfix:
                self._bar.set_postfix(postfix, refresh=False)
            self._bar.update(n)

    def write(self, line: str) -> None:
        """Print a line above the bar (plain print when the bar is off)."""
        if self.enabled:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        self._bar.close()
        self.enabled = False  # later steps and log lines go to plain prints

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---- the engine's monitor ---------------------------------------------------------------------------
class Monitor:
    """What the engine calls; see the module docstring. ``active``/``timing`` gate the hot path."""

    def __init__(self, *, rank: int, steps_per_print: int, wall_clock_breakdown: bool = False,
                 writers: list[Any] | None = None, flops_config: Any = None, synchronize: bool = False) -> None:
        self.rank = rank
        self.steps_per_print = int(steps_per_print)
        self.writers = list(writers or [])
        self.flops_config = flops_config if flops_config is not None and flops_config.enabled else None
        self.timers = WallClockTimers(synchronize) if wall_clock_breakdown and rank == 0 else None
        self.timing = self.timers is not None
        # forward hook needed at all: rank 0 counts tokens for the log line; other ranks only time
        self.active = rank == 0
        self.bar: ProgressBar | None = None
        self._losses: list[float] = []
        self._tokens = 0
        self._window = (time.perf_counter(), 0, 0)  # (time, global_samples, tokens) at window start
        self._step_times: dict[str, float] = {}
        self._window_steps = 0
        self._profiler: Any = None
        self._profile_report: Any = None
        self._profile_t0 = 0.0
        self._profile_step: int | None = None
        if self.writers:
            atexit.register(self.close)

    # -- hot path --------------------------------------------------------------------------------
    def forward_begin(self, global_steps: int, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """Before a training forward: count tokens, start the forward timer, maybe start profiling."""
        if self.rank == 0:
            self._tokens += count_tokens(args, kwargs)
        fc = self.flops_config
        if fc is not None and self.rank == 0 and self._profile_step is None and global_steps + 1 == fc.profile_step:
            from flexspeed.runtime.flops_profiler import ForwardProfiler

            self._profile_step = global_steps + 1
            self._profile_t0 = time.perf_counter()
            self._profiler = ForwardProfiler(module, recompute_fwd_factor=fc.recompute_fwd_factor)
            self._profiler.start()
        if self.timing:
            self.timers.start("forward")

    def forward_end(self) -> None:
        if self.timing:
            self.timers.stop("forward")
        if self._profiler is not None:
            self._profile_report = self._profiler.stop()
            self._profiler = None

    def timed(self, name: str) -> Any:
        """Wall-clock timer ``name`` as a context manager with ``wall_clock_breakdown``, else a no-op."""
        return self.timers.time(name) if self.timing else contextlib.nullcontext()

    def add_tokens(self, n: int) -> None:
        """Count ``n`` tokens of this replica (rank 0), for engines without a forward hook (pipeline)."""
        self._tokens += int(n)

    def add_loss(self, loss: float) -> None:
        """Record one micro-batch's loss (rank 0)."""
        self._losses.append(loss)

    # -- once per optimizer step -------------------------------------------------------------------
    def on_step(self, engine: Any) -> None:
        """After an optimizer step: write scalars, advance the bar, print at ``steps_per_print``."""
        if self.rank != 0:
            return
        step, samples = engine.global_steps, engine.global_samples
        loss = sum(self._losses) / len(self._losses) if self._losses else float("nan")
        self._losses.clear()
        lrs = engine.get_lr()
        times = self.timers.take() if self.timing else {}
        for name, ms in times.items():
            self._step_times[name] = self._step_times.get(name, 0.0) + ms
        self._window_steps += 1
        if self.writers:
            events: list[Event] = [("Train/Samples/train_loss", loss, samples)]
            if lrs:
                events.append(("Train/Samples/lr", lrs[0], samples))
            if engine.fp16_enabled():
                events.append(("Train/Samples/loss_scale", float(engine.loss_scale), samples))
            events += [(f"Train/Samples/elapsed_time_ms_{name}", ms, samples) for name, ms in times.items()]
            for writer in self.writers:
                writer.write_events(events)
        if self.bar is not None and self.bar.enabled:
            t0, _, tok0 = self._window
            rate = (self._tokens - tok0) * engine.dp_world_size / max(time.perf_counter() - t0, 1e-9)
            self.bar.update(1, loss=f"{loss:.4f}", lr=f"{lrs[0]:.2e}" if lrs else "-", tok_s=f"{rate:,.0f}")
        if self._profile_report is not None and step == self._profile_step:
            self._print_profile(step)
        if self.steps_per_print > 0 and step % self.steps_per_print == 0:
            self._print_line(engine, loss, lrs)
            for writer in self.writers:
                writer.flush()

    def _print_line(self, engine: Any, loss: float, lrs: list[float]) -> None:
        now = time.perf_counter()
        t0, samples0, tok0 = self._window
        elapsed = max(now - t0, 1e-9)
        samples_s = (engine.global_samples - samples0) / elapsed
        tokens_s = (self._tokens - tok0) * engine.dp_world_size / elapsed
        lr = ", ".join(f"{x:.3e}" for x in lrs)
        loss_txt = f"{loss:.4f}" if not math.isnan(loss) else "n/a"
        self._emit(f"[flexspeed] step={engine.global_steps} loss={loss_txt} lr=[{lr}] samples/s={samples_s:.1f} "
                   f"tokens/s={tokens_s:.0f} skipped={engine.skipped_steps}")
        if self._step_times:
            per = " ".join(f"{name}={ms / self._window_steps:.2f}" for name, ms in self._step_times.items())
            self._emit(f"[flexspeed] step={engine.global_steps} time (ms/step): {per}")
        self._window = (now, engine.global_samples, self._tokens)
        self._step_times, self._window_steps = {}, 0

    def _print_profile(self, step: int) -> None:
        fc = self.flops_config
        text = self._profile_report.table(module_depth=fc.module_depth, top_modules=fc.top_modules,
                                          detailed=fc.detailed, step=step,
                                          iter_latency_s=time.perf_counter() - self._profile_t0)
        self._profile_report = None
        if fc.output_file:
            os.makedirs(os.path.dirname(os.path.abspath(fc.output_file)), exist_ok=True)
            with open(fc.output_file, "a") as f:
                f.write(text + "\n")
        else:
            self._emit(text)

    def _emit(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    # -- user-facing ---------------------------------------------------------------------------------
    def progress(self, total_steps: int, desc: str = "train", initial: int = 0,
                 disable: bool | None = None) -> ProgressBar:
        """Start a progress bar over ``total_steps`` optimizer steps (drawn on rank 0 only).

        Args:
            total_steps: the bar's length in optimizer steps.
            desc: its label.
            initial: steps already done (e.g. after resuming from a checkpoint).
            disable: ``None`` lets tqdm decide (off when stderr is not a terminal); ``True``/``False`` force it.
        """
        if self.bar is not None:
            self.bar.close()
        self.bar = ProgressBar(total_steps, rank=self.rank, desc=desc, initial=initial, disable=disable)
        return self.bar

    def close(self) -> None:
        """Flush and close the writers and the bar (also run at interpreter exit)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        writers, self.writers = self.writers, []
        for writer in writers:
            writer.close()


def build_monitor(config: FlexConfig, rank: int, device: torch.device | None = None) -> Monitor:
    """The monitor the config asks for; writers exist on rank 0 only (other ranks log nothing).

    Args:
        config: the validated ``FlexConfig``.
        rank: this process's global rank.
        device: the compute device; CUDA makes the timers synchronise before reading the clock.
    Raises:
        ConfigError: a monitor is enabled whose package is not installed (the message names the key).
    """
    writers: list[Any] = []
    if rank == 0:
        csv_cfg, tb_cfg, wb_cfg = config.csv_monitor, config.tensorboard, config.wandb
        if csv_cfg.enabled:
            writers.append(CsvMonitor(csv_cfg.output_path, csv_cfg.job_name))
        if tb_cfg.enabled:
            writers.append(TensorBoardMonitor(tb_cfg.output_path, tb_cfg.job_name))
        if wb_cfg.enabled:
            writers.append(WandbMonitor(wb_cfg.project, wb_cfg.group, wb_cfg.team))
    sync = device is not None and device.type == "cuda"
    return Monitor(rank=rank, steps_per_print=int(config.steps_per_print or 0),
                   wall_clock_breakdown=bool(config.wall_clock_breakdown), writers=writers,
                   flops_config=config.flops_profiler, synchronize=sync)
