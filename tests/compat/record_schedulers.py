"""Record DeepSpeed's learning-rate schedules, step by step, from DeepSpeed's own engine.

Run it where DeepSpeed is installed (never a flexspeed dependency; use its own venv):

    python3 -m venv /tmp/dsvenv
    DS_BUILD_OPS=0 /tmp/dsvenv/bin/pip install deepspeed==0.19.8 torch==2.13.0
    /tmp/dsvenv/bin/python tests/compat/record_schedulers.py [--out PATH]

Each case in ``CASES`` is driven through ``deepspeed.initialize`` (one process, gloo, CPU, ZeRO
stage 0, fp32) with a client optimizer (AdamW, or SGD with momentum) and the case's ``scheduler``
config section. A step pre-hook on the client optimizer records, for every optimizer step that
runs, the values it runs with: each param group's ``lr``, ``betas`` (Adam) or ``momentum`` (SGD).
The JSON it writes (``fixtures/ds_<version>_schedulers.json``) holds every case's full
specification next to its record, so ``test_schedulers_vs_deepspeed.py`` replays the same cases
through flexspeed without DeepSpeed installed.

Resume cases save at boundary ``at`` and continue in a freshly built engine: through
``save_checkpoint``/``load_checkpoint`` (with or without the optimizer states), or through the
scheduler's own ``state_dict``/``load_state_dict``; ``resume["params"]`` changes scheduler
parameters for the resumed part. Overflow cases: DeepSpeed refuses fp16 on CPU ("Type fp16 is
not supported on your device"), so the client optimizer reports ``overflow = True`` at the listed
boundaries (skipping its update), which is the attribute DeepSpeed's engine reads to skip the
scheduler step; those records have ``skipped: true``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

FIXTURE_DIR = Path(__file__).resolve().parent / "fixtures"

ADAMW = {"type": "AdamW", "lr": 0.01, "betas": [0.9, 0.999]}
SGD = {"type": "SGD", "lr": 0.01, "momentum": 0.9}


def _case(name: str, sched_type: str, params: dict, *, steps: int, optimizer: dict | None = None,
          group_lrs: list[float] | None = None, gas: int = 1, resume: dict | None = None,
          overflow_steps: list[int] | None = None) -> dict:
    """One recorded configuration; ``group_lrs`` gives two param groups (one per layer) their lrs."""
    return {"name": name, "scheduler": {"type": sched_type, "params": params},
            "optimizer": dict(optimizer or ADAMW, group_lrs=group_lrs), "gradient_accumulation_steps": gas,
            "steps": steps, "resume": resume, "overflow_steps": overflow_steps or []}


W = {"warmup_min_lr": 1e-4, "warmup_max_lr": 1e-3, "warmup_num_steps": 10}
D = {"total_num_steps": 20, "warmup_min_lr": 1e-4, "warmup_max_lr": 1e-3, "warmup_num_steps": 5}
C = {"total_num_steps": 20, "warmup_num_steps": 5}
O = {"cycle_min_lr": 1e-4, "cycle_max_lr": 1e-3, "cycle_first_step_size": 5}
R = {"lr_range_test_min_lr": 1e-4, "lr_range_test_step_size": 3, "lr_range_test_step_rate": 2.0}

CASES: list[dict] = [
    # WarmupLR
    _case("warmup_linear", "WarmupLR", {**W, "warmup_type": "linear"}, steps=15),
    _case("warmup_log", "WarmupLR", {**W, "warmup_type": "log"}, steps=15),
    _case("warmup_defaults", "WarmupLR", {}, steps=6),
    _case("warmup_max_from_optimizer_two_groups", "WarmupLR",
          {"warmup_min_lr": 1e-3, "warmup_num_steps": 5, "warmup_type": "linear"}, steps=8, group_lrs=[0.01, 0.05]),
    _case("warmup_one_step_linear", "WarmupLR", {**W, "warmup_num_steps": 1, "warmup_type": "linear"}, steps=5),
    _case("warmup_one_step_log", "WarmupLR", {**W, "warmup_num_steps": 1}, steps=5),
    _case("warmup_lists_two_groups", "WarmupLR",
          {"warmup_min_lr": [1e-4, 2e-4], "warmup_max_lr": [1e-3, 5e-3], "warmup_num_steps": 6,
           "warmup_type": "linear"}, steps=10, group_lrs=[0.01, 0.02]),
    _case("warmup_last_batch_iteration", "WarmupLR", {**W, "warmup_type": "linear", "last_batch_iteration": 4},
          steps=10),
    _case("warmup_gas3", "WarmupLR", {**W, "warmup_num_steps": 5, "warmup_type": "linear"}, steps=8, gas=3),
    _case("warmup_sgd", "WarmupLR", {**W, "warmup_type": "log"}, steps=6, optimizer=SGD),
    # WarmupDecayLR
    _case("decay_linear", "WarmupDecayLR", {**D, "warmup_type": "linear"}, steps=25),
    _case("decay_log", "WarmupDecayLR", D, steps=25),
    _case("decay_total_below_warmup", "WarmupDecayLR", {**D, "total_num_steps": 4, "warmup_num_steps": 8,
                                                        "warmup_type": "linear"}, steps=12),
    _case("decay_lists_two_groups", "WarmupDecayLR",
          {**D, "warmup_min_lr": [1e-4, 0.0], "warmup_max_lr": [1e-3, 2e-3], "warmup_type": "linear"}, steps=24,
          group_lrs=[0.01, 0.02]),
    _case("decay_last_batch_iteration", "WarmupDecayLR", {**D, "last_batch_iteration": 10}, steps=12),
    # WarmupCosineLR (base lr: the optimizer's)
    _case("cosine_defaults", "WarmupCosineLR", C, steps=25),
    _case("cosine_linear_ratios", "WarmupCosineLR",
          {**C, "warmup_min_ratio": 0.1, "cos_min_ratio": 0.05, "warmup_type": "linear"}, steps=25),
    _case("cosine_log_ratios", "WarmupCosineLR", {**C, "warmup_min_ratio": 0.2, "cos_min_ratio": 0.01},
          steps=25),
    _case("cosine_two_groups", "WarmupCosineLR", {**C, "warmup_min_ratio": 0.1, "warmup_type": "linear"},
          steps=24, group_lrs=[0.01, 0.03]),
    _case("cosine_total_below_warmup", "WarmupCosineLR", {"total_num_steps": 3, "warmup_num_steps": 6,
                                                          "warmup_min_ratio": 0.1}, steps=10),
    _case("cosine_last_batch_iteration", "WarmupCosineLR", {**C, "warmup_min_ratio": 0.1,
                                                            "last_batch_iteration": 7}, steps=10),
    _case("cosine_gas2", "WarmupCosineLR", {**C, "warmup_min_ratio": 0.1, "warmup_type": "linear"}, steps=10,
          gas=2),
    # OneCycle
    _case("onecycle_adam_momentum", "OneCycle", {**O, "cycle_min_mom": 0.85, "cycle_max_mom": 0.95}, steps=14),
    _case("onecycle_default_momentum", "OneCycle", O, steps=14),
    _case("onecycle_no_momentum", "OneCycle", {**O, "cycle_momentum": False}, steps=14),
    _case("onecycle_sgd_momentum", "OneCycle", O, steps=14, optimizer=SGD),
    _case("onecycle_stairs", "OneCycle", {**O, "cycle_first_step_size": 8, "cycle_first_stair_count": 4,
                                          "cycle_second_step_size": 4, "cycle_second_stair_count": 2}, steps=16),
    _case("onecycle_stairs_second_default", "OneCycle", {**O, "cycle_first_step_size": 6,
                                                         "cycle_first_stair_count": 3}, steps=16),
    _case("onecycle_second_step_size", "OneCycle", {**O, "cycle_first_step_size": 3,
                                                    "cycle_second_step_size": 7}, steps=14),
    _case("onecycle_decay", "OneCycle", {**O, "cycle_first_step_size": 4, "decay_lr_rate": 0.5,
                                         "decay_step_size": 2, "decay_mom_rate": 0.01}, steps=20),
    _case("onecycle_decay_lr_only", "OneCycle", {**O, "cycle_first_step_size": 4, "decay_lr_rate": 0.25,
                                                 "decay_step_size": 3}, steps=20),
    _case("onecycle_decay_step_without_rate", "OneCycle", {**O, "cycle_first_step_size": 4,
                                                           "decay_step_size": 2}, steps=14),
    _case("onecycle_lists_two_groups", "OneCycle",
          {**O, "cycle_min_lr": [1e-4, 2e-4], "cycle_max_lr": [1e-3, 3e-3], "cycle_min_mom": [0.8, 0.85],
           "cycle_max_mom": [0.9, 0.95]}, steps=14, group_lrs=[0.01, 0.02]),
    _case("onecycle_last_batch_iteration", "OneCycle", {**O, "last_batch_iteration": 3}, steps=12),
    _case("onecycle_gas2", "OneCycle", O, steps=12, gas=2),
    # LRRangeTest
    _case("lrrt_continuous", "LRRangeTest", R, steps=12),
    _case("lrrt_staircase", "LRRangeTest", {**R, "lr_range_test_staircase": True}, steps=12),
    _case("lrrt_defaults", "LRRangeTest", {}, steps=5),
    _case("lrrt_lists_two_groups", "LRRangeTest", {**R, "lr_range_test_min_lr": [1e-4, 3e-4]}, steps=10,
          group_lrs=[0.01, 0.02]),
    _case("lrrt_last_batch_iteration", "LRRangeTest", {**R, "last_batch_iteration": 5}, steps=8),
    # resume mid-schedule in a freshly built engine
    _case("resume_ckpt_warmup", "WarmupLR", {**W, "warmup_type": "linear"}, steps=14,
          resume={"at": 5, "how": "checkpoint"}),
    _case("resume_ckpt_decay", "WarmupDecayLR", D, steps=22, resume={"at": 7, "how": "checkpoint"}),
    _case("resume_ckpt_cosine", "WarmupCosineLR", {**C, "warmup_min_ratio": 0.1}, steps=22,
          resume={"at": 8, "how": "checkpoint"}),
    _case("resume_ckpt_onecycle", "OneCycle", {**O, "decay_lr_rate": 0.5, "decay_step_size": 2}, steps=16,
          resume={"at": 6, "how": "checkpoint"}),
    _case("resume_ckpt_lrrt", "LRRangeTest", R, steps=10, resume={"at": 4, "how": "checkpoint"}),
    _case("resume_ckpt_gas2", "WarmupLR", {**W, "warmup_type": "linear"}, steps=12, gas=2,
          resume={"at": 5, "how": "checkpoint"}),
    _case("resume_ckpt_no_optimizer_warmup", "WarmupLR", {**W, "warmup_type": "linear"}, steps=12,
          resume={"at": 5, "how": "checkpoint_without_optimizer"}),
    _case("resume_ckpt_no_optimizer_onecycle", "OneCycle", O, steps=12,
          resume={"at": 4, "how": "checkpoint_without_optimizer"}),
    _case("resume_ckpt_no_optimizer_cosine", "WarmupCosineLR", {**C, "warmup_min_ratio": 0.1}, steps=12,
          resume={"at": 4, "how": "checkpoint_without_optimizer"}),
    _case("resume_state_dict_warmup", "WarmupLR", {**W, "warmup_type": "linear"}, steps=12,
          resume={"at": 5, "how": "scheduler_state_dict"}),
    _case("resume_state_dict_onecycle", "OneCycle", O, steps=12, resume={"at": 4, "how": "scheduler_state_dict"}),
    _case("resume_changed_params_warmup", "WarmupLR", {**W, "warmup_type": "linear"}, steps=14,
          resume={"at": 5, "how": "checkpoint", "params": {"warmup_max_lr": 2e-3, "warmup_num_steps": 8}}),
    _case("resume_changed_params_cosine", "WarmupCosineLR", C, steps=16,
          resume={"at": 6, "how": "checkpoint", "params": {"cos_min_ratio": 0.1}}),
    # overflow: the engine skips the scheduler on a skipped step
    _case("overflow_skip_warmup", "WarmupLR", {**W, "warmup_type": "linear"}, steps=12, overflow_steps=[3, 4, 8]),
    _case("overflow_skip_onecycle_gas2", "OneCycle", O, steps=10, gas=2, overflow_steps=[2, 6]),
]


# ---- the model, the optimizer and one engine run ------------------------------------------------

def make_model() -> nn.Module:
    """Two layers, so a case can give each its own param group."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))


