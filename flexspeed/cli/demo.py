"""``flexspeed demo``: train a small GPT from scratch on 2 processes, checkpoint it, and test it.

The steps, each through flexspeed's public pieces:

1. the config (``examples/ds_config_demo.json``, built in: ZeRO stage 2, bf16, AdamW, warmup +
   cosine schedule, CSV monitor) is written to ``OUT/ds_config.json`` with the step count and
   output paths filled in;
2. ``flexspeed launch`` starts ``flexspeed.demo.train`` on ``--nproc`` processes on 127.0.0.1;
   they train on the addition task with a live progress bar on rank 0 and save a checkpoint;
3. this process consolidates the checkpoint into one weight file, loads it with
   ``flexspeed.init_inference``, generates answers to the held-out questions greedily, and
   prints the exact-match accuracy;
4. the CSV monitor's loss and lr curves are drawn into ``OUT/loss.png``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from flexspeed.demo.evaluate import EvalResult
    from flexspeed.demo.task import AdditionTask

__all__ = ["add_parser", "run", "prepare_config"]

_EPILOG = """\
examples:
  flexspeed demo                          # 2 processes, 600 steps: 1-2 minutes on 2 CPU cores
  flexspeed demo --steps 200 --out /tmp/quick
  flexspeed demo --config my_ds_config.json --nproc 4

what it writes under OUT (default ./demo_out):
  ds_config.json        the config the ranks ran with
  checkpoint/           the training checkpoint (engine.save_checkpoint)
  model/                the consolidated weights that init_inference loads
  monitor/addition/     csv_monitor scalars (flexspeed plot OUT/monitor/addition)
  loss.png              loss and learning-rate curves
  results.json          accuracy, timings, loss
"""


def prepare_config(base: dict, *, steps: int, out_dir: str) -> dict:
    """The config the ranks run with: ``base`` with the schedule length and the CSV monitor's path set."""
    cfg = copy.deepcopy(base)
    params = (cfg.get("scheduler") or {}).get("params")
    if isinstance(params, dict):
        if "total_num_steps" in params:
            params["total_num_steps"] = steps
        if "warmup_num_steps" in params:
            params["warmup_num_steps"] = min(int(params["warmup_num_steps"]), max(steps // 10, 1))
    monitor = dict(cfg.get("csv_monitor") or {})
    monitor.update(enabled=True, output_path=os.path.join(out_dir, "monitor"))
    monitor.setdefault("job_name", "addition")
    cfg["csv_monitor"] = monitor  # the loss plot is drawn from these files
    return cfg


def add_parser(sub: argparse._SubParsersAction, name: str, help_text: str) -> argparse.ArgumentParser:
    p = sub.add_parser(name, help=help_text, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Train a small GPT from scratch on multi-digit addition (questions like 12+34=)\n"
                                   "on several processes with ZeRO stage 2 and bf16, save a checkpoint, load it with\n"
                                   "init_inference, answer held-out questions greedily and report the accuracy.")
    p.add_argument("--config", default=None, metavar="JSON",
                   help="DeepSpeed config (default: the built-in copy of examples/ds_config_demo.json)")
    p.add_argument("--nproc", type=int, default=2, metavar="N", help="training processes (default 2)")
    p.add_argument("--steps", type=int, default=600, metavar="N", help="optimizer steps (default 600)")
    p.add_argument("--out", default="demo_out", metavar="DIR", help="output directory (default ./demo_out)")
    p.add_argument("--digits", type=int, default=2, metavar="D", help="digits per operand (default 2)")
    p.add_argument("--seed", type=int, default=1234, help="seed of the data split and the initial weights")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="inference dtype (default fp32)")
    p.add_argument("--kernel-inject", action="store_true",
                   help="init_inference(replace_with_kernel_inject=True): fused layers with a KV cache")
    p.add_argument("--timeout", type=int, default=900, metavar="SECONDS",
                   help="stop the training processes after this long (default 900)")
    return p


def _load_base(path: str | None) -> dict:
    from flexspeed.demo.task import DEMO_CONFIG

    if path is None:
        return DEMO_CONFIG
    from flexspeed.config import load_config

    return load_config(config=path)


def _train(args: argparse.Namespace, config_path: str) -> int:
    """Run the ranks through ``flexspeed launch``; the exit code (124 after ``--timeout``)."""
    from flexspeed.testing import free_port, kill_tree

    cmd = [sys.executable, "-m", "flexspeed", "launch", "--nproc-per-node", str(args.nproc), "--master-addr",
           "127.0.0.1", "--master-port", str(free_port()), "--rdzv-timeout", "60", "--no-local-rank",
           "-m", "flexspeed.demo.train", "--out", args.out, "--steps", str(args.steps), "--digits",
           str(args.digits), "--seed", str(args.seed), "--deepspeed_config", config_path]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.nproc)))
    gpus = _visible_gpus()
    if 0 < gpus < args.nproc:  # NCCL needs one GPU per process; the demo is small enough for the CPU
        print(f"[demo] {gpus} GPU(s) for {_procs(args.nproc)}: training on the CPU (gloo)", flush=True)
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)  # its own group: a timeout stops every rank
    try:
        return proc.wait(timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(f"flexspeed demo: training ran past --timeout {args.timeout}s; stopping it", file=sys.stderr)
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)  # the workers too: torchrun starts each in a session of its own
            proc.wait()
        return 124
    except KeyboardInterrupt:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait()
        raise


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _procs(n: int) -> str:
    return f"{n} process{'es' if n != 1 else ''}"


