"""ZeRO pieces that need no process group: config reading, partitioning, optimizer checks,
block detection, ``zero.Init`` construction and materialisation, ``GatheredParameters``."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import flexspeed
from flexspeed.config import ConfigError, build_config
from flexspeed.models import GPT, GPTConfig
from flexspeed.runtime.fsdp import find_blocks, persistent_params, reshard_plan, shard_units
from flexspeed.runtime.zero import (DataParallel, ShardedOptimizerDP, ZeroSettings, check_offload, apply_zero,
                                    check_shardable, partition_params)


def _cfg(**extra) -> object:
    return build_config(config={"train_batch_size": 8, "train_micro_batch_size_per_gpu": 8, **extra}, world_size=1)


# ---- config ---------------------------------------------------------------------------------------
def test_settings_read_every_knob():
    s = ZeroSettings.from_config(_cfg(
        zero_optimization={"stage": 3, "stage3_param_persistence_threshold": 7, "stage3_prefetch_bucket_size": 99,
                           "reduce_bucket_size": 1000, "offload_optimizer": {"device": "cpu", "pin_memory": True}},
        communication_data_type="bf16", data_types={"grad_accum_dtype": "fp16"},
        zero_allow_untested_optimizer=True, prescale_gradients=True, gradient_predivide_factor=2.0))
    assert (s.stage, s.persistence_threshold, s.prefetch_bucket_size) == (3, 7, 99)
    assert s.reduce_bucket_size_set and s.bucket_cap_mb == pytest.approx(1000 * 4 / 2**20)
    assert (s.comm_dtype, s.grad_accum_dtype) == (torch.bfloat16, torch.float16)
    assert (s.offload_optimizer, s.offload_param, s.pin_memory) == ("cpu", "none", True)
    assert s.allow_untested and s.predivide == 2.0


def test_settings_defaults_are_exact_fp32_and_deepspeed_thresholds():
    s = ZeroSettings.from_config(_cfg(zero_optimization={"stage": 2}))
    assert s.comm_dtype is None and s.grad_accum_dtype is None  # fp32 accumulation and reduction
    assert s.persistence_threshold == 100_000 and s.prefetch_bucket_size is None
    assert not s.reduce_bucket_size_set and s.bucket_cap_mb is None
    fp32 = ZeroSettings.from_config(_cfg(data_types={"grad_accum_dtype": "fp32"}))
    assert fp32.grad_accum_dtype is None


def test_nvme_and_misplaced_offload_are_refused():
    with pytest.raises(ConfigError, match="nvme"):
        _cfg(zero_optimization={"stage": 3, "offload_param": {"device": "nvme"}})
    with pytest.raises(ConfigError, match="nvme") as e:  # also when a config slips through
        check_offload(ZeroSettings(stage=3, offload_optimizer="nvme"), torch.device("cpu"), [])
    assert e.value.key == "zero_optimization.offload_optimizer.device"
    with pytest.raises(ConfigError, match="stage 3"):
        check_offload(ZeroSettings(stage=2, offload_param="cpu"), torch.device("cpu"), [])
    with pytest.raises(ConfigError, match="stages 2 and 3"):
        check_offload(ZeroSettings(stage=1, offload_optimizer="cpu"), torch.device("cuda", 0), [])


def test_cpu_offload_on_a_cpu_run_is_a_noted_no_op():
    notes: list[str] = []
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        check_offload(ZeroSettings(stage=3, offload_param="cpu", offload_optimizer="cpu"), torch.device("cpu"), notes)
    assert len(notes) == 1 and "no effect" in notes[0]


# ---- stage 0/1 without a process group --------------------------------------------------------------
def test_apply_zero_world1_without_process_group():
    model = nn.Linear(4, 4)
    s0 = apply_zero(model, config=_cfg(), device=torch.device("cpu"))
    assert type(s0) is DataParallel and s0.model is model and s0.stage == 0
    s1 = apply_zero(model, config=_cfg(zero_optimization={"stage": 1}), device=torch.device("cpu"))
    assert type(s1) is ShardedOptimizerDP and s1.stage == 1 and s1.model is model
    opt = s1.build_optimizer(None, lambda params: torch.optim.AdamW(params, lr=0.1))
    assert [p for g in opt.param_groups for p in g["params"]] == list(model.parameters())
    with pytest.raises(RuntimeError, match="init_distributed"):
        apply_zero(model, config=_cfg(zero_optimization={"stage": 3}), device=torch.device("cpu"))


def test_grad_accum_dtype_rounds_accumulated_gradients():
    model = nn.Linear(8, 8)
    strategy = apply_zero(model, config=_cfg(data_types={"grad_accum_dtype": "bf16"}), device=torch.device("cpu"))
    model(torch.randn(3, 8)).pow(2).sum().backward()
    strategy.after_backward()
    for p in model.parameters():
        assert torch.equal(p.grad, p.grad.to(torch.bfloat16).float())


def test_partition_params_balances_bytes_deterministically():
    params = [torch.empty(n) for n in (100, 60, 50, 40, 30, 20, 5)]
    owners = partition_params(params, 2)
    assert owners == partition_params(params, 2)
    loads = [sum(p.numel() for p, o in zip(params, owners) if o == r) for r in range(2)]
    assert sorted(loads) == [145, 160]  # largest first onto the lighter rank (LPT)
    assert partition_params(params, 1) == [0] * len(params)
    assert set(partition_params(params, 4)) == {0, 1, 2, 3}


class _Custom(torch.optim.Optimizer):
    def __init__(self, params) -> None:
        super().__init__(params, {"lr": 0.1})

    def step(self, closure=None):
        return None


def test_untested_optimizer_needs_the_config_flag():
    params = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(ConfigError, match="zero_allow_untested_optimizer") as e:
        check_shardable(_Custom(params), stage=1, allow_untested=False)
    assert e.value.key == "zero_allow_untested_optimizer" and "_Custom" in str(e.value)
    check_shardable(_Custom(params), stage=1, allow_untested=True)
    check_shardable(_Custom(params), stage=0, allow_untested=False)  # nothing is sharded at stage 0
    check_shardable(torch.optim.AdamW(params), stage=3, allow_untested=False)
    from flexspeed.runtime.optimizers import Lamb

    check_shardable(Lamb(params), stage=2, allow_untested=False)
    with pytest.raises(ConfigError, match="LBFGS"):
        check_shardable(torch.optim.LBFGS(params), stage=2, allow_untested=False)


def test_settings_read_live_and_reuse_budgets():
    s = ZeroSettings.from_config(_cfg(zero_optimization={"stage": 3, "stage3_max_live_parameters": 123,
                                                         "stage3_max_reuse_distance": 45}))
    assert (s.max_live_parameters, s.max_reuse_distance) == (123, 45)
    d = ZeroSettings.from_config(_cfg(zero_optimization={"stage": 3}))
    assert (d.max_live_parameters, d.max_reuse_distance) == (10**9, 10**9)  # DeepSpeed's defaults


def test_reshard_plan_keeps_blocks_within_reuse_distance_and_live_budget():
    blocks, root = [100, 100, 100, 100], 50
    # DeepSpeed's defaults on a small model: everything stays gathered into backward
    assert reshard_plan(blocks, root, 10**9, 10**9) == [False] * 4
    # budgets of 0: every block is released after forward (all-gathered again in backward)
    assert reshard_plan(blocks, root, 0, 10**9) == [True] * 4
    assert reshard_plan(blocks, root, 10**9, 0) == [True] * 4
    # reuse distance of block i = 2 * (later blocks + root): 100, 300, 500, 700
    assert reshard_plan(blocks, root, 10**9, 301) == [True, True, False, False]
    assert reshard_plan(blocks, root, 10**9, 300) == [True, True, True, False]
    # live at the end of forward: root + kept + the two largest released blocks (computing, prefetched):
    # keeping block 3 needs 50 + 100 + 200; keeping 3 and 2 needs 50 + 200 + 200 (released: 0, 1);
    # keeping 3, 2, 1 needs 50 + 300 + 100; keeping all needs 50 + 400
    assert reshard_plan(blocks, root, 349, 10**9) == [True] * 4
    assert reshard_plan(blocks, root, 350, 10**9) == [True, True, True, False]
    assert reshard_plan(blocks, root, 449, 10**9) == [True, True, True, False]
    assert reshard_plan(blocks, root, 450, 10**9) == [False] * 4
    assert reshard_plan([], root, 10**9, 10**9) == []



def test_shard_units_groups_consecutive_blocks_within_one_bucket():
    blocks, root = [100, 100, 100, 100], 50
    # the whole model within one bucket: no block unit, the root's unit holds everything
    assert shard_units(blocks, root, 450) == []
    assert shard_units(blocks, root, 10**9) == []
    # one element short of that: blocks grouped greedily in forward order, the root apart
    assert shard_units(blocks, root, 449) == [[0, 1, 2, 3]]
    assert shard_units(blocks, root, 250) == [[0, 1], [2, 3]]
    assert shard_units(blocks, root, 300) == [[0, 1, 2], [3]]
    # a bucket smaller than a block (or 0, a live budget of 0): every block its own unit
    assert shard_units(blocks, root, 99) == [[0], [1], [2], [3]]
    assert shard_units(blocks, root, 0) == [[0], [1], [2], [3]]
    assert shard_units([50, 300, 50, 50], root, 120) == [[0], [1], [2, 3]]
    assert shard_units([], root, 10) == []


# ---- block detection ---------------------------------------------------------------------------------
def test_find_blocks_on_gpt_and_hf_style_models():
    gpt = GPT(GPTConfig(n_layer=3, n_embd=16, n_head=2, vocab_size=32, block_size=8))
    assert find_blocks(gpt) == list(gpt.transformer.h)

    class Expert(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.experts = nn.ModuleList(nn.Linear(2, 2) for _ in range(2))  # nested list: not split

    class Layer(Expert):
        pass

    class HF(nn.Module):
        _no_split_modules = ["Layer"]

        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([Layer(), Layer()])
            self.head = nn.Linear(2, 2)

    hf = HF()
    assert find_blocks(hf) == list(hf.layers)
    hf._no_split_modules = None
    assert find_blocks(hf) == list(hf.layers)  # outermost ModuleList children only


def test_persistent_params_are_the_small_ones():
    gpt = GPT(GPTConfig(n_layer=1, n_embd=16, n_head=2, vocab_size=32, block_size=8))
    small = persistent_params(gpt, 100)
    assert small and all(p.numel() < 100 for p in small)
    assert persistent_params(gpt, 0) == []
    capped = persistent_params(gpt, 100, cap=40)  # stage3_model_persistence_threshold
    assert capped and sum(p.numel() for p in capped) <= 40 and all(a is b for a, b in zip(capped, small))


# ---- zero.Init / materialisation / GatheredParameters (one process, no sharding) -----------------
class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.ModuleList(nn.Linear(6, 6) for _ in range(2))
        self.norm = nn.LayerNorm(6)
        self.register_buffer("pos", torch.arange(6.0))


def test_init_builds_meta_parameters_and_real_buffers():
    with flexspeed.zero.Init():
        net = _Net()
    assert all(p.is_meta for p in net.parameters())
    assert not net.pos.is_meta and torch.equal(net.pos, torch.arange(6.0))
    with flexspeed.zero.Init(enabled=False):
        assert not any(p.is_meta for p in _Net().parameters())
    assert not any(p.is_meta for p in _Net().parameters())  # the hook is gone after the block


def test_materialised_weights_equal_the_eager_build():
    from flexspeed.zero import materialize_module

    torch.manual_seed(11)
    eager = _Net()
    torch.manual_seed(11)
    with flexspeed.zero.Init():
        lazy = _Net()
    materialize_module(lazy, torch.device("cpu"))
    for (name, a), b in zip(eager.state_dict().items(), lazy.state_dict().values()):
        assert torch.equal(a, b), name
    with flexspeed.zero.Init(seed=5):
        seeded_a = _Net()
    with flexspeed.zero.Init(seed=5):
        seeded_b = _Net()
    materialize_module(seeded_a, torch.device("cpu"))
    materialize_module(seeded_b, torch.device("cpu"))
    assert all(torch.equal(a, b) for a, b in zip(seeded_a.state_dict().values(), seeded_b.state_dict().values()))


def test_param_init_fn_and_missing_initialiser():
    from flexspeed.zero import materialize_module

    def zero_bias(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.constant_(m.bias, 3.0)

    with flexspeed.zero.Init(param_init_fn=zero_bias):
        net = _Net()
    materialize_module(net, torch.device("cpu"))
    assert all(torch.equal(layer.bias, torch.full((6,), 3.0)) for layer in net.body)
    assert torch.equal(net.norm.weight, torch.ones(6))  # reset_parameters still ran

    class Raw(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.empty(3))

    with flexspeed.zero.Init():
        raw = Raw()
    with pytest.raises(ValueError, match="reset_parameters.*param_init_fn"):
        materialize_module(raw, torch.device("cpu"))


def test_init_rejects_unsupported_arguments():
    with pytest.raises(ValueError, match="nvme"):
        flexspeed.zero.Init(remote_device="nvme")
    with pytest.raises(ValueError, match="mpu"):
        flexspeed.zero.Init(mpu=object())
    with pytest.warns(UserWarning, match="fp32 master weights"):
        flexspeed.zero.Init(dtype=torch.float16)


def test_gathered_parameters_on_whole_parameters():
    layer = nn.Linear(2, 2)
    with flexspeed.zero.GatheredParameters(layer.weight, modifier_rank=0) as (full,):
        assert full.data_ptr() == layer.weight.data_ptr()
        full.fill_(2.0)
    assert torch.equal(layer.weight.detach(), torch.full((2, 2), 2.0))
    with flexspeed.zero.GatheredParameters([layer.weight], enabled=False) as params:
        assert params[0] is layer.weight


def test_memory_report_names_every_part():
    model = nn.Linear(4, 4)
    strategy = apply_zero(model, config=_cfg(), device=torch.device("cpu"))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    mb = strategy.memory_breakdown(opt)
    assert mb == {"parameters": 80, "gradients": 80, "optimizer_states": 160, "gathered_parameters": 0}
    assert "optimizer_states=" in strategy.memory_report(opt)


def test_apply_zero_materialises_an_init_model_whole_at_stage_0():
    torch.manual_seed(4)
    eager = _Net()
    torch.manual_seed(4)
    with flexspeed.zero.Init():
        lazy = _Net()
    apply_zero(lazy, config=_cfg(), device=torch.device("cpu"))
    assert not any(p.is_meta for p in lazy.parameters())
    assert all(torch.equal(a, b) for a, b in zip(eager.state_dict().values(), lazy.state_dict().values()))