def make_optimizer(model: nn.Module, spec: dict) -> torch.optim.Optimizer:
    """The client optimizer of ``spec`` (AdamW, or SGD with momentum); ``group_lrs``: one group per layer."""
    layers = list(model)
    if spec.get("group_lrs"):
        params: list = [{"params": layer.parameters(), "lr": lr} for layer, lr in zip(layers, spec["group_lrs"])]
    else:
        params = list(model.parameters())
    if spec["type"] == "SGD":
        return torch.optim.SGD(params, lr=spec["lr"], momentum=spec["momentum"])
    return torch.optim.AdamW(params, lr=spec["lr"], betas=tuple(spec["betas"]), weight_decay=0.0)


def attach_recorder(opt: torch.optim.Optimizer, overflow_at: set[int]) -> list[dict]:
    """Record each optimizer step's values; at the (1-based) steps in ``overflow_at`` the optimizer
    reports ``overflow = True`` (the attribute DeepSpeed's engine reads) and skips its update."""
    records: list[dict] = []
    opt.register_step_pre_hook(lambda o, args, kwargs: records.append(snapshot(o)))
    if not overflow_at:
        return records
    real_step = opt.step

    def step(closure: Any = None) -> Any:
        opt.overflow = len(records) + 1 in overflow_at
        if opt.overflow:
            records.append(snapshot(opt))
            return None
        return real_step(closure)

    opt.overflow = False
    opt.step = step  # type: ignore[method-assign]
    return records


