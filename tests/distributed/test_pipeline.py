"""Pipeline parallelism equals a single-process reference on the same seed and global batch.

Two spawned groups keep this file fast: world 2 (2 stages) and world 4 (2 stages x 2
data-parallel replicas). Each loops over its grid - schedules 1f1b / gpipe / interleaved_1f1b,
an MLP and a tied-embedding model, activation checkpointing, ZeRO-1, bf16/fp16, eval_batch,
the engine's own data loader, and checkpoints reloaded under another partition or topology -
and returns rank 0's results; the reference runs in the test process. fp32 tolerance: 1e-5.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DistributedSampler, TensorDataset

from flexspeed.pipe import LayerSpec, TiedLayerSpec
from flexspeed.testing import run_ranks

MICRO, GAS, STEPS, LR, CLIP, SEED = 2, 4, 3, 1e-2, 0.05, 1234
VOCAB, HID, SEQ = 16, 8, 3
SCHEDULES = [("1f1b", 1), ("gpipe", 1), ("interleaved_1f1b", 2)]


# ---- models -----------------------------------------------------------------------------------------
def mlp_specs() -> list:
    return [LayerSpec(nn.Linear, 8, 16), LayerSpec(nn.Tanh), LayerSpec(nn.Linear, 16, 16), LayerSpec(nn.Tanh),
            LayerSpec(nn.Linear, 16, 16), LayerSpec(nn.Tanh), LayerSpec(nn.Linear, 16, 4)]


def lm_head(embedding: nn.Embedding, h: torch.Tensor) -> torch.Tensor:
    return h @ embedding.weight.t()  # (B, T, H) -> (B, T, V)


def tied_specs() -> list:
    return [TiedLayerSpec("embed", nn.Embedding, VOCAB, HID), LayerSpec(nn.Linear, HID, HID), LayerSpec(nn.Tanh),
            LayerSpec(nn.Linear, HID, HID), LayerSpec(nn.Tanh),
            TiedLayerSpec("embed", nn.Embedding, VOCAB, HID, forward_fn=lm_head)]


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(out, target)


def token_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


KINDS = {"mlp": (mlp_specs, mse), "tied": (tied_specs, token_ce)}


class TiedReference(nn.Module):
    """A tied pipeline model as one module: one embedding used at both ends, layer i of ``specs``
    seeded with SEED + i (as the pipeline builds it)."""

    def __init__(self, specs: list | None = None) -> None:
        super().__init__()
        specs = tied_specs() if specs is None else specs
        torch.manual_seed(SEED)
        self.embed = specs[0].build()
        self.last = len(specs) - 1
        body = []
        for i in range(1, self.last):
            torch.manual_seed(SEED + i)
            body.append(specs[i].build())
        self.body = nn.Sequential(*body)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return lm_head(self.embed, self.body(self.embed(ids)))

    def sequential_state(self) -> dict[str, torch.Tensor]:
        out = {"0.weight": self.embed.weight, f"{self.last}.weight": self.embed.weight}
        out.update({f"{int(k.split('.')[0]) + 1}.{k.split('.', 1)[1]}": v for k, v in self.body.state_dict().items()})
        return {k: v.detach().clone() for k, v in out.items()}


def reference_model(kind: str) -> nn.Module:
    if kind == "tied":
        return TiedReference()
    layers = []
    for i, spec in enumerate(mlp_specs()):
        torch.manual_seed(SEED + i)  # what seed_layers=True does on the owning stage
        layers.append(spec.build())
    return nn.Sequential(*layers)


def ref_state(kind: str, model: nn.Module) -> dict[str, torch.Tensor]:
    if kind == "tied":
        return model.sequential_state()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---- data and config ----------------------------------------------------------------------------
def global_batch(kind: str, step: int, dp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``step``'s global batch: replica d takes micro-batches d*GAS .. d*GAS+GAS-1."""
    g = torch.Generator().manual_seed(100 + step)
    n = dp * GAS * MICRO
    if kind == "tied":
        return torch.randint(0, VOCAB, (n, SEQ), generator=g), torch.randint(0, VOCAB, (n, SEQ), generator=g)
    return torch.randn(n, 8, generator=g), torch.randn(n, 4, generator=g)


