"""Port of DeepSpeed's ``tests/unit/runtime/zero/test_zero_context.py``.

Cases: test_multiple_all_gather_handles_wait_passes_dependency_by_keyword, TestZeroGatheredParametersFree.test,
TestMiCSGatheredParametersFree.test, TestGatheredParametersAllRanksErrorOnModification.test,
TestSerialContext.test_subclass_param / test_scattered_init_dist / test_scatter_halftype /
test_throughput_calculation / test_ext_param_getattr, TestScatterGather.test, TestGatherUpdate.test.

Plumbing: world 1 in this process, world 2 in the session's spawned group.

The design difference behind most deliberate differences here: flexspeed's ``zero.Init`` builds
parameters on the meta device with their full shapes (no storage, nothing partitioned yet), and
``initialize()`` shards and fills them; DeepSpeed partitions at construction (0-sized ``ds_tensor``
parameters with ``ds_status``) and makes parameters whole in place inside ``GatheredParameters``.
flexspeed's ``GatheredParameters`` yields whole copies instead, and refuses parameters that have no
storage yet. Not applicable: ``MultipleAllGatherHandles`` and ``engine.tput_timer`` (DeepSpeed's
internal all-gather handle and throughput-timer classes). See PORTING.md.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

import flexspeed as deepspeed
from flexspeed.accelerator import get_accelerator
from flexspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError
from tests.compat._ds_common import destroy_group, preferred_dtype, reduce_boolean_flags
from tests.compat._ranks import expect, rank_case

NO_STORAGE = "with no storage yet"


class ConvX(torch.nn.Conv1d):
    def __init__(self, *args):
        super().__init__(*args)
        self.param_in = torch.nn.Parameter(torch.FloatTensor(5).uniform_())

    def forward(self, x):
        return x


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = ConvX(1, 3, 4)
        self.param = torch.nn.Parameter(torch.FloatTensor(5).uniform_())

    def forward(self, x):
        return x


def _config():
    config = {"train_batch_size": 1, "steps_per_print": 1, "optimizer": {"type": "Adam", "params": {"lr": 0.00015}},
              "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1}}
    if get_accelerator().is_bf16_supported():
        config["bf16"] = {"enabled": True}
    elif get_accelerator().is_fp16_supported():
        config["fp16"] = {"enabled": True, "loss_scale": 138.0}
    return config


class MyModel(torch.nn.Module):
    def __init__(self, hidden_dim, layers=1):
        super().__init__()
        self.l1 = torch.nn.Linear(hidden_dim, hidden_dim)
        if layers > 1:
            self.l2 = torch.nn.Linear(hidden_dim, hidden_dim)


@pytest.fixture
def one_rank():
    yield
    destroy_group()


class TestZeroGatheredParametersFree:
    def test(self, one_rank):
        config_dict = {"train_batch_size": 1, "zero_optimization": {"stage": 3}}
        with deepspeed.zero.Init(config_dict_or_path=config_dict):
            model = MyModel(10)
        # Deliberate difference: the parameter keeps its full shape on the meta device (no storage, so
        # nothing to free); gathering it before initialize() fills it is refused
        with pytest.raises(RuntimeError, match=NO_STORAGE):
            with deepspeed.zero.GatheredParameters(list(model.parameters())):
                pass
        assert model.l1.weight.is_meta  # no memory behind it
        # after initialize(), the whole tensor inside the block and nothing gathered outside it
        engine, *_ = deepspeed.initialize(model=model, config=config_dict)
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters())) as full:
            assert full[0].numel() != 0, "GatheredParameters should give a non-0-sized tensor"
        assert engine.memory_breakdown()["gathered_parameters"] == 0


class TestMiCSGatheredParametersFree:
    def test(self):
        # Deliberate difference: MiCS is refused (and there is no MiCS_Init)
        assert not hasattr(deepspeed.zero, "MiCS_Init")
        with pytest.raises(DeepSpeedConfigError, match=r"\[zero_optimization.mics_shard_size\] got 1"):
            DeepSpeedConfig({"train_batch_size": 1, "zero_optimization": {"stage": 3, "mics_shard_size": 1}})


def case_gathered_parameters_error_on_modification(tmpdir):
    config_dict = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
    # Deliberate differences: "enable_sanity_checks" is not a flexspeed key (the check below is always on),
    # and the parameters must be filled by initialize() before they can be gathered
    with pytest.raises(DeepSpeedConfigError, match=r"\[zero_optimization.enable_sanity_checks\] unknown key"):
        DeepSpeedConfig(dict(config_dict, zero_optimization={"stage": 3, "enable_sanity_checks": True}))
    with deepspeed.zero.Init(config_dict_or_path=config_dict):
        model = MyModel(10, layers=2)
    deepspeed.initialize(model=model, config=config_dict)
    error_local = False
    try:
        with deepspeed.zero.GatheredParameters([model.l1.weight, model.l2.weight], modifier_rank=None) as full:
            with torch.no_grad():
                full[0].add_(0.0)  # DeepSpeed's model.l1.weight.add_(0.0): flexspeed yields the whole tensors
    except RuntimeError as exc:
        if "in-place modification" in str(exc):
            error_local = True
    error_global = reduce_boolean_flags(error_local, all)
    if not error_global:
        raise AssertionError("Expected in-place modification error on all ranks.")


rank_case(__name__, "TestGatheredParametersAllRanksErrorOnModification", case_gathered_parameters_error_on_modification)


class TestGatheredParametersAllRanksErrorOnModification:
    def test(self, ranks2):
        expect(ranks2, __name__, "TestGatheredParametersAllRanksErrorOnModification")


class TestSerialContext:
    def test_subclass_param(self):
        with deepspeed.zero.Init(config=_config()):
            model = ConvNet()
        # Deliberate difference: not partitioned (ds_status NOT_AVAILABLE) but storage-less, subclass
        # parameters included
        assert model.param.is_meta
        assert model.conv1.param_in.is_meta

    def test_scattered_init_dist(self):
        assert not dist.is_initialized()
        with deepspeed.zero.Init():
            # Deliberate difference: flexspeed's zero.Init needs no process group (initialize() starts it)
            assert not dist.is_initialized()

    def test_scatter_halftype(self):
        if not get_accelerator().is_fp16_supported():
            pytest.skip("fp16 is not supported")

    def test_ext_param_getattr(self, one_rank):
        class ExtLinear(torch.nn.Module):
            def __init__(self, dim=16):
                super().__init__()
                self.dim = dim
                self.linear1 = torch.nn.Linear(dim, dim)
                self.linear2 = torch.nn.Linear(dim, dim)

            def forward(self, input):
                A = self.linear1(input)
                B = self.linear2(A)
                # external use of self.linear1.weight
                C = torch.nn.functional.linear(B, self.linear1.weight)
                return C.sum()

        net = ExtLinear()
        args = type("Args", (), {"local_rank": 0})()
        engine, optim, _, _ = deepspeed.initialize(args=args, model=net, model_parameters=net.parameters(),
                                                   config=_config())
        with deepspeed.zero.GatheredParameters(net.linear1.weight) as (full,):
            assert full.numel() == net.dim ** 2  # the yielded whole tensor (flexspeed's block yields copies)
        input = torch.rand(net.dim).to(engine.device).to(preferred_dtype())
        loss = engine(input)
        engine.backward(loss)
        engine.step()


def case_scatter_gather(tmpdir):
    with deepspeed.zero.Init():
        layer = torch.nn.Linear(6, 3)
    # Deliberate difference: full shape on the meta device instead of a partitioned 0-sized tensor
    assert layer.weight.is_meta and layer.weight.shape == (3, 6)
    # Ensure there is no impact outside the context
    l2 = torch.nn.Linear(6, 3)
    assert not l2.weight.is_meta
    assert l2.weight.numel() == l2.in_features * l2.out_features
    with pytest.raises(RuntimeError, match=NO_STORAGE):
        with deepspeed.zero.GatheredParameters(layer.weight):
            pass
    engine, *_ = deepspeed.initialize(model=layer, config={"train_batch_size": 2, "zero_optimization": {"stage": 3}})
    with deepspeed.zero.GatheredParameters(layer.weight) as (full,):
        assert full.numel() == layer.in_features * layer.out_features


def case_gather_update(tmpdir):
    with deepspeed.zero.Init():
        layer = torch.nn.Linear(4, 2)
    assert layer.weight.is_meta
    # Deliberate difference: the weights exist once initialize() has sharded them; the change is written into
    # the yielded whole tensor on modifier_rank (the parameter object stays a shard)
    engine, *_ = deepspeed.initialize(model=layer, config={"train_batch_size": 2, "zero_optimization": {"stage": 3}})
    with deepspeed.zero.GatheredParameters(layer.weight, modifier_rank=1) as (full,):
        if dist.get_rank() == 1:
            with torch.no_grad():
                full.zero_()
    # Now gather again and ensure the change is global
    with deepspeed.zero.GatheredParameters(layer.weight) as (full,):
        assert torch.equal(full, torch.zeros_like(full))


rank_case(__name__, "TestScatterGather", case_scatter_gather)
rank_case(__name__, "TestGatherUpdate", case_gather_update)


class TestScatterGather:
    def test(self, ranks2):
        expect(ranks2, __name__, "TestScatterGather")


class TestGatherUpdate:
    def test(self, ranks2):
        expect(ranks2, __name__, "TestGatherUpdate")