def snapshot(optimizer: torch.optim.Optimizer, skipped: bool = False) -> dict:
    """The values each param group holds now: lr, and betas or momentum where the group has them."""
    groups = optimizer.param_groups
    rec: dict[str, Any] = {"lr": [float(g["lr"]) for g in groups], "skipped": skipped}
    if all("betas" in g for g in groups):
        rec["betas"] = [[float(b) for b in g["betas"]] for g in groups]
    if all("momentum" in g for g in groups):
        rec["momentum"] = [float(g["momentum"]) for g in groups]
    return rec


def ds_config(case: dict, params: dict | None = None) -> dict:
    sched = copy.deepcopy(case["scheduler"])
    sched["params"].update(params or {})
    return {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": case["gradient_accumulation_steps"],
            "zero_optimization": {"stage": 0}, "steps_per_print": 10**9, "scheduler": sched}


def build_engine(case: dict, params: dict | None = None) -> tuple[Any, list[dict]]:
    """A DeepSpeed engine for ``case`` and the list its optimizer steps are recorded into."""
    import deepspeed

    model = make_model()
    opt = make_optimizer(model, case["optimizer"])
    records = attach_recorder(opt, set(case["overflow_steps"]))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=opt, config=ds_config(case, params))
    return engine, records


def train(engine: Any, records: list[dict], boundaries: int) -> None:
    """``boundaries`` optimizer steps of GAS micro-steps each; marks the records of skipped steps."""
    x = torch.linspace(-1.0, 1.0, 8).reshape(2, 4)
    for _ in range(boundaries):
        for _ in range(engine.gradient_accumulation_steps()):
            skipped_before = engine.skipped_steps
            engine.backward(engine(x).pow(2).mean())
            engine.step()
        if engine.skipped_steps != skipped_before:
            records[-1]["skipped"] = True


