"""Port of DeepSpeed's ``tests/unit/pipe/test_pipe_module.py``.

Cases: TestPipeModuleSequential.test (activation_checkpoints False/True x use_compile False/True),
TestPipeModuleCheckpointInterval.test_set_checkpoint_interval / test_setter_keeps_reentrant_input_grads /
test_non_reentrant_checkpointing_does_not_need_input_grads /
test_setter_honors_non_reentrant_when_the_config_disables_checkpointing.

Plumbing: TestPipeModuleSequential on 2 ranks in the session's spawned group. Its
``checkpointing.configure(..., contiguous_checkpointing=True, ...)`` asks for DeepSpeed's contiguous
buffer, which flexspeed refuses (docs/compat.md, activation checkpointing): the port asserts that error
and configures without it. Not applicable: the three reentrant cases test DeepSpeed's choice between
its reentrant and non-reentrant checkpoint functions (``engine._reentrant_activation_checkpointing``,
``activation_checkpoint_func``); flexspeed's pipeline always recomputes with torch's non-reentrant
checkpoint. ``PipelineModule.set_checkpoint_interval`` passes.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import flexspeed as deepspeed
from flexspeed.accelerator import get_accelerator
from flexspeed.pipe import PipelineModule
from flexspeed.utils import RepeatingLoader
from tests.compat._ranks import expect, rank_case

HIDDEN_DIM = 32
LAYERS = 8


def sequential_model():
    return torch.nn.Sequential(*[nn.Linear(HIDDEN_DIM, HIDDEN_DIM) for _ in range(LAYERS)], nn.Linear(HIDDEN_DIM, 1))


def simple_config():
    return {"train_batch_size": 2, "train_micro_batch_size_per_gpu": 1, "steps_per_print": 1,
            "optimizer": {"type": "Adam", "params": {"lr": 0.001, "betas": [0.9, 0.999], "eps": 1e-8,
                                                     "weight_decay": 3e-7}},
            "pipeline": {"activation_checkpoint_interval": 1}}


def mixed_param_model():
    return torch.nn.Sequential(*[nn.ReLU() for _ in range(LAYERS // 2)],
                               *[nn.Linear(HIDDEN_DIM, HIDDEN_DIM) for _ in range(LAYERS // 2)])


def case_pipe_module_sequential(tmpdir, activation_checkpoints, use_compile):
    model = sequential_model()
    batch_input = torch.randn(1, HIDDEN_DIM)
    base_model = copy.deepcopy(model)
    base_input = batch_input.clone().detach()
    base_output = base_model(base_input)
    base_params = sum(p.numel() for p in base_model.parameters())

    pipe_model = PipelineModule(layers=copy.deepcopy(model), num_stages=2)
    if use_compile:
        pipe_model.compile()
    pipe_model, _, _, _ = deepspeed.initialize(config=simple_config(), model=pipe_model,
                                               model_parameters=[p for p in pipe_model.parameters()])
    # Ensure all parameters are accounted for (flexspeed partitions at initialize(): count after it)
    my_params = sum(p.numel() for p in pipe_model.module.parameters())
    total_pipe_params = torch.LongTensor([my_params]).to(get_accelerator().device_name())
    dist.all_reduce(total_pipe_params)
    assert total_pipe_params.item() == base_params

    if activation_checkpoints:
        with pytest.raises(ValueError, match="contiguous"):
            deepspeed.checkpointing.configure(None, deepspeed_config=pipe_model.config, partition_activations=True,
                                              contiguous_checkpointing=True, num_checkpoints=9)
        deepspeed.checkpointing.configure(None, deepspeed_config=pipe_model.config, partition_activations=True,
                                          num_checkpoints=9)
    if pipe_model.is_first_stage or pipe_model.is_last_stage:
        pipe_input = base_input.clone().detach().to(get_accelerator().device_name())
        # label 0 is meaningless
        data_iter = iter(RepeatingLoader([(pipe_input, 0)]))
    else:
        data_iter = None
    pipe_output = pipe_model.eval_batch(data_iter=data_iter)
    assert torch.allclose(base_output.to("cpu"), pipe_output.to("cpu"), atol=1e-4), (base_output, pipe_output)


SEQUENTIAL = [(a, c) for c in (False, True) for a in (False, True)]
for _a, _c in SEQUENTIAL:
    rank_case(__name__, f"TestPipeModuleSequential[{_a}-{_c}]", case_pipe_module_sequential,
              activation_checkpoints=_a, use_compile=_c)


class TestPipeModuleSequential:
    @pytest.mark.parametrize("activation_checkpoints", [False, True])
    @pytest.mark.parametrize("use_compile", [False, True])
    def test(self, ranks2, activation_checkpoints, use_compile):
        expect(ranks2, __name__, f"TestPipeModuleSequential[{activation_checkpoints}-{use_compile}]")


class TestPipeModuleCheckpointInterval:
    def test_set_checkpoint_interval(self):
        model = PipelineModule(layers=mixed_param_model(), num_stages=1, activation_checkpoint_interval=4)
        model.set_checkpoint_interval(1)
        assert model.activation_checkpoint_interval == 1
