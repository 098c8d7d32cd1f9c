"""Tensor-parallel plans for pipeline stages: validated per stage, before any collective (no process group)."""

from __future__ import annotations

import pytest
import torch.nn as nn

from flexspeed.config.errors import ConfigError
from flexspeed.pipe.stage_tp import stage_tp_plans
from flexspeed.pipe.module import StageModule
from flexspeed.pipe.topology import PipeTopology, resolve_topology
from tests.distributed.test_pipeline_tp import Block


def _stage(stage_id: int, layers: dict[int, nn.Module]) -> StageModule:
    return StageModule(stage_id, [(i, m) for i, m in layers.items()], {str(i): m for i, m in layers.items()})


def test_derived_plans_per_stage_and_a_head_only_stage_runs_replicated():
    stages = [_stage(0, {0: nn.Linear(8, 16), 1: Block(16)}), _stage(1, {2: nn.Linear(16, 4)})]
    plans = stage_tp_plans(stages, 2)
    assert plans == [{}, None]  # stage 0 derives its plan; stage 1 has nothing to split


def test_tp_that_does_not_divide_a_stage_layer_names_it_and_the_key():
    with pytest.raises(ConfigError) as err:
        stage_tp_plans([_stage(0, {1: Block(6)})], 5)
    assert err.value.key == "tensor_parallel.autotp_size" and "5" in str(err.value), str(err.value)


def test_user_plans_use_the_pipeline_module_names():
    stages = [_stage(0, {1: Block(16)}), _stage(1, {2: Block(16)})]
    plans = stage_tp_plans(stages, 2, {"1.fc1": "colwise", "1.fc2": "rowwise", "2.fc1": "colwise",
                                        "2.fc2": "rowwise"}, num_layers=3)
    assert plans == [{"layers.1.fc1": "colwise", "layers.1.fc2": "rowwise"},
                     {"layers.2.fc1": "colwise", "layers.2.fc2": "rowwise"}]
    with pytest.raises(ConfigError) as err:
        stage_tp_plans(stages, 2, {"blocks.1.fc1": "colwise"}, num_layers=3)
    assert "layer index" in str(err.value) and err.value.key == "plan['blocks.1.fc1']"
    with pytest.raises(ConfigError):
        stage_tp_plans(stages, 2, {"1.fc9": "colwise", "1.fc2": "rowwise"}, num_layers=3)  # no such submodule
    with pytest.raises(ConfigError, match="joins none"):  # a stage would send a tp shard to the next stage
        stage_tp_plans(stages, 2, {"1.fc1": "colwise"}, num_layers=3)


def test_topology_places_tp_innermost():
    topo = resolve_topology(2, None, 8, tp=2)
    assert topo == PipeTopology(num_stages=2, num_dp=2, num_tp=2)
    assert [topo.coords(r) for r in range(8)] == [(0, 0), (0, 0), (1, 0), (1, 0), (0, 1), (0, 1), (1, 1), (1, 1)]
    assert topo.rank_of(1, 1, 1) == 7
    with pytest.raises(ValueError, match="num_tp"):
        resolve_topology(None, PipeTopology(num_stages=2, num_dp=4), 8, tp=2)


def test_tp_that_does_not_divide_a_stage_attention_heads_names_the_module_the_numbers_and_the_fix():
    from flexspeed.models.gpt import Block as GPTBlock
    from flexspeed.models.gpt import GPTConfig

    stage = _stage(1, {3: GPTBlock(GPTConfig(n_head=3, n_embd=24))})
    with pytest.raises(ConfigError) as err:
        stage_tp_plans([stage], 2)
    msg = str(err.value)
    assert err.value.key == "tensor_parallel.autotp_size"
    assert "autotp_size=2" in msg and "3 attention heads" in msg and "layers.3.attn" in msg, msg
    assert "use one of [1, 3]" in msg, msg  # the fix
    assert stage_tp_plans([_stage(1, {3: GPTBlock(GPTConfig(n_head=4, n_embd=24))})], 2) == [{}]


def test_tp_that_does_not_divide_the_hidden_width_of_a_stage_layer_names_it():
    with pytest.raises(ConfigError) as err:
        stage_tp_plans([_stage(0, {2: Block(6)})], 5)  # fc1: 6 -> 24 outputs, which 5 does not divide
    msg = str(err.value)
    assert err.value.key == "tensor_parallel.autotp_size", msg
    assert "autotp_size=5 does not divide the width 24 of layers.2.fc1" in msg and "Fix" in msg, msg
