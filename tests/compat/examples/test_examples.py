"""DeepSpeedExamples scripts on flexspeed with only their ``deepspeed`` imports changed, on 2 ranks.

- ``training/pipeline_parallelism/train.py -p 2``: AlexNet in two pipeline stages, CIFAR-10 at 224x224
  (the script's preprocessing), 2 steps of a 4-sample batch (the script's config has 256).
- ``training/cifar/cifar10_deepspeed.py``: its own config (batch 16, WarmupLR, fp16 by default), one
  epoch of 64 synthetic CIFAR-10 images and the 20-image evaluation.
- ``training/HelloDeepSpeed/train_bert_ds.py``: a 2-layer, 64-wide RoBERTa with a local word-level
  vocabulary, ZeRO stage 1 with optimizer offload, bf16, checkpoints every 2 steps, then a resume
  from the experiment directory.

With ``DSEXAMPLES_DIR`` set to a DeepSpeedExamples checkout the scripts themselves run; otherwise
the committed reproductions ``repro_*.py`` do (their DeepSpeed calls in the same order; the scripts
are not copied into this repository). ``runner.py`` says what is substituted (data, torchvision,
HelloDeepSpeed's helper packages) and how the imports are rewritten. Nothing is downloaded.
"""

from __future__ import annotations

import json
import os
import pathlib

from flexspeed.testing import run_ranks
from tests.compat.examples.runner import run_rank

HERE = pathlib.Path(__file__).resolve().parent
SCRIPTS = {
    "pipeline": ("training/pipeline_parallelism/train.py", "repro_pipeline_train.py"),
    "cifar": ("training/cifar/cifar10_deepspeed.py", "repro_cifar10_deepspeed.py"),
    "hello": ("training/HelloDeepSpeed/train_bert_ds.py", "repro_train_bert_ds.py"),
}


def script(kind: str) -> str:
    upstream, repro = SCRIPTS[kind]
    root = os.environ.get("DSEXAMPLES_DIR")
    if root:
        path = pathlib.Path(root) / upstream
        assert path.is_file(), f"DSEXAMPLES_DIR={root} has no {upstream}"
        return str(path)
    return str(HERE / repro)


def test_pipeline_parallelism_train(tmp_path):
    config = {"train_batch_size": 4, "train_micro_batch_size_per_gpu": 2,
              "optimizer": {"type": "Adam", "params": {"lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-8}},
              "steps_per_print": 10, "wall_clock_breakdown": False}
    (tmp_path / "ds_config.json").write_text(json.dumps(config))
    argv = [f"--deepspeed_config={tmp_path / 'ds_config.json'}", "-p", "2", "--steps=2", "--backend", "gloo"]
    results = run_ranks(run_rank, 2, (script("pipeline"), argv, "pipeline", {"train": 16}), timeout=400,
                        init_process_group=False)
    for r in results:
        assert r["imports_changed"] >= 3  # deepspeed, deepspeed.pipe, deepspeed.utils
        assert r["engines"] == [("PipelineEngine", 2, 0, 2)]


def test_cifar10_deepspeed():
    results = run_ranks(run_rank, 2, (script("cifar"), ["--epochs=1", "--log-interval=2"], "cifar",
                                      {"train": 64, "test": 20}), timeout=400, init_process_group=False)
    for r in results:
        assert r["imports_changed"] >= 3  # deepspeed, deepspeed.accelerator, deepspeed.moe.utils
        # 64 images, batch 16 over 2 ranks: 4 steps, none skipped by the fp16 loss scaler at 2**15
        assert r["engines"] == [("TrainingEngine", 4, 0, 2)]


HELLO = ["--num_layers=2", "--num_heads=4", "--ff_dim=128", "--h_dim=64", "--max_seq_length=64", "--batch_size=4",
         "--checkpoint_every=2", "--log_every=2", "--dtype=bf16"]


def test_hello_deepspeed_train_bert_ds(tmp_path):
    base = tmp_path / "checkpoints"
    first = run_ranks(run_rank, 2, (script("hello"), [f"--checkpoint_dir={base}", "--num_iterations=5", *HELLO],
                                    "hello"), timeout=400, init_process_group=False)
    # steps 1-4 train (step 5 ends the loop); saved after steps 2 and 4, and at the end under the same tag
    assert [r["engines"] for r in first] == [[("TrainingEngine", 4, 0, 2)]] * 2
    (exp_dir,) = base.glob("bert_pretrain.*")  # one experiment directory for both ranks
    assert sorted(p.name for p in exp_dir.iterdir()) == ["global_step2", "global_step4", "hparams.json", "latest",
                                                         "tb_dir"]
    assert (exp_dir / "latest").read_text().strip() == "global_step4"
    second = run_ranks(run_rank, 2, (script("hello"), [f"--load_checkpoint_dir={exp_dir}", "--num_iterations=8",
                                                       *HELLO], "hello"), timeout=400, init_process_group=False)
    # resumed at the saved client state's checkpoint_step 5: steps 6 and 7 train, on top of the 4 restored steps
    assert [r["engines"] for r in second] == [[("TrainingEngine", 6, 0, 2)]] * 2
    assert (exp_dir / "latest").read_text().strip() == "global_step5"


def test_moe_param_groups_without_experts():
    """What ``cifar10_deepspeed.py --moe-param-group`` calls: the groups come back unchanged (no experts)."""
    import pytest
    import torch

    from flexspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    net = torch.nn.Linear(4, 4)
    groups = split_params_into_different_moe_groups_for_optimizer({"params": net.parameters(), "name": "parameters"})
    assert groups == [{"params": list(net.parameters()), "name": "parameters"}]
    net.weight.allreduce = False  # how DeepSpeed marks an expert's parameter
    with pytest.raises(ValueError, match="no MoE layers"):
        split_params_into_different_moe_groups_for_optimizer([{"params": list(net.parameters())}])