def resume(case: dict, engine: Any, records: list[dict]) -> list[dict]:
    """Save at boundary ``at``, rebuild, restore as ``case['resume']['how']`` says, and run to the end."""
    spec = case["resume"]
    with tempfile.TemporaryDirectory() as tmp:
        if spec["how"] == "scheduler_state_dict":
            state = copy.deepcopy(engine.lr_scheduler.state_dict())
        else:
            engine.save_checkpoint(tmp, tag="k")
        engine2, records2 = build_engine(case, spec.get("params"))
        if spec["how"] == "scheduler_state_dict":
            engine2.lr_scheduler.load_state_dict(state)
        else:
            engine2.load_checkpoint(tmp, tag="k",
                                    load_optimizer_states=spec["how"] == "checkpoint",
                                    load_lr_scheduler_states=True)
    train(engine2, records2, case["steps"] - spec["at"])
    return records + records2


def record_case(case: dict) -> list[dict]:
    engine, records = build_engine(case)
    first = case["resume"]["at"] if case["resume"] else case["steps"]
    train(engine, records, first)
    if case["resume"]:
        records = resume(case, engine, records)
    assert len(records) == case["steps"], (case["name"], len(records))
    return records


def init_process_group() -> None:
    import deepspeed

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29517"), RANK="0",
                      LOCAL_RANK="0", WORLD_SIZE="1")
    deepspeed.init_distributed(dist_backend="gloo")


def format_json(out: dict) -> str:
    """Indented JSON with each case's spec and each recorded step on one line (reviewable diffs)."""
    head = {k: v for k, v in out.items() if k != "cases"}
    lines = ["{"] + [f" {json.dumps(k)}: {json.dumps(v)}," for k, v in head.items()] + [' "cases": [']
    for n, case in enumerate(out["cases"]):
        spec = {k: v for k, v in case.items() if k != "record"}
        lines.append("  {" + json.dumps(spec)[1:-1] + ', "record": [')
        lines += ["   " + json.dumps(r) + ("," if i < len(case["record"]) - 1 else "")
                  for i, r in enumerate(case["record"])]
        lines.append("  ]}" + ("," if n < len(out["cases"]) - 1 else ""))
    return "\n".join(lines + [" ]", "}"]) + "\n"


def main(argv: list[str] | None = None) -> int:
    try:
        import deepspeed
    except ImportError:
        print("deepspeed is not installed; see this file's docstring for the recording venv", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path,
                        default=FIXTURE_DIR / f"ds_{deepspeed.__version__}_schedulers.json")
    args = parser.parse_args(argv)
    init_process_group()
    cases = []
    for case in CASES:
        cases.append({**case, "record": record_case(case)})
    out = {"deepspeed_version": deepspeed.__version__, "torch_version": torch.__version__.split("+")[0],
           "recorded_by": "tests/compat/record_schedulers.py",
           "engine": "deepspeed.initialize, 1 process, gloo, CPU, ZeRO stage 0, fp32, client optimizer",
           "cases": cases}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(format_json(out))
    n_steps = sum(len(c["record"]) for c in cases)
    print(f"wrote {args.out}: {len(cases)} cases, {n_steps} optimizer steps (DeepSpeed {deepspeed.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
