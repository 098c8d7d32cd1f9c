"""Pipeline checkpoints are the data-parallel engine's checkpoints: one format, loadable anywhere.

A dp2 x pp2 pipeline at ZeRO-3 trains STEPS steps and saves; the checkpoint then resumes

- in the data-parallel engine at dp4 (ZeRO-3, the same layers as an ``nn.Sequential``),
- in the data-parallel engine at world 1 (ZeRO-0, one process),
- in a pipeline of 4 stages (pp4, dp1, ZeRO-1),

each with the optimizer state, the scheduler and the counters: the two steps after the resume
reproduce the uninterrupted run's losses (the single-process reference, which the pipeline
matches, see test_pipeline_zero) within 1e-5, and ``flexspeed export``'s ``consolidate`` reads it.
Then every file of a pipeline checkpoint, replaced by a crafted pickle, is refused on every rank
as in the data-parallel path (test_checkpoint_integrity), and no pickle runs.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from flexspeed.testing import run_ranks
from tests.distributed.test_checkpoint_integrity import _damage
from tests.distributed.test_pipeline import (
    GAS,
    MICRO,
    STEPS,
    config,
    global_batch,
    make_engine,
    mse,
    reference,
    reference_model,
    train,
)

MORE = 2  # steps after the resume


def _save(rank: int, world: int, root: str) -> dict:
    engine, _ = make_engine("mlp", "1f1b", 1, 2, zero=3)
    losses = train(engine, "mlp", range(STEPS), 2)
    engine.save_checkpoint(root, client_state={"note": "pp"})
    return {"losses": losses, "state": engine.module.to_sequential_state_dict(), "world": world}


def _dp_engine(world: int, zero: int):
    import flexspeed

    cfg = config("1f1b", 1, zero=zero)
    cfg.pop("pipeline")
    # the same 16-sample global batch as dp2 x 4 micro-batches: micro 2 x accumulation (8 / world)
    cfg["gradient_accumulation_steps"] = 2 * GAS // world
    engine, *_ = flexspeed.initialize(model=reference_model("mlp"), config=cfg)
    return engine


def _dp_steps(engine, world: int, rank: int, steps: range) -> list[float]:
    import torch.distributed as dist

    gas = engine.gradient_accumulation_steps()
    losses = []
    for s in steps:
        x, y = global_batch("mlp", s, 2)
        total = torch.zeros(())
        for i in range(gas):
            lo = (rank * gas + i) * MICRO
            loss = mse(engine(x[lo:lo + MICRO]), y[lo:lo + MICRO])
            engine.backward(loss)
            engine.step()
            total += loss.detach()
        if dist.is_initialized():
            dist.all_reduce(total)
        losses.append(float(total) / (gas * world))
    return losses


def _full_state(engine) -> dict:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in engine.module.state_dict().items()}


def _resume_dp(rank: int, world: int, root: str, zero: int) -> dict:
    engine = _dp_engine(world, zero)
    path, client = engine.load_checkpoint(root)
    loaded = _full_state(engine)
    losses = _dp_steps(engine, world, rank, range(STEPS, STEPS + MORE))
    return {"path": path, "client": client, "loaded": loaded, "losses": losses, "steps": engine.global_steps,
            "opt_state": len(engine.optimizer.state)}


def _resume_pp4(rank: int, world: int, root: str) -> dict:
    engine, _ = make_engine("mlp", "1f1b", 1, 4, zero=1)
    path, client = engine.load_checkpoint(root)
    loaded = engine.module.to_sequential_state_dict()
    losses = train(engine, "mlp", range(STEPS, STEPS + MORE), 1)
    return {"path": path, "client": client, "loaded": loaded, "losses": losses, "steps": engine.global_steps}


def _refuse_crafted_pickles(rank: int, world: int, root: str, files: list[str]) -> dict:
    """Each file of the pipeline checkpoint in turn replaced by a pickle that would create a marker file."""
    import torch.distributed as dist

    engine, _ = make_engine("mlp", "1f1b", 1, 2, zero=3)
    before = engine.module.to_sequential_state_dict()
    out = {}
    for name in files:
        copy = os.path.join(root, "bad", name.replace("/", "_"))
        marker = copy + ".ran"
        if rank == 0:
            shutil.copytree(os.path.join(root, "good"), copy)
            _damage(os.path.join(copy, f"global_step{STEPS}", name), "pickle", marker)
        dist.barrier()
        try:
            engine.load_checkpoint(copy)
            out[name] = ("loaded", "")
        except Exception as e:  # noqa: BLE001 - the type and message are the result
            out[name] = (type(e).__name__, str(e))
        dist.barrier()
        out[name] += (os.path.exists(marker),)
    after = engine.module.to_sequential_state_dict()
    out["unchanged"] = all(torch.equal(before[k], after[k]) for k in before)
    out["steps"] = engine.global_steps
    return out


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[str, dict]:
    root = str(tmp_path_factory.mktemp("pipe_ckpt") / "good")
    res = run_ranks(_save, world_size=4, args=(root,), timeout=300)[0]
    return root, res


def _check_resume(got: dict, root: str, what: str, dp_after: int = 2) -> None:
    """``dp_after``: replicas of the resumed run's global batch (``test_pipeline.global_batch``)."""
    losses, states = reference("mlp", [2] * STEPS + [dp_after] * MORE)
    assert got["path"] == os.path.join(root, f"global_step{STEPS}") and got["client"] == {"note": "pp"}, what
    for k, v in states[STEPS - 1].items():
        torch.testing.assert_close(got["loaded"][k], v, rtol=0, atol=1e-5, msg=lambda m, k=k: f"{what} {k}: {m}")
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(losses[STEPS:]), rtol=0, atol=1e-5,
                               msg=lambda m: f"{what} losses after the resume: {m}")
    assert got["steps"] == STEPS + MORE, what


