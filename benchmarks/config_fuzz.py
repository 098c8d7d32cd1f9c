"""Config fuzzing: mutated ds_configs through ``flexspeed check-config`` and ``flexspeed.initialize``.

Each config is one of the repository's example configs (and a few richer ones) with 1-3 seeded
mutations: a value replaced (NaN, infinity, 1e308, 2**63, negatives, wrong types, strings, lists),
a key deleted, renamed or added (including flexspeed's extension keys and DeepSpeed sections), a
section nested or turned into a list. Each goes through

- ``flexspeed check-config CONFIG --json`` (in this process), and
- ``flexspeed.initialize(model=Linear(4, 2), config=CONFIG)`` in a one-process group (destroyed after),

each under a 30 s alarm. Checked for every config: only ``ConfigError`` (no other exception type), no hang,
and agreement: both accept, or both reject with the same key (and the same message, except for the batch
triad, whose message names where the world size came from). A config only ``initialize()`` can reject because
it needs the model (a per-param-group list of values whose length the model's optimizer decides) is counted
as model-dependent, not as a finding. Findings are printed; exit status 1 if any.

    python benchmarks/config_fuzz.py [--n 2000] [--seed 0]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import os
import random
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ROOT = Path(__file__).resolve().parents[1]
TRIAD = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps"}
# initialize() errors that depend on the model, which check-config cannot see (counted, not findings)
MODEL_DEPENDENT = ("param groups",)
EXTRA_VALID: list[dict] = [
    {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
     "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}},
     "checkpoint": {"save_dir": "ckpt", "save_interval": 2, "keep_last": 2, "auto_resume": True},
     "flexspeed_distributed": {"timeout_minutes": 5, "heartbeat_interval": 1},
     "flexspeed_nonfinite": {"action": "skip", "max_consecutive_skips": 3}},
    {"elasticity": {"enabled": True, "max_train_batch_size": 16, "micro_batch_sizes": [2, 4], "max_gpus": 4},
     "optimizer": {"type": "SGD", "params": {"lr": 0.1, "momentum": 0.9}}, "gradient_clipping": 1.0},
    {"train_batch_size": 8, "gradient_accumulation_steps": 4, "fp16": {"enabled": True, "initial_scale_power": 8},
     "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "betas": [0.9, 0.99]}},
     "scheduler": {"type": "OneCycle", "params": {"cycle_min_lr": 0.01, "cycle_max_lr": 0.1}},
     "zero_optimization": {"stage": 2, "reduce_bucket_size": 5e8}},
]
KEYS = ["enabled", "stage", "type", "params", "lr", "betas", "eps", "weight_decay", "train_batch_size",
        "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "fp16", "bf16", "optimizer", "scheduler",
        "zero_optimization", "checkpoint", "save_dir", "save_interval", "keep_last", "auto_resume", "async_save",
        "elasticity", "max_train_batch_size", "micro_batch_sizes", "min_gpus", "max_gpus", "version",
        "ignore_non_elastic_batch_info", "flexspeed_distributed", "timeout_minutes", "heartbeat_interval",
        "flexspeed_nonfinite", "action", "initial_scale_power", "loss_scale", "warmup_num_steps",
        "warmup_max_lr", "total_num_steps", "gradient_clipping", "steps_per_print", "offload_optimizer",
        "device", "amp", "moe", "tag_validation", "cycle_max_lr"]
VALUES: list[Any] = [None, True, False, 0, 1, 2, -1, 3, 0.5, -0.5, 1e-9, 1e308, -1e308, 2**31, 2**63, 2**70,
                     float("nan"), float("inf"), float("-inf"), "", "auto", "x", "1", "cpu", "none", "Fail",
                     [], [1], [0.9, 0.999, 0.5], [2, 4], {}, {"enabled": True}, {"lr": 0.1}, "ckpt", "../ckpt"]


def _load_valid() -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((ROOT / "examples").glob("*.json"))] + EXTRA_VALID


def _dicts(value: Any, path: tuple = ()) -> list[tuple]:
    out = [path] if isinstance(value, dict) else []
    if isinstance(value, dict):
        for key, item in value.items():
            out += _dicts(item, path + (key,))
    return out


def mutate(cfg: dict, rng: random.Random) -> dict:
    """``cfg`` with 1-3 random mutations (see the module docstring)."""
    cfg = copy.deepcopy(cfg)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(_dicts(cfg))
        target = cfg
        for key in path:
            target = target[key]
        op = rng.choice(["set", "set", "set", "delete", "rename", "add", "nest", "listify"])
        if op == "add" or not target:
            target[rng.choice(KEYS)] = copy.deepcopy(rng.choice(VALUES))
            continue
        key = rng.choice(list(target))
        if op == "set":
            target[key] = copy.deepcopy(rng.choice(VALUES))
        elif op == "delete":
            del target[key]
        elif op == "rename":
            target[rng.choice(KEYS)] = target.pop(key)
        elif op == "nest":
            target[key] = {rng.choice(KEYS): target[key]}
        else:
            target[key] = [target[key]]
    return cfg


class _Hang(Exception):
    pass


@contextlib.contextmanager
def _alarm(seconds: int):
    def fire(*_: Any) -> None:
        raise _Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _check_config(path: str) -> tuple[str, Any]:
    from flexspeed.cli.main import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        code = main(["check-config", path, "--json"])
    report = json.loads(out.getvalue().strip().splitlines()[-1])
    return ("ok", None) if code == 0 else ("error", (report.get("key"), report.get("error")))


def _initialize(cfg: dict) -> tuple[str, Any]:
    import torch
    import torch.distributed as dist

    import flexspeed
    from flexspeed.config.errors import ConfigError

    try:
        flexspeed.initialize(model=torch.nn.Linear(4, 2), config=copy.deepcopy(cfg))
        return "ok", None
    except ConfigError as e:
        return "error", (e.key, str(e))
    finally:
        from flexspeed.runtime.autosave import wait_for_pending_saves

        wait_for_pending_saves()
        if dist.is_initialized():
            dist.destroy_process_group()


def one(cfg: dict, workdir: str) -> tuple[str | None, str]:
    """(None if check-config and initialize agree and raise only ConfigErrors, else what went wrong; "ok"/"error")."""
    path = os.path.join(workdir, "ds.json")
    try:
        text = json.dumps(cfg, allow_nan=True)
    except (TypeError, ValueError) as e:
        return f"config not serialisable: {e}", "error"
    Path(path).write_text(text)
    results = []
    for what, run in (("check-config", lambda: _check_config(path)), ("initialize", lambda: _initialize(cfg))):
        try:
            with _alarm(30):
                results.append(run())
        except _Hang as e:
            return f"{what} hung: {e}", "error"
        except Exception as e:  # noqa: BLE001 - the finding
            return f"{what} raised {type(e).__name__} (not ConfigError): {str(e)[:300]}", "error"
    (a, ea), (b, eb) = results
    if a == "ok" and b == "error" and any(m in eb[1] for m in MODEL_DEPENDENT):
        return None, "model"  # needs the real model's parameter groups, which check-config does not have
    if a != b:
        return f"disagree: check-config {a} {ea or ''} / initialize {b} {eb or ''}", "error"
    if a == "error":
        if ea[0] != eb[0]:
            return f"different keys: check-config {ea} / initialize {eb}", "error"
        if ea[0] not in TRIAD and ea[1] != eb[1]:
            return f"different messages for {ea[0]}: {ea[1]!r} / {eb[1]!r}", "error"
    return None, a


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("FLEXSPEED_LOG_LEVEL", "error")
    warnings.simplefilter("ignore")
    rng = random.Random(args.seed)
    valid = _load_valid()
    findings: list[tuple[int, str, dict]] = []
    accepted = model_dependent = 0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        cwd = os.getcwd()
        os.chdir(workdir)  # relative save_dir / output paths land here
        try:
            for i in range(args.n):
                cfg = mutate(rng.choice(valid), rng)
                problem, status = one(cfg, workdir)
                if problem:
                    findings.append((i, problem, cfg))
                accepted += problem is None and status == "ok"
                model_dependent += status == "model"
        finally:
            os.chdir(cwd)
    elapsed = time.perf_counter() - started
    for i, problem, cfg in findings[:20]:
        print(f"#{i}: {problem}\n    {json.dumps(cfg, allow_nan=True)[:400]}")
    rejected = args.n - accepted - model_dependent - len(findings)
    print("| configs | accepted by both | rejected by both (same key) | model-dependent | findings | seconds |")
    print(f"| {args.n} | {accepted} | {rejected} | {model_dependent} | {len(findings)} | {elapsed:.0f} |")
    return 1 if findings else 0


if __name__ == "__main__":
    raise SystemExit(main())
