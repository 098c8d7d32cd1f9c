"""Checkpoints across world sizes and ZeRO stages, with gloo ranks.

One world-2 group trains N_BEFORE steps at every stage, saves, trains N_AFTER more (the
uninterrupted reference), and resumes in fresh engines at world 2 (same and other stages). Groups
at world 1 and world 4 resume the same checkpoints at other stages. Tolerances on the per-step
global loss: 1e-6 at an unchanged world size (the same reductions in the same order: in practice
bit-identical), 1e-5 at a changed one (a different number of ranks/micro-batches sums the same
gradients in a different order, so float32 rounding differs; observed ~2.4e-7).

Another world-2 group is killed (SIGKILL on rank 0) in the middle of a save: ``latest`` still
names the previous tag, which loads.
"""

from __future__ import annotations

import os
import signal
import warnings

import pytest
import torch

from flexspeed.testing import RanksFailed, run_ranks
from tests.distributed._ckpt_common import N_AFTER, N_BEFORE, build, build_local, eval_loss, train

STAGES = (0, 1, 2, 3)
SAME_WORLD = [(s, s) for s in STAGES] + [(2, 3), (2, 0), (3, 1)]  # (saved at stage, resumed at stage)
WORLD1 = [(2, 0), (2, 3), (0, 0), (1, 2), (3, 3)]
WORLD4 = [(2, 2), (2, 3), (0, 1)]
SAME_TOL, CHANGED_TOL = 1e-6, 1e-5


def _stage_extra(stage: int) -> dict:
    zero = {"stage": stage, "stage3_param_persistence_threshold": 0}
    if stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    return {"zero_optimization": zero}


def _resume(world: int, root: str, src: int, dst: int) -> dict:
    engine, loader = build(world, dst, seed=3, **_stage_extra(dst))
    torch.manual_seed(999)  # the checkpoint must restore the saved RNG stream, not keep this one
    path, client = engine.load_checkpoint(os.path.join(root, f"s{src}"))
    rng = torch.get_rng_state()
    assert client == {"stage": src}, client
    assert engine.global_steps == N_BEFORE and engine.global_samples == N_BEFORE * 8
    evaluated = eval_loss(engine.module)
    return {"losses": train(engine, iter(loader), N_AFTER), "rng": rng, "eval": evaluated, "path": path}


def _tag_checks(engine, root: str, rank: int) -> dict:
    """Ranks passing different tags: Fail raises on every rank; Warn saves under rank 0's tag."""
    out = {}
    engine.config.checkpoint.tag_validation = "Fail"
    try:
        engine.save_checkpoint(os.path.join(root, "tags"), tag=f"r{rank}")
        out["fail"] = "saved"
    except ValueError as e:
        out["fail"] = str(e)
    engine.config.checkpoint.tag_validation = "Warn"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine.save_checkpoint(os.path.join(root, "tags"), tag=f"r{rank}")
    out["warn"] = [str(w.message) for w in caught if "different tags" in str(w.message)]
    return out


def _world2_group(rank: int, world: int, root: str) -> dict:
    from flexspeed.runtime.checkpoint import save_16bit_model

    saved = {}
    for stage in STAGES:
        engine, loader = build(world, stage, **_stage_extra(stage))
        it = iter(loader)
        before = train(engine, it, N_BEFORE)
        rng = torch.get_rng_state()
        engine.save_checkpoint(os.path.join(root, f"s{stage}"), client_state={"stage": stage})
        entry = {"before": before, "rng": rng, "eval": eval_loss(engine.module)}
        if stage == 3:
            entry["saved16"] = save_16bit_model(engine, os.path.join(root, "s3_16bit"))
        if stage == 0:
            entry["tags"] = _tag_checks(engine, root, rank)
        entry["after"] = train(engine, it, N_AFTER)
        saved[stage] = entry
    resumed = {pair: _resume(world, root, *pair) for pair in SAME_WORLD}
    return {"saved": saved, "resumed": resumed}


def _resume_group(rank: int, world: int, root: str, pairs: list) -> dict:
    return {pair: _resume(world, root, *pair) for pair in pairs}