def _report(task: AdditionTask, result: EvalResult, train: dict, timings: dict, png: str | None) -> None:
    print("\n[demo] held-out questions (the model never saw them):")
    for question, got, truth in result.examples:
        mark = "ok " if got == truth else "BAD"
        print(f"  {mark} {question:>13} = {'?' if got is None else got:<6} (true: {truth})")
    chance = 100.0 / 10 ** task.answer_len
    print(f"[demo] accuracy: {result.correct}/{result.total} = {100 * result.accuracy:.1f}% exact match on held-out "
          f"questions (chance: {chance:.2g}%)")
    print(f"[demo] loss {train['first_loss']:.3f} -> {train['final_loss']:.3f} in {train['steps']} steps on "
          f"{_procs(train['world_size'])} (ZeRO stage {train['zero_stage']}, {'bf16' if train['bf16'] else 'fp32'})")
    if png:
        print(f"[demo] loss curve: {png}")
    print(f"[demo] checkpoint: {train['checkpoint']}")
    print(f"[demo] time: training job {timings['train_job_s']:.0f}s (of which training {train['train_seconds']:.0f}s), "
          f"evaluation {timings['eval_s']:.0f}s, total {timings['total_s']:.0f}s")


def run(args: argparse.Namespace) -> int:
    from flexspeed.config.errors import ConfigError

    start = time.perf_counter()
    for flag, value in (("--nproc", args.nproc), ("--steps", args.steps)):
        if value < 1:
            print(f"flexspeed demo: {flag} {value} must be at least 1", file=sys.stderr)
            return 2
    try:
        cfg = prepare_config(_load_base(args.config), steps=args.steps, out_dir=args.out)
    except (ConfigError, OSError, ValueError) as e:
        print(f"flexspeed demo: cannot read --config {args.config!r}: {e}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    config_path = os.path.join(args.out, "ds_config.json")
    with open(config_path, "w") as f:
        json.dump(cfg, f, indent=2)
    print(f"[demo] training a GPT on {args.digits}-digit addition: {_procs(args.nproc)}, {args.steps} steps, "
          f"config {args.config or 'built-in (examples/ds_config_demo.json)'} -> {config_path}", flush=True)
    code = _train(args, config_path)
    train_job_s = time.perf_counter() - start
    if code != 0:
        print(f"flexspeed demo: training failed (exit code {code}); see the messages above", file=sys.stderr)
        return code
    with open(os.path.join(args.out, "train.json")) as f:
        train = json.load(f)
    monitor_dir = os.path.join(cfg["csv_monitor"]["output_path"], cfg["csv_monitor"]["job_name"])
    return _evaluate_and_report(args, train, monitor_dir, start, train_job_s)


def _evaluate_and_report(args: argparse.Namespace, train: dict, monitor_dir: str, start: float,
                         train_job_s: float) -> int:
    from flexspeed.cli.plot import plot_run
    from flexspeed.demo.evaluate import default_weights_path, evaluate, export_weights
    from flexspeed.demo.task import AdditionTask

    t_eval = time.perf_counter()
    task = AdditionTask(digits=args.digits, seed=args.seed)
    weights = export_weights(train["checkpoint"], default_weights_path(args.out))
    result = evaluate(task, weights, dtype=args.dtype, kernel_inject=args.kernel_inject)
    eval_s = time.perf_counter() - t_eval
    png = None
    try:
        png = plot_run(monitor_dir, os.path.join(args.out, "loss.png"),
                       title=f"flexspeed demo: {args.digits}-digit addition", smooth=10)
    except (ImportError, FileNotFoundError) as e:
        print(f"[demo] no loss plot: {e}", file=sys.stderr)
    timings = {"train_job_s": train_job_s, "eval_s": eval_s, "total_s": time.perf_counter() - start}
    _report(task, result, train, timings, png)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"accuracy": result.accuracy, "correct": result.correct, "total": result.total,
                   "examples": result.examples, "train": train, "weights": weights, "loss_png": png,
                   "timings": {k: round(v, 2) for k, v in timings.items()}}, f, indent=2)
    return 0
