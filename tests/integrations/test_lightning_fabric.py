"""Lightning Fabric with ``flexspeed.integrations.lightning.FlexspeedStrategy`` (and the Trainer with
``FlexspeedTrainerStrategy``) (2 ranks, gloo, CPU) against
Fabric's DDP run of the same loop: accumulation 2 through ``fabric.no_backward_sync``, AdamW, clipping at 1.0
(``fabric.clip_gradients`` for DDP, ``gradient_clipping`` in the DeepSpeed config for flexspeed), ZeRO-2 and -3.
Per-micro-step losses within 1e-4 and final weights within 1e-4 (fp32; only the reduction order differs)."""

from __future__ import annotations

import pytest
import torch

from flexspeed.testing import run_ranks

pytest.importorskip("lightning")


def test_fabric_flexspeed_strategy_matches_ddp(tmp_path):
    from tests.integrations import _lightning_runs as L

    results = run_ranks(L.rank_fabric_grid, 2, (str(tmp_path),), init_process_group=False, timeout=600)
    for per_rank in results:
        for stage, res in per_rank.items():
            assert len(res["flex"]) == len(res["ddp"]) == 8
            assert max(abs(a - b) for a, b in zip(res["flex"], res["ddp"])) <= 1e-4, (stage, res)
            assert res["keys_equal"] and res["max_weight_diff"] <= 1e-4, (stage, res)


def test_fabric_strategy_refuses_what_it_cannot_do():
    from flexspeed.integrations.lightning import FlexspeedStrategy

    strategy = FlexspeedStrategy(config={"zero_optimization": {"stage": 2}})
    assert strategy.config["train_micro_batch_size_per_gpu"] == 1
    with pytest.raises(RuntimeError, match=r"fabric.backward before fabric.setup"):
        strategy.backward(None, None)
    with pytest.raises(ValueError, match=r'clip_gradients\(max_norm=1.0\).*Fix: set "gradient_clipping": 1.0'):
        strategy.clip_gradients_norm(None, None, 1.0)
    with pytest.raises(TypeError, match=r"setup_optimizers\(SGD\).*Fix: call fabric.setup\(model, optimizer\)"):
        strategy.setup_optimizer(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1))


def test_lightning_trainer_flexspeed_strategy_matches_ddp(tmp_path):
    """The Lightning Trainer with FlexspeedTrainerStrategy (ZeRO-2, ZeRO-3) logs the training_step losses of its
    DDP run (accumulate_grad_batches=2, gradient_clip_val=1.0, AdamW; fp32 within 1e-4)."""
    from tests.integrations import _lightning_runs as L

    results = run_ranks(L.rank_trainer_grid, 2, (str(tmp_path),), init_process_group=False, timeout=600)
    for per_rank in results:
        assert len(per_rank["ddp"]) == 8
        for stage in ("z2", "z3"):
            assert len(per_rank[stage]) == 8
            assert max(abs(a - b) for a, b in zip(per_rank[stage], per_rank["ddp"])) <= 1e-4, per_rank


def test_fabric_save_load_resumes(tmp_path):
    """fabric.save / fabric.load through FlexspeedStrategy (ZeRO-3): the resumed run repeats the losses exactly."""
    from tests.integrations import _lightning_runs as L

    results = run_ranks(L.rank_fabric_resume, 2, (str(tmp_path),), init_process_group=False, timeout=600)
    for res in results:
        assert res["step"] == 4 and len(res["resumed"]) == 4
        assert res["resumed"] == res["after"], res


@pytest.mark.slow
def test_lightning_trainer_save_and_resume(tmp_path):
    """Trainer.fit with FlexspeedTrainerStrategy (ZeRO-3): trainer.save_checkpoint after 2 optimizer steps, then a
    fresh Trainer with other initial weights fit(ckpt_path=) repeats the straight run's last losses exactly.
    About 70 s: runs with FLEXSPEED_SLOW=1."""
    import os

    if os.environ.get("FLEXSPEED_SLOW") != "1":
        pytest.skip("slow (about 70 s): run with FLEXSPEED_SLOW=1")
    from tests.integrations import _lightning_runs as L

    results = run_ranks(L.rank_trainer_resume, 2, (str(tmp_path),), init_process_group=False, timeout=600)
    for res in results:
        assert len(res["straight"]) == 8 and res["first"] == res["straight"][:4]
        assert res["resumed"] == res["straight"][4:], res
    assert "latest" in results[0]["saved"]
