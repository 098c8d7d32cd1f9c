"""Hugging Face folders from a 2-rank run at every ZeRO stage: ``engine.save_pretrained`` and the
model's own ``save_pretrained`` called on every rank (``is_main_process=rank == 0``, as HF's
distributed examples do) both write weights that ``from_pretrained`` loads with the trained full
weights exactly; ``flexspeed export`` of the same run's checkpoint writes the same tensors."""

from __future__ import annotations

import os

import pytest
import torch

from flexspeed.testing import run_ranks

tf = pytest.importorskip("transformers")


def _model():
    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=97, n_positions=32,
                                            bos_token_id=1, eos_token_id=2))


def _save(rank: int, world: int, directory: str) -> dict:
    import flexspeed

    tf.utils.logging.set_verbosity_error()
    out = {}
    for stage in (0, 1, 2, 3):
        engine, *_ = flexspeed.initialize(model=_model(), config={
            "train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
            "zero_optimization": {"stage": stage}, "steps_per_print": 10**6})
        ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(rank))
        engine.backward(engine(ids, labels=ids).loss)
        engine.step()
        base = os.path.join(directory, f"stage{stage}")
        engine.save_pretrained(os.path.join(base, "engine"))
        engine.module.save_pretrained(os.path.join(base, "hf"), is_main_process=rank == 0)
        engine.save_checkpoint(os.path.join(base, "ckpt"))
        full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
                for k, v in engine.module.state_dict().items()}
        out[stage] = full
    return out


def test_save_pretrained_at_every_stage(tmp_path) -> None:
    from flexspeed.cli.main import main

    full = run_ranks(_save, 2, args=(str(tmp_path),), init_process_group=False, timeout=300)[0]
    for stage, want in full.items():
        base = tmp_path / f"stage{stage}"
        assert main(["export", str(base / "ckpt"), str(base / "export") + "/"]) == 0
        for kind in ("engine", "hf", "export"):
            back = tf.GPT2LMHeadModel.from_pretrained(str(base / kind))
            got = back.state_dict()
            for k, v in want.items():
                if "attn.bias" in k or "masked_bias" in k:  # non-persistent buffers
                    continue
                torch.testing.assert_close(got[k], v, rtol=0, atol=0, msg=lambda m, k=k: f"stage {stage} {kind} {k}: {m}")