def test_saved_at_dp2_pp2_zero3_resumes_at_dp4_zero3(saved):
    root, res = saved
    losses, _ = reference("mlp", [2] * STEPS)
    torch.testing.assert_close(torch.tensor(res["losses"]), torch.tensor(losses), rtol=0, atol=1e-5)
    got = run_ranks(_resume_dp, world_size=4, args=(root, 3), timeout=300)[0]
    _check_resume(got, root, "dp4 ZeRO-3")


def test_saved_at_dp2_pp2_zero3_resumes_in_one_process(saved):
    root, _ = saved
    got = run_ranks(_resume_dp, world_size=1, args=(root, 0), timeout=300)[0]
    _check_resume(got, root, "world 1")
    assert got["opt_state"] == len(reference_model("mlp").state_dict())  # every parameter's Adam state came back


def test_saved_at_dp2_pp2_zero3_resumes_at_pp4(saved):
    root, _ = saved
    got = run_ranks(_resume_pp4, world_size=4, args=(root,), timeout=300)[0]
    _check_resume(got, root, "pp4 ZeRO-1", dp_after=1)  # one replica: global batches of 8 samples


def test_export_consolidates_a_pipeline_checkpoint(saved, tmp_path):
    from flexspeed.pipe import export_sequential_state_dict
    from flexspeed.runtime.export import consolidate

    root, res = saved
    _, states = reference("mlp", [2] * STEPS)
    state = consolidate(root)
    assert set(state) == set(states[-1])
    for k, v in states[-1].items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=1e-5)
    exported = export_sequential_state_dict(root, output_file=str(tmp_path / "model.safetensors"))
    reference_model("mlp").load_state_dict(exported)  # a plain nn.Sequential takes it as is
    assert [int(k.split(".")[0]) for k in exported] == sorted(int(k.split(".")[0]) for k in exported)
    assert os.path.isfile(tmp_path / "model.safetensors")
    # what `flexspeed export <dir> <file>` runs
    from safetensors.torch import load_file

    from flexspeed.runtime.export import export_folder

    export_folder(root, str(tmp_path / "cli"), single_file="weights.safetensors")
    written = load_file(str(tmp_path / "cli" / "weights.safetensors"))
    assert set(written) == set(states[-1]) and all(torch.equal(written[k], state[k]) for k in state)


def test_crafted_pickles_in_any_pipeline_checkpoint_file_are_refused(saved):
    root, _ = saved
    tag = os.path.join(root, f"global_step{STEPS}")
    files = sorted(os.path.relpath(os.path.join(d, f), tag) for d, _, fs in os.walk(tag) for f in fs)
    assert "engine_state.pt" in files and "state/.metadata" in files and "rng/rank3.pt" in files
    base = os.path.dirname(root)
    results = run_ranks(_refuse_crafted_pickles, world_size=4, args=(base, files), timeout=600)
    for rank, res in enumerate(results):
        assert res["unchanged"] and res["steps"] == 0, rank
        for name in files:
            kind, message, ran = res[name]
            assert not ran, f"{name}: a pickle ran code"
            assert kind in ("CheckpointError", "UnsafeCheckpointError"), (name, kind, message)
            assert "before anything was changed" in message, (name, message)


