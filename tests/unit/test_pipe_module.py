"""PipelineModule without a process group: specs, lazy building, report, state-dict keys,
activation checkpointing, tied layers, and the engine's config reconciliation errors."""

from __future__ import annotations


import pytest
import torch
import torch.nn as nn

from flexspeed.config.errors import ConfigError
from flexspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec


def specs() -> list:
    return [LayerSpec(nn.Linear, 4, 8), LayerSpec(nn.ReLU), LayerSpec(nn.Linear, 8, 8), LayerSpec(nn.ReLU),
            LayerSpec(nn.Linear, 8, 2)]


def seeded_sequential(base: int = 1234) -> nn.Sequential:
    layers = []
    for i, s in enumerate(specs()):
        torch.manual_seed(base + i)
        layers.append(s.build())
    return nn.Sequential(*layers)


def test_report_needs_no_process_group_and_no_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    module = PipelineModule(specs(), num_stages=2)
    report = module.partition_report()
    assert torch.equal(torch.rand(3), expected)  # counting parameters built on meta, RNG untouched
    assert "5 layers over 2 stage(s)" in report and "partition_method='parameters'" in report
    assert "stage 0: layers 0-" in report and "stage 1:" in report and "Linear" in report
    assert not module._built  # the report did not build the layers


def test_report_shows_virtual_chunks_and_ties():
    layers = [TiedLayerSpec("emb", nn.Embedding, 10, 4), LayerSpec(nn.Linear, 4, 4), LayerSpec(nn.Linear, 4, 4),
              TiedLayerSpec("emb", nn.Embedding, 10, 4, forward_fn=lambda e, h: h @ e.weight.t())]
    module = PipelineModule(layers, num_stages=2, virtual_stages=2, partition_method="uniform")
    report = module.partition_report()
    assert "x 2 virtual" in report and "Embedding[tied:emb]" in report and "chunk 1" in report
    assert module.tied_stage_owners() == {"emb": [0, 1]}  # stage 0 on rank 0, stage 3 on rank 1
    assert module.canonical_name("3.weight") == "0.weight"


def test_single_stage_module_is_the_sequential_model():
    module = PipelineModule(specs(), loss_fn=nn.functional.mse_loss, seed_layers=True)
    ref = seeded_sequential()
    assert list(module.state_dict()) == list(ref.state_dict())  # keys "<layer index>.<param>"
    x = torch.randn(3, 4)
    torch.testing.assert_close(module(x), ref(x), rtol=0, atol=0)
    assert list(module.to_sequential_state_dict()) == list(ref.state_dict())


def test_load_sequential_state_dict_round_trips():
    module = PipelineModule(specs())
    ref = seeded_sequential(7)
    module.load_sequential_state_dict(ref.state_dict())
    for k, v in ref.state_dict().items():
        assert torch.equal(module.state_dict()[k], v)
    with pytest.raises(KeyError, match="do not name a layer index"):
        module.load_sequential_state_dict({**ref.state_dict(), "head.weight": torch.zeros(1)})


def test_activation_checkpointing_gives_the_same_gradients():
    plain = PipelineModule(specs(), seed_layers=True)
    ckpt = PipelineModule(specs(), seed_layers=True, activation_checkpoint_interval=2)
    x = torch.randn(5, 4)
    for m in (plain, ckpt):
        m(x).pow(2).sum().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=name)
    # and it really recomputes: a forward counter on the first layer sees two calls in backward mode
    calls = []
    ckpt.stage_modules[0].layers["0"].register_forward_hook(lambda *a: calls.append(1))
    ckpt(x).sum().backward()
    assert len(calls) == 2


def test_set_checkpoint_interval_changes_a_built_module():
    module = PipelineModule(specs(), seed_layers=True, activation_checkpoint_interval=0)
    x = torch.randn(5, 4)
    module(x)  # built, no recomputation
    calls = []
    module.stage_modules[0].layers["0"].register_forward_hook(lambda *a: calls.append(1))
    module(x).sum().backward()
    assert len(calls) == 1
    module.set_checkpoint_interval(2)  # DeepSpeed's setter: the next forward recomputes
    assert module.activation_checkpoint_interval == 2
    calls.clear()
    module(x).sum().backward()
    assert len(calls) == 2
    with pytest.raises(ValueError, match="set_checkpoint_interval"):
        module.set_checkpoint_interval(-1)