def micro_batches(kind: str, step: int, dp: int, dp_rank: int) -> list:
    x, y = global_batch(kind, step, dp)
    return [(x[(dp_rank * GAS + i) * MICRO:(dp_rank * GAS + i + 1) * MICRO],
             y[(dp_rank * GAS + i) * MICRO:(dp_rank * GAS + i + 1) * MICRO]) for i in range(GAS)]


def config(schedule: str, virtual: int, *, zero: int = 0, precision: str = "fp32", monitor: str | None = None) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": GAS,
           "optimizer": {"type": "Adam", "params": {"lr": LR}}, "gradient_clipping": CLIP,
           "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": LR,
                                                        "warmup_num_steps": 3}},
           "pipeline": {"schedule": schedule, "virtual_stages": virtual},
           "zero_optimization": {"stage": zero, **({"stage3_param_persistence_threshold": 0} if zero == 3 else {})},
           "steps_per_print": 1000}
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    if precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8}
    if monitor is not None:  # scalars to CSV, the log line every step, the wall-clock breakdown
        cfg.update(csv_monitor={"enabled": True, "output_path": monitor, "job_name": "pipe"},
                   wall_clock_breakdown=True, steps_per_print=1)
    return cfg


# ---- the pipeline side (inside the ranks) -------------------------------------------------------
def make_engine(kind: str, schedule: str, virtual: int, pp: int, **kw):
    import flexspeed
    from flexspeed.pipe import PipelineModule

    specs, loss = KINDS[kind]
    model = PipelineModule(specs(), num_stages=pp, loss_fn=loss, seed_layers=True,
                           partition_method=kw.pop("partition_method", "parameters"),
                           activation_checkpoint_interval=kw.pop("ckpt_interval", 0))
    data = kw.pop("training_data", None)
    engine, _, loader, _ = flexspeed.initialize(model=model, model_parameters=model.parameters(),
                                                training_data=data, config=config(schedule, virtual, **kw))
    return engine, loader


def train(engine, kind: str, steps: range, dp: int) -> list[float]:
    return [float(engine.train_batch(iter(micro_batches(kind, s, dp, engine.dp_rank)))) for s in steps]


def run_case(kind: str, schedule: str, virtual: int, pp: int, **kw) -> dict:
    dp = int(os.environ["WORLD_SIZE"]) // pp
    engine, _ = make_engine(kind, schedule, virtual, pp, **kw)
    losses = train(engine, kind, range(STEPS), dp)
    state = engine.module.to_sequential_state_dict()
    return {"losses": losses, "state": state, "norm": engine.get_global_grad_norm(), "lr": engine.get_lr(),
            "steps": engine.global_steps, "opt_states": len(engine.optimizer.state),
            "params": sum(1 for _ in engine.module.parameters())}