# ---- dp2 x pp2 (ZeRO-3) -> pp2 x tp2: tensor parallelism inside the stages (test_pipeline_tp's model) ------------
def _save_tp_model(rank: int, world: int, root: str) -> dict:
    from tests.distributed import test_pipeline_tp as tpm

    engine = tpm.make_engine(3, tp=1)
    losses = tpm.train(engine, range(STEPS))
    engine.save_checkpoint(root, client_state={"note": "pp"})
    return {"losses": losses}


def _resume_pp2_tp2(rank: int, world: int, root: str, out: str, zero: int) -> dict:
    from tests.distributed import test_pipeline_tp as tpm

    engine = tpm.make_engine(zero, tp=2)
    path, client = engine.load_checkpoint(root)
    loaded = engine.module.to_sequential_state_dict()
    opt_state = len(engine.optimizer.state)
    losses = tpm.train(engine, range(STEPS, STEPS + MORE))
    engine.save_checkpoint(out)  # a pp x tp checkpoint, for `flexspeed export`
    return {"path": path, "client": client, "loaded": loaded, "losses": losses, "steps": engine.global_steps,
            "opt_state": opt_state, "dtensors": sum(hasattr(p, "to_local") for p in engine.module.parameters()),
            "state": engine.module.to_sequential_state_dict(), "layout": engine.checkpoint_layout()}


def _tp_reference(dps: list[int]) -> tuple[list[float], list[dict]]:
    """test_pipeline_tp's reference, keeping the state after every step; step s uses ``dps[s]`` replicas' batch."""
    from flexspeed.runtime.optimizers import build_optimizer
    from tests.distributed import test_pipeline_tp as tpm
    from tests.distributed.test_pipeline import CLIP, set_deepspeed_lr

    model = tpm.reference_model()
    opt = build_optimizer("Adam", config("1f1b", 1)["optimizer"]["params"], model.parameters())
    losses, states = [], []
    for step, dp in enumerate(dps):
        x, y = tpm.batch(step, dp)
        opt.zero_grad()
        loss = mse(model(x), y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        set_deepspeed_lr(opt, step + 1)
        opt.step()
        losses.append(loss.item())
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return losses, states


def test_saved_at_dp2_pp2_zero3_resumes_at_pp2_tp2_and_exports(tmp_path):
    from flexspeed.runtime.export import consolidate

    root, out = str(tmp_path / "dp2pp2"), str(tmp_path / "pp2tp2")
    saved = run_ranks(_save_tp_model, world_size=4, args=(root,), timeout=300)[0]
    # after the resume one replica (dp1): the global batch is one replica's
    losses, states = _tp_reference([2] * STEPS + [1] * MORE)
    torch.testing.assert_close(torch.tensor(saved["losses"]), torch.tensor(losses[:STEPS]), rtol=0, atol=1e-5)
    got = run_ranks(_resume_pp2_tp2, world_size=4, args=(root, out, 1), timeout=300)[0]
    what = "dp2 x pp2 ZeRO-3 -> pp2 x tp2 ZeRO-1"
    assert got["path"] == os.path.join(root, f"global_step{STEPS}") and got["client"] == {"note": "pp"}, what
    assert got["dtensors"] > 0 and got["layout"]["tp"] == 2, got["layout"]  # the blocks really are tensor-parallel
    assert got["opt_state"] > 0, what  # Adam's moments came back (sharded over tp like their parameters)
    for k, v in states[STEPS - 1].items():
        torch.testing.assert_close(got["loaded"][k], v, rtol=0, atol=1e-5, msg=lambda m, k=k: f"{what} {k}: {m}")
    torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(losses[STEPS:]), rtol=0, atol=1e-5,
                               msg=lambda m: f"{what} losses after the resume: {m}")
    assert got["steps"] == STEPS + MORE
    # `flexspeed export` consolidates the pp x tp checkpoint into whole tensors
    state = consolidate(out)
    assert set(state) == set(states[-1])
    for k, v in states[-1].items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=1e-5, msg=lambda m, k=k: f"export {k}: {m}")