def test_tied_positions_on_one_rank_share_one_module():
    head = TiedLayerSpec("emb", nn.Embedding, 10, 4, forward_fn=lambda e, h: h @ e.weight.t())
    module = PipelineModule([TiedLayerSpec("emb", nn.Embedding, 10, 4), LayerSpec(nn.Linear, 4, 4), head])
    assert module.get_submodule("0") is module.get_submodule("2")
    assert len(list(module.parameters())) == 3  # one embedding weight, one linear
    out = module(torch.tensor([[1, 2, 3]]))
    assert out.shape == (1, 3, 10)
    assert list(module.tied_parameters()) == ["emb"]


def test_spec_errors_name_the_argument():
    with pytest.raises(TypeError, match=r"LayerSpec\(typename=.*nn.Module subclass"):
        LayerSpec(lambda: None)
    with pytest.raises(ValueError, match=r"tied_weight_attr='bias'.*no parameter 'bias'.*\['weight'\]"):
        PipelineModule([TiedLayerSpec("e", nn.Embedding, 4, 2, tied_weight_attr="bias")]).parameters().__next__()
    with pytest.raises(ValueError, match=r"pp 3 \(from PipelineModule\(num_stages=3\)\).*does not divide the world "
                                         r"size 1"):
        list(PipelineModule(specs(), num_stages=3).parameters())
    with pytest.raises(ValueError, match="activation_checkpoint_interval=-1"):
        PipelineModule(specs(), activation_checkpoint_interval=-1)
    with pytest.raises(TypeError, match=r"layers\[1\] = 3 is not a LayerSpec"):
        PipelineModule([LayerSpec(nn.ReLU), 3])


def test_virtual_stages_cannot_change_after_the_parameters_were_used():
    module = PipelineModule(specs(), num_stages=1)
    params = [p for p in module.parameters()]  # builds with one chunk per rank
    assert params
    with pytest.raises(ConfigError, match=r"\[pipeline.virtual_stages\].*pass virtual_stages=2 to PipelineModule"):
        module.configure(virtual_stages=2)
    lazy = PipelineModule(specs(), num_stages=1)
    gen = lazy.parameters()  # a generator: nothing is built until it is iterated
    lazy.configure(virtual_stages=2)
    assert len(list(gen)) == 6 and len(lazy.stage_modules) == 2


def _cfg(flops_profiler: bool = False, **pipe):
    from flexspeed.config import build_config

    return build_config(config={"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 4,
                                "pipeline": pipe, "flops_profiler": {"enabled": flops_profiler}}, world_size=1)


def test_engine_config_reconciliation():
    from flexspeed.pipe.engine import apply_config

    with pytest.raises(ConfigError, match=r"\[flops_profiler.enabled\].*PipelineModule"):
        apply_config(PipelineModule(specs(), num_stages=1), _cfg(flops_profiler=True))
    with pytest.raises(ConfigError, match=r"\[pipeline.stages\].*stages=2.*num_stages=1"):
        apply_config(PipelineModule(specs(), num_stages=1), _cfg(stages=2))
    with pytest.raises(ConfigError, match=r"\[gradient_accumulation_steps\]"):
        apply_config(PipelineModule(specs(), num_stages=8), _cfg())
    module = PipelineModule(specs(), num_stages=1)
    apply_config(module, _cfg(partition_method="uniform", activation_checkpoint_interval=2))
    assert module.partition_method == "uniform" and module.activation_checkpoint_interval == 2
    with pytest.raises(ConfigError, match=r"\[pipeline.partition_method\]"):
        apply_config(PipelineModule(specs(), num_stages=1, partition_method="type:Linear"),
                      _cfg(partition_method="uniform"))
