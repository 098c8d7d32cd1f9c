"""Engine behaviours a DeepSpeed user relies on, at world size 2 (issue 14):

- unused parameters (HelloDeepSpeed's BERT pooler) train at ZeRO stages 0-3 under DeepSpeed's default
  ``ignore_unused_parameters: true``, equal to one plain-PyTorch process; ``false`` stops with a clear error
  (DeepSpeed's ``tests/unit/runtime/zero/test_ignore_unused_parameters.py``);
- after ``initialize()`` every rank holds rank 0's weights and buffers at every stage, whatever each rank
  seeded, and keeps holding the same weights while training (DeepSpeed broadcasts at engine construction);
- ZeRO-1 with frozen parameters (and a rank whose parameters never had a gradient) resumes with
  ``load_optimizer_states=True`` instead of deadlocking; frozen parameters are not partitioned;
- ``no_sync()`` reduces nothing inside the block even at gradient accumulation 1, and keeps DeepSpeed's
  guards (``tests/unit/runtime/test_no_sync_ctxt.py``).

fp32 tolerance against the single-process reference: 1e-5 (the order of the cross-rank sums differs; see
test_zero_parity.py). One spawned group runs every case; the deadlock case has its own short-timeout group.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from flexspeed.testing import run_ranks
from tests.distributed._parity import global_batches, make_dataset, make_model, reference_run
from tests.distributed.test_zero_parity import full_state, zero_config

STEPS, LR, CLIP, MICRO, GAS = 3, 1e-3, 0.5, 4, 2
STAGES = (0, 1, 2, 3)


class PooledGPT(nn.Module):
    """The tiny GPT plus a pooler its loss never uses (as HelloDeepSpeed's BERT) and a random buffer."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.gpt = make_model(seed)  # seeds the RNG, then builds
        self.pooler = nn.Linear(32, 32)
        self.register_buffer("noise", torch.randn(8))

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.gpt(x, y)


def _engine(model: nn.Module, stage: int, **zero: object):
    import flexspeed

    cfg = zero_config(stage=stage, precision="fp32", gas=GAS, micro=MICRO, world=2, **zero)
    engine, _, loader, _ = flexspeed.initialize(model=model, model_parameters=model.parameters(),
                                               training_data=make_dataset(), config=cfg)
    return engine, loader


def _train(engine, loader) -> list[float]:
    losses, it = [], iter(loader)
    for _ in range(STEPS * GAS):
        x, y = next(it)
        loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    return [sum(losses[k * GAS:(k + 1) * GAS]) / GAS for k in range(STEPS)]


# ---- inside the ranks ------------------------------------------------------------------------------
def unused_run(stage: int) -> dict:
    engine, loader = _engine(PooledGPT(), stage)
    losses = _train(engine, loader)
    pooler_grad = [p.grad for p in engine.module.pooler.parameters()]
    return {"losses": losses, "state": full_state(engine.module), "pooler_grad": pooler_grad}


def refused_unused(stage: int) -> str:
    engine, loader = _engine(PooledGPT(), stage, ignore_unused_parameters=False)
    try:
        _train(engine, loader)
    except AssertionError as err:  # DeepSpeed raises AssertionError; flexspeed's EngineUsageError is one
        return f"{type(err).__name__}: {err}"
    return "trained"


def seeded_run(rank: int, stage: int, zero_init: bool) -> dict:
    """Each rank seeds differently; the full weights right after initialize() and after training."""
    import flexspeed

    if zero_init:
        torch.manual_seed(100 + rank)
        with flexspeed.zero.Init():
            model = Stack()
        engine, _ = _engine(model, stage, stage3_param_persistence_threshold=0)
    else:
        engine, loader = _engine(PooledGPT(seed=100 + rank), stage, stage3_param_persistence_threshold=1100)
    initial = full_state(engine.module)
    x = torch.randn(MICRO, 8) if zero_init else None
    for _ in range(GAS if zero_init else 0):  # Stack: its own data
        engine.backward(engine(x).pow(2).mean())
        engine.step()
    if not zero_init:
        _train(engine, loader)
    return {"initial": initial, "trained": full_state(engine.module)}


class Stack(nn.Module):
    """Built under zero.Init: Linear/LayerNorm parameters (reset_parameters) and a random buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.norm = nn.LayerNorm(8)
        self.register_buffer("noise", torch.randn(8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return self.norm(x) + self.noise


class FrozenBig(nn.Module):
    """A frozen Linear larger than the two trainable vectors together."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.frozen = nn.Linear(16, 16).requires_grad_(False)
        self.a = nn.Parameter(torch.randn(64))
        self.b = nn.Parameter(torch.randn(64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.frozen(x).sum() + self.a.sum() + self.b.sum()


def frozen_partition() -> int:
    """ZeRO-1: how many parameters this rank steps (frozen ones must not count in the partition)."""
    import flexspeed

    cfg = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
           "zero_optimization": {"stage": 1}}
    model = FrozenBig()
    engine, opt, *_ = flexspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    engine.backward(engine(torch.ones(16)))
    engine.step()
    return len(opt.state)


def no_sync_run(rank: int, stage: int) -> dict:
    """Accumulation 1: one backward inside no_sync (local), one outside (reduces both), then step."""
    import flexspeed

    model = make_model()
    cfg = zero_config(stage=stage, precision="fp32", gas=1, micro=MICRO, world=2)
    engine, *_ = flexspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    (x1, y1), (x2, y2) = _rank_batches(rank)
    with engine.no_sync():
        engine.backward(engine(x1, y1))
        inside = engine.module.lm_head.weight.grad.clone()
        errors = []
        for call in (engine.step, lambda: engine.no_sync().__enter__()):
            try:
                call()
            except AssertionError as err:
                errors.append(str(err))
    engine.backward(engine(x2, y2))
    reduced = engine.module.lm_head.weight.grad.clone()
    engine.step()
    return {"inside": inside, "reduced": reduced, "errors": errors, "state": full_state(engine.module),
            "steps": engine.global_steps}


def _rank_batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Two micro-batches per rank, cut from the same two global batches on every rank."""
    x, y = make_dataset()[:][0][:4 * MICRO], make_dataset()[:][1][:4 * MICRO]
    out = []
    for k in range(2):
        lo = (2 * k + rank) * MICRO
        out.append((x[lo:lo + MICRO], y[lo:lo + MICRO]))
    return out


def no_sync_refused(stage: int) -> str:
    import flexspeed

    model = make_model()
    cfg = zero_config(stage=stage, precision="fp32", gas=1, micro=MICRO, world=2)
    engine, *_ = flexspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    try:
        with engine.no_sync():
            pass
    except AssertionError as err:
        return str(err)
    return "entered"


def _world2(rank: int, world: int) -> dict:
    return {
        "unused": [unused_run(s) for s in STAGES],
        "seeded": [seeded_run(rank, s, False) for s in STAGES] + [seeded_run(rank, 3, True)],
        "frozen_partition": frozen_partition(),
        "no_sync": [no_sync_run(rank, s) for s in (0, 1)],
        "no_sync_refused": [no_sync_refused(s) for s in (2, 3)],
        # last: with ignore_unused_parameters false an error ends the accumulation step half-way
        "refused": [refused_unused(s) for s in STAGES],
    }


@pytest.fixture(scope="module")
def world2() -> list[dict]:
    return run_ranks(_world2, world_size=2, timeout=300)


# ---- the checks ------------------------------------------------------------------------------------
def test_unused_parameters_train_at_every_stage_like_one_process(world2):
    batches = global_batches(make_dataset(), world=2, micro=MICRO, gas=GAS, steps=STEPS)
    ref_losses, ref_state = reference_run(PooledGPT(), batches, lr=LR, clip=CLIP)
    for stage, r0, r1 in zip(STAGES, world2[0]["unused"], world2[1]["unused"]):
        got = [(a + b) / 2 for a, b in zip(r0["losses"], r1["losses"])]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(ref_losses), rtol=0, atol=1e-5,
                                   msg=lambda m, s=stage: f"stage {s}: {m}")
        for k, v in ref_state.items():
            torch.testing.assert_close(r0["state"][k], v, rtol=0, atol=1e-5, msg=lambda m, k=k, s=stage: f"{s} {k}: {m}")
            torch.testing.assert_close(r1["state"][k], r0["state"][k], rtol=0, atol=0)
        assert r0["pooler_grad"] == [None, None], stage  # untouched, as in one process


def test_ignore_unused_parameters_false_stops_with_the_key_and_the_fix(world2):
    for stage, message in zip(STAGES, world2[0]["refused"]):
        assert message.startswith("EngineUsageError"), (stage, message)
        assert "ignore_unused_parameters" in message and "pooler.weight" in message, (stage, message)
        assert "Fix:" in message, message


def test_every_rank_holds_rank0s_weights_and_buffers_at_every_stage(world2):
    expected = PooledGPT(seed=100).state_dict()  # what rank 0 built
    cases = [f"stage {s}" for s in STAGES] + ["stage 3, zero.Init"]
    for i, case in enumerate(cases):
        r0, r1 = world2[0]["seeded"][i], world2[1]["seeded"][i]
        if i < len(STAGES):
            assert set(r0["initial"]) == set(expected), case
            for k, v in expected.items():
                torch.testing.assert_close(r0["initial"][k], v, rtol=0, atol=0, msg=lambda m, k=k: f"{case} {k}: {m}")
        for when in ("initial", "trained"):
            for k, v in r0[when].items():
                torch.testing.assert_close(r1[when][k], v, rtol=0, atol=0, msg=lambda m, k=k: f"{case} {when} {k}: {m}")
    # zero.Init: rank 0's random state decides; rank 1's different seed has no say
    import flexspeed
    from flexspeed.zero import materialize_module

    torch.manual_seed(100)
    with flexspeed.zero.Init():
        local = Stack()
    materialize_module(local, torch.device("cpu"))
    for k, v in local.state_dict().items():
        torch.testing.assert_close(world2[0]["seeded"][-1]["initial"][k], v, rtol=0, atol=0, msg=k)


def test_zero1_does_not_partition_frozen_parameters(world2):
    # each rank owns one of the two trainable vectors; the big frozen weight counts for nobody
    assert [r["frozen_partition"] for r in world2] == [1, 1]


def test_no_sync_reduces_nothing_inside_even_at_accumulation_1(world2):
    ds = make_dataset()
    x, y = ds[:][0][:4 * MICRO], ds[:][1][:4 * MICRO]
    model = make_model()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    for k in range(2):  # the two accumulated micro-batches, each the mean over both ranks' samples
        model(x[2 * k * MICRO:(2 * k + 2) * MICRO], y[2 * k * MICRO:(2 * k + 2) * MICRO]).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
    opt.step()
    for stage, r0, r1 in zip((0, 1), world2[0]["no_sync"], world2[1]["no_sync"]):
        assert not torch.allclose(r0["inside"], r1["inside"]), stage  # each rank kept its own gradient
        torch.testing.assert_close(r0["reduced"], r1["reduced"], rtol=0, atol=0)
        assert r0["steps"] == 1, stage
        for k, v in model.state_dict().items():
            torch.testing.assert_close(r0["state"][k], v, rtol=0, atol=1e-5, msg=lambda m, k=k: f"{stage} {k}: {m}")
        step_error, reentry_error = r0["errors"]
        assert "It is illegal to call Engine.step() inside no_sync context manager" in step_error
        assert "no_sync context manager reentry is unsupported" in reentry_error


def test_no_sync_is_refused_at_stages_2_and_3(world2):
    for stage, message in zip((2, 3), world2[0]["no_sync_refused"]):
        assert f"no_sync context manager is incompatible with gradient partitioning logic of ZeRO stage {stage}" \
            in message, message


# ---- ZeRO-1 + frozen parameters + load_checkpoint(load_optimizer_states=True) ----------------------
class FrozenBody(nn.Module):
    """A frozen body and one trainable weight: at 2 ranks one rank owns no trainable parameter."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(32, 32).requires_grad_(False)
        self.head = nn.Linear(32, 4, bias=False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (self.head(torch.tanh(self.body(x))) - y).pow(2).mean()


def _zero1_resume(rank: int, world: int, directory: str) -> dict:
    import flexspeed

    cfg = {"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "Adam", "params": {"lr": 1e-2}},
           "zero_optimization": {"stage": 1}}
    g = torch.Generator().manual_seed(rank)
    data = [(torch.randn(2, 32, generator=g), torch.randn(2, 4, generator=g)) for _ in range(3)]
    engine, *_ = flexspeed.initialize(model=FrozenBody(), config=cfg)
    for x, y in data[:2]:
        engine.backward(engine(x, y))
        engine.step()
    engine.save_checkpoint(directory)
    engine.backward(engine(*data[2]))
    engine.step()
    resumed, *_ = flexspeed.initialize(model=FrozenBody(), config=cfg)
    resumed.load_checkpoint(directory, load_optimizer_states=True)
    own_state = len(resumed.optimizer.state)
    resumed.backward(resumed(*data[2]))
    resumed.step()
    return {"continued": full_state(engine.module), "resumed": full_state(resumed.module), "own_state": own_state}


def test_zero1_frozen_parameters_resume_with_optimizer_states(tmp_path):
    # a rank without optimizer state re-creates it with a zero step while loading, which used to
    # broadcast its (empty) partition in a collective the other rank never joined; the short
    # timeout turns a regression into a failure instead of a hang
    r0, r1 = run_ranks(_zero1_resume, world_size=2, args=(str(tmp_path),), timeout=90)
    assert r0["own_state"] == 1 and r1["own_state"] == 0  # rank 0 owns head.weight, rank 1 nothing
    for r in (r0, r1):
        for k, v in r["continued"].items():
            torch.testing.assert_close(r["resumed"][k], v, rtol=0, atol=0, msg=k)