def ckpt_roundtrip(save_case: dict, load_case: dict, directory: str) -> dict:
    """Train STEPS steps under one layout, save; load under another and train one more step."""
    world = int(os.environ["WORLD_SIZE"])
    engine, _ = make_engine(**save_case)
    train(engine, save_case["kind"], range(STEPS), world // save_case["pp"])
    engine.save_checkpoint(directory, client_state={"note": "hi"})
    saved = engine.module.to_sequential_state_dict()
    other, _ = make_engine(**load_case)
    path, client = other.load_checkpoint(directory)
    loaded = other.module.to_sequential_state_dict()
    extra = train(other, load_case["kind"], range(STEPS, STEPS + 1), world // load_case["pp"])
    return {"saved": saved, "loaded": loaded, "client": client, "steps": other.global_steps, "path": path,
            "extra_loss": extra, "state": other.module.to_sequential_state_dict(), "lr": other.get_lr()}


def world2(rank: int, world: int, directory: str) -> dict | None:
    out: dict = {}
    for kind in ("mlp", "tied"):
        for schedule, virtual in SCHEDULES:
            out[(kind, schedule)] = run_case(kind, schedule, virtual, 2)
    out["ckpt_interval"] = run_case("mlp", "1f1b", 1, 2, ckpt_interval=2)
    out["bf16"] = run_case("mlp", "1f1b", 1, 2, precision="bf16")
    out["fp16"] = run_case("mlp", "gpipe", 1, 2, precision="fp16")
    # eval after training, against the trained reference
    engine, _ = make_engine("mlp", "1f1b", 1, 2)
    train(engine, "mlp", range(STEPS), 1)
    batches = micro_batches("mlp", 99, 1, 0)
    loss, logits = engine.eval_batch(iter(batches), return_logits=True)
    per_mb = engine.eval_batch(iter(batches), reduce_output=None)
    after = float(engine.train_batch(iter(micro_batches("mlp", STEPS, 1, 0))))  # train again after eval
    refused = []
    for call in (lambda: engine(batches[0][0]), lambda: engine.backward(None), lambda: engine.step()):
        try:
            call()
        except RuntimeError as err:
            refused.append(str(err))
    out["refused"] = refused
    out["eval"] = {"loss": float(loss), "per_mb": [float(x) for x in per_mb], "after": after,
                   "logits": None if logits is None else logits.detach().clone(), "last": engine.is_last_stage()}
    # the engine's own loader (initialize(training_data=...)), pulled by train_batch()
    x, y = global_batch("mlp", 0, 8)
    engine, loader = make_engine("mlp", "gpipe", 1, 2, training_data=TensorDataset(x, y))
    out["loader"] = {"losses": [float(engine.train_batch()) for _ in range(STEPS)],
                     "state": engine.module.to_sequential_state_dict(), "is_loader": loader is not None}
    # monitors: rank 0 writes the CSV scalars and prints the log line
    engine, _ = make_engine("mlp", "1f1b", 1, 2, monitor=os.path.join(directory, "monitor"))
    out["monitor"] = {"losses": train(engine, "mlp", range(STEPS), 1), "lr": engine.get_lr()}
    engine.monitor.close()
    # checkpoint: 1f1b / parameters partition -> interleaved / uniform partition
    out["ckpt"] = ckpt_roundtrip(dict(kind="mlp", schedule="1f1b", virtual=1, pp=2),
                                 dict(kind="mlp", schedule="interleaved_1f1b", virtual=2, pp=2,
                                      partition_method="uniform"), directory)
    return out if rank == 0 else {"logits": out["eval"]["logits"]}


def world4(rank: int, world: int, directory: str) -> dict | None:
    out: dict = {}
    for kind in ("mlp", "tied"):
        for schedule, virtual in SCHEDULES:
            out[(kind, schedule)] = run_case(kind, schedule, virtual, 2)
    out["zero1"] = run_case("mlp", "1f1b", 1, 2, zero=1)
    # checkpoint: 2 stages x 2 replicas with ZeRO-1 -> 4 stages x 1 replica
    out["ckpt"] = ckpt_roundtrip(dict(kind="mlp", schedule="1f1b", virtual=1, pp=2, zero=1),
                                 dict(kind="mlp", schedule="1f1b", virtual=1, pp=4), os.path.join(directory, "mlp"))
    # tied weights: interleaved 2 x 2 chunks x 2 replicas -> 4 stages, the tie now spans ranks 0 and 3
    out["ckpt_tied"] = ckpt_roundtrip(dict(kind="tied", schedule="interleaved_1f1b", virtual=2, pp=2),
                                      dict(kind="tied", schedule="1f1b", virtual=1, pp=4),
                                      os.path.join(directory, "tied"))
    return out if rank == 0 else None


# ---- the reference side ---------------------------------------------------------------------------
def set_deepspeed_lr(opt, step: int) -> None:
    """The lr DeepSpeed's WarmupLR (the config's) gives optimizer step ``step`` (1-based), not flexspeed's."""
    from tests.compat.ds_reference import deepspeed_warmup_lr

    lr = deepspeed_warmup_lr(step, **config("1f1b", 1)["scheduler"]["params"])
    for group in opt.param_groups:
        group["lr"] = lr


def reference(kind: str, dps: list[int]) -> tuple[list[float], list[dict]]:
    """Train the single-process model; step s uses the global batch of ``dps[s]`` replicas.

    Returns the losses and the state after every step.
    """
    from flexspeed.runtime.optimizers import build_optimizer

    model = reference_model(kind)
    cfg = config("1f1b", 1)
    opt = build_optimizer("Adam", cfg["optimizer"]["params"], model.parameters())
    loss_fn = KINDS[kind][1]
    losses, states = [], []
    for step, dp in enumerate(dps):
        x, y = global_batch(kind, step, dp)
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        set_deepspeed_lr(opt, step + 1)
        opt.step()
        losses.append(loss.item())
        states.append(ref_state(kind, model))
    return losses, states


def assert_matches(got: dict, ref_losses: list[float], ref_final: dict, atol: float = 1e-5, what: str = "") -> None:
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(ref_losses), rtol=0, atol=atol,
                               msg=lambda m: f"{what} losses: {m}")
    assert set(got["state"]) == set(ref_final), what
    for k, v in ref_final.items():
        torch.testing.assert_close(got["state"][k], v, rtol=0, atol=atol, msg=lambda m, k=k: f"{what} {k}: {m}")


@pytest.fixture(scope="module")
def refs() -> dict:
    out = {}
    for dp in (1, 2):
        for kind in ("mlp", "tied"):
            out[(kind, dp)] = reference(kind, [dp] * STEPS)
    return out


def test_world2_two_stages_match_reference(tmp_path, refs):
    res, last = run_ranks(world2, world_size=2, args=(str(tmp_path),), timeout=300)
    for kind in ("mlp", "tied"):
        losses, states = refs[(kind, 1)]
        for schedule, _ in SCHEDULES:
            got = res[(kind, schedule)]
            assert_matches(got, losses, states[-1], what=f"{kind}/{schedule}")
            assert got["steps"] == STEPS and got["norm"] > CLIP  # clipping was active
    losses, states = refs[("mlp", 1)]
    assert_matches(res["ckpt_interval"], losses, states[-1], what="activation checkpointing")
    # 16-bit compute: close to fp32, not equal
    assert_matches(res["bf16"], losses, states[-1], atol=3e-2, what="bf16")
    assert_matches(res["fp16"], losses, states[-1], atol=3e-2, what="fp16")
    # eval_batch after training: the trained reference's loss on the same batch
    ref_model = reference_model("mlp")
    ref_model.load_state_dict(states[-1])
    x, y = global_batch("mlp", 99, 1)
    with torch.no_grad():
        mb_losses = [mse(ref_model(x[i * MICRO:(i + 1) * MICRO]), y[i * MICRO:(i + 1) * MICRO]).item()
                     for i in range(GAS)]
        logits = ref_model(x)
    ev = res["eval"]
    assert abs(ev["loss"] - sum(mb_losses) / GAS) < 1e-5
    torch.testing.assert_close(torch.tensor(ev["per_mb"]), torch.tensor(mb_losses), rtol=0, atol=1e-5)
    assert len(res["refused"]) == 3 and all("train_batch" in m for m in res["refused"])
    assert ev["logits"] is None and not ev["last"]  # rank 0 is the first stage: no logits there
    torch.testing.assert_close(last["logits"], logits, rtol=0, atol=1e-5)  # the last stage has them all
    ref4, _ = reference("mlp", [1] * (STEPS + 1))
    assert abs(ev["after"] - ref4[STEPS]) < 1e-5  # eval did not disturb training
    # the engine's loader serves the DistributedSampler order (one replica, shuffled, seed 0)
    x, y = global_batch("mlp", 0, 8)
    order = list(DistributedSampler(TensorDataset(x, y), num_replicas=1, rank=0, shuffle=True, seed=0))
    model = reference_model("mlp")
    from flexspeed.runtime.optimizers import build_optimizer

    opt = build_optimizer("Adam", {"lr": LR}, model.parameters())
    loader_losses = []
    for s in range(STEPS):
        idx = order[s * GAS * MICRO:(s + 1) * GAS * MICRO]
        opt.zero_grad()
        loss = mse(model(x[idx]), y[idx])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        set_deepspeed_lr(opt, s + 1)
        opt.step()
        loader_losses.append(loss.item())
    assert res["loader"]["is_loader"]
    assert_matches(res["loader"], loader_losses, ref_state("mlp", model), what="engine loader")
    _check_ckpt(res["ckpt"], [1] * (STEPS + 1), str(tmp_path))
    _check_monitor(res["monitor"], tmp_path / "monitor" / "pipe")


def _check_monitor(got: dict, folder) -> None:
    import csv

    def column(name: str) -> list[tuple[int, float]]:
        with open(folder / f"Train_Samples_{name}.csv") as f:
            rows = list(csv.reader(f))[1:]
        return [(int(step), float(value)) for step, value in rows]

    samples = [(s + 1) * GAS * MICRO for s in range(STEPS)]
    loss = column("train_loss")
    assert [s for s, _ in loss] == samples
    torch.testing.assert_close(torch.tensor([v for _, v in loss]), torch.tensor(got["losses"]), rtol=0, atol=1e-6)
    assert [s for s, _ in column("lr")] == samples and column("lr")[-1][1] == pytest.approx(got["lr"][0])
    for timer in ("pipeline", "step"):  # wall_clock_breakdown writes one row per step (values: benchmarks' business)
        assert [s for s, _ in column(f"elapsed_time_ms_{timer}")] == samples


def test_world4_two_stages_two_replicas_match_reference(tmp_path, refs):
    res = run_ranks(world4, world_size=4, args=(str(tmp_path),), timeout=300)[0]
    for kind in ("mlp", "tied"):
        losses, states = refs[(kind, 2)]
        for schedule, _ in SCHEDULES:
            assert_matches(res[(kind, schedule)], losses, states[-1], what=f"{kind}/{schedule} dp=2")
    losses, states = refs[("mlp", 2)]
    z = res["zero1"]
    assert_matches(z, losses, states[-1], what="zero1")
    assert 0 < z["opt_states"] < z["params"]  # this replica holds optimizer state for its shard only
    _check_ckpt(res["ckpt"], [2] * STEPS + [1], os.path.join(tmp_path, "mlp"))
    _check_ckpt(res["ckpt_tied"], [2] * STEPS + [1], os.path.join(tmp_path, "tied"), kind="tied")


def _check_ckpt(ck: dict, dps: list[int], directory: str, kind: str = "mlp") -> None:
    from flexspeed.pipe import export_sequential_state_dict

    losses, states = reference(kind, dps)
    assert ck["client"] == {"note": "hi"} and ck["steps"] == STEPS + 1
    assert ck["path"] == os.path.join(directory, f"global_step{STEPS}")
    for k, v in ck["saved"].items():
        torch.testing.assert_close(ck["loaded"][k], v, rtol=0, atol=0)
    # the step after loading equals the reference's next step: optimizer and scheduler state came back
    assert abs(ck["extra_loss"][0] - losses[STEPS]) < 1e-5
    for k, v in states[-1].items():
        torch.testing.assert_close(ck["state"][k], v, rtol=0, atol=1e-5)
    exported = export_sequential_state_dict(directory)
    assert set(exported) == set(states[STEPS - 1])
    assert [int(k.split(".")[0]) for k in exported] == sorted(int(k.split(".")[0]) for k in exported)
    for k, v in states[STEPS - 1].items():
        torch.testing.assert_close(exported[k], v, rtol=0, atol=1e-5)
    if kind == "mlp":
        reference_model("mlp").load_state_dict(exported)  # a plain nn.Sequential takes it as is
