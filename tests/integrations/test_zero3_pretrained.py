"""ZeRO-3 ``from_pretrained`` on flexspeed (2 ranks, gloo): transformers builds the model under
``deepspeed.zero.Init`` and loads each layer through ``GatheredParameters(modifier_rank=0)`` (rank 0 reads the
checkpoint, the other ranks only its shapes). Each rank must then hold only its 1/world chunk of every weight
(the parameters are DeepSpeed-style 0-element placeholders on the CPU), and after ``deepspeed.initialize`` the
logits must equal a plain load's exactly (the same fp32 values, only moved)."""

from __future__ import annotations

import pytest

from flexspeed.testing import run_ranks
from tests.integrations import _hf_runs as H

pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def test_zero3_from_pretrained_matches_plain_load(tmp_path):
    results = run_ranks(H.rank_zero3_from_pretrained, 2, (str(tmp_path),), init_process_group=False, timeout=600)
    for res in results:
        assert res["all_placeholders"], res
        assert res["chunk_numel"] * 2 >= res["full_numel"] and res["chunk_numel"] <= res["full_numel"] // 2 + 64, res
        assert res["max_logit_diff"] == 0.0, res


def test_trainer_on_zero3_from_pretrained_matches_ddp(tmp_path):
    """The whole HF flow: TrainingArguments(deepspeed=ZeRO-3), from_pretrained (placeholders + chunks), Trainer.train;
    the losses equal the DDP Trainer's on a plain load of the same folder (fp32 within 1e-3)."""
    results = run_ranks(H.rank_trainer_from_pretrained_z3, 2, (str(tmp_path),), init_process_group=False,
                        timeout=600)
    for res in results:
        assert res["placeholders"]
        assert len(res["z3"]) == len(res["ddp"]) == 3
        assert max(abs(a - b) for a, b in zip(res["z3"], res["ddp"])) <= 1e-3, res