@pytest.fixture(scope="module")
def world2(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ckpt_w2"))
    results = run_ranks(_world2_group, world_size=2, args=(root,), timeout=400)
    return root, results


def _check_losses(resumed: dict, saved: dict, tol: float) -> None:
    for (src, dst), got in resumed.items():
        want = saved[src]["after"]
        torch.testing.assert_close(torch.tensor(got["losses"]), torch.tensor(want), rtol=0, atol=tol,
                                   msg=lambda m, s=src, d=dst: f"saved at stage {s}, resumed at stage {d}: {m}")


def test_resume_at_world2_same_and_other_stages(world2):
    root, results = world2
    for rank in (0, 1):
        saved, resumed = results[rank]["saved"], results[rank]["resumed"]
        assert all(saved[s]["before"] == saved[0]["before"] for s in STAGES)  # the stages agree before saving
        _check_losses(resumed, saved, SAME_TOL)
        for (src, _), got in resumed.items():
            assert torch.equal(got["rng"], saved[src]["rng"]), "each rank gets its own RNG state back"
    assert sorted(os.listdir(os.path.join(root, "s2"))) == ["global_step3", "latest"]
    assert sorted(os.listdir(os.path.join(root, "s2", "global_step3", "rng"))) == ["rank0.pt", "rank1.pt"]


def test_tag_validation_across_ranks(world2):
    root, results = world2
    for rank in (0, 1):
        assert "ranks passed different tags" in results[rank]["saved"][0]["tags"]["fail"]
    assert results[0]["saved"][0]["tags"]["warn"] and not results[1]["saved"][0]["tags"]["warn"]
    assert sorted(os.listdir(os.path.join(root, "tags"))) == ["latest", "r0"]


def test_resume_at_world1(world2):
    root, results = world2
    saved = results[0]["saved"]
    resumed = run_ranks(_resume_group, world_size=1, args=(root, WORLD1), timeout=300)[0]
    _check_losses(resumed, saved, CHANGED_TOL)
    assert torch.equal(resumed[(2, 0)]["rng"], saved[2]["rng"])  # rank 0 takes rank 0's stream


def test_resume_at_world4(world2):
    root, results = world2
    out = run_ranks(_resume_group, world_size=4, args=(root, WORLD4), timeout=400)
    for rank, resumed in enumerate(out):
        _check_losses(resumed, results[0]["saved"], CHANGED_TOL)
        # ranks 2 and 3 did not exist at save time: they take the state of rank r % 2
        assert torch.equal(resumed[(2, 2)]["rng"], results[rank % 2]["saved"][2]["rng"])


def test_export_of_sharded_checkpoints_matches_the_engine(world2, tmp_path):
    from flexspeed.cli.main import main
    from flexspeed.runtime.export import consolidate
    from tests.distributed._parity import make_model

    root, results = world2
    for stage in STAGES:  # saved at world 2: DDP, sharded optimizer, FSDP2 shards
        want = results[0]["saved"][stage]["eval"]
        out = str(tmp_path / f"s{stage}.safetensors")
        assert main(["export", os.path.join(root, f"s{stage}"), out]) == 0
        from safetensors.torch import load_file

        model = make_model(seed=42)
        model.load_state_dict(load_file(out))
        assert eval_loss(model) == pytest.approx(want, abs=1e-6)
        assert results[0]["resumed"][(stage, stage)]["eval"] == pytest.approx(want, abs=1e-6)
    model = make_model(seed=42)
    model.load_state_dict(consolidate(os.path.join(root, "s3")))
    assert eval_loss(model) == pytest.approx(results[0]["saved"][3]["eval"], abs=1e-6)


def test_save_16bit_model_at_stage3(world2):
    from tests.distributed._parity import make_model

    root, results = world2
    assert results[0]["saved"][3]["saved16"] and results[1]["saved"][3]["saved16"]
    state = torch.load(os.path.join(root, "s3_16bit", "pytorch_model.bin"), weights_only=True)
    assert {v.dtype for v in state.values()} == {torch.float16}
    model = make_model(seed=42)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    assert eval_loss(model) == pytest.approx(results[0]["saved"][3]["eval"], abs=5e-3)


# ---- a save killed half-way -----------------------------------------------------------------------
def _killed_mid_save(rank: int, world: int, root: str) -> None:
    import torch.distributed.checkpoint.filesystem as fs

    engine, loader = build(world, 2, **_stage_extra(2))
    it = iter(loader)
    train(engine, it, 2)
    engine.save_checkpoint(root, tag="good")
    train(engine, it, 1)
    if rank == 0:  # the coordinator: nobody is left to clean up or commit
        write_item = fs._write_item

        def write_then_die(*args, **kwargs):
            result = write_item(*args, **kwargs)
            os.kill(os.getpid(), signal.SIGKILL)  # one tensor written, the rest never will be
            return result

        fs._write_item = write_then_die
    engine.save_checkpoint(root, tag="bad")
    raise AssertionError("the save should not have completed")


def test_killed_save_leaves_previous_tag_loadable(tmp_path):
    from flexspeed.runtime.checkpoint import read_latest
    from flexspeed.runtime.export import consolidate

    root = str(tmp_path)
    with pytest.raises(RanksFailed, match=r"rank|exited"):
        run_ranks(_killed_mid_save, world_size=2, args=(root,), timeout=120)
    assert read_latest(root) == "good"
    assert not os.path.exists(os.path.join(root, "bad"))
    partial = [n for n in os.listdir(root) if n.startswith(".flexspeed-tmp-bad-")]
    assert len(partial) == 1 and os.listdir(os.path.join(root, partial[0], "state"))  # half-written, hidden
    assert consolidate(root)  # the previous tag reads back, in this process
    engine, loader = build_local(seed=8)  # and resumes an engine (world 1, no process group)
    path, _ = engine.load_checkpoint(root)
    assert path == os.path.join(root, "good") and engine.global_steps == 2
    train(engine, iter(loader), 1)
    engine.save_checkpoint(root, tag="after")  # the next save removes what the killed one left
    assert sorted(n for n in os.listdir(root)) == ["after", "good", "latest"]
