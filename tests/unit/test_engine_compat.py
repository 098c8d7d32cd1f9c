"""DeepSpeed engine behaviours in one process (issue 14): attribute pass-through to the model, the
value ``backward()`` returns, ``save_checkpoint("")``, ``no_sync()``'s guards, and
``ignore_unused_parameters: false`` (DeepSpeed's ``tests/unit/runtime/zero/test_ignore_unused_parameters.py``
and ``tests/unit/runtime/test_no_sync_ctxt.py``, one rank)."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import flexspeed
from flexspeed.runtime.engine import EngineUsageError


@pytest.fixture(autouse=True)
def _no_group_leak():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


class SimpleModel(nn.Module):
    """DeepSpeed's unit-test SimpleModel (one Linear, cross-entropy), plus attributes to pass through."""

    def __init__(self, hidden_dim: int = 4, unused: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linears = nn.ModuleList([nn.Linear(hidden_dim, hidden_dim)])
        if unused:
            self.unused_linear = nn.Linear(hidden_dim, hidden_dim)  # DeepSpeed's UnusedParametersModel
        self.cross_entropy_loss = nn.CrossEntropyLoss()
        self.custom_flag = "from the model"
        self.optimizer = "the model's, shadowed by the engine's"

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.cross_entropy_loss(self.linears[0](x), y)

    def describe(self, prefix: str) -> str:
        return f"{prefix}: {type(self).__name__}"


def _config(**over: object) -> dict:
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "steps_per_print": 1000,
           "optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}
    cfg.update(over)
    return cfg


def _batches(n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(2, 4, generator=g), torch.randint(0, 4, (2,), generator=g)) for _ in range(n)]


def test_unknown_attributes_pass_through_to_the_module():
    model = SimpleModel()
    engine, opt, *_ = flexspeed.initialize(model=model, model_parameters=model.parameters(), config=_config())
    assert engine.custom_flag == "from the model"
    assert engine.describe("engine") == "engine: SimpleModel"  # a bound method of the model
    assert engine.linears is model.linears  # a submodule of the model
    assert engine.optimizer is opt  # the engine's own attribute wins over the model's
    assert engine.gradient_accumulation_steps() == 2  # and so do its methods
    with pytest.raises(AttributeError, match=r"'TrainingEngine' object has no attribute 'nothing_here', nor has "
                                             r"its module \(SimpleModel\)"):
        engine.nothing_here  # noqa: B018
    assert not hasattr(engine, "__not_a_dunder_of_the_model__")


def test_backward_returns_the_loss_divided_by_accumulation_steps():
    model = SimpleModel()
    engine, *_ = flexspeed.initialize(model=model, model_parameters=model.parameters(), config=_config())
    x, y = _batches(1)[0]
    loss = engine(x, y)
    torch.testing.assert_close(engine.backward(loss), loss / 2, rtol=0, atol=0)
    loss = engine(x, y)
    assert engine.backward(loss, scale_wrt_gas=False) is loss


def test_save_checkpoint_refuses_an_empty_directory(tmp_path):
    model = SimpleModel()
    engine, *_ = flexspeed.initialize(model=model, model_parameters=model.parameters(), config=_config())
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for bad in ("", None):
            with pytest.raises(ValueError, match=r"save_dir must be a non-empty path, got .*Fix: pass the checkpoint "
                                                 r"directory"):
                engine.save_checkpoint(bad)
        with pytest.raises(ValueError, match="load_dir must be a non-empty path"):
            engine.load_checkpoint("")
        assert os.listdir(tmp_path) == []  # nothing was written into the working directory
    finally:
        os.chdir(cwd)


def test_no_sync_guards_at_stages_0_and_1():
    for stage in (0, 1):
        model = SimpleModel()
        engine, *_ = flexspeed.initialize(model=model, model_parameters=model.parameters(),
                                          config=_config(gradient_accumulation_steps=1,
                                                         zero_optimization={"stage": stage}))
        with engine.no_sync():
            for x, y in _batches():
                engine.backward(engine(x, y))
                with pytest.raises(AssertionError, match=r"It is illegal to call Engine.step\(\) inside no_sync"):
                    engine.step()
            with pytest.raises(EngineUsageError, match="no_sync context manager reentry is unsupported"):
                with engine.no_sync():
                    pass
        engine.step()  # allowed again after the block
        assert engine.global_steps == 1


def test_no_sync_repeats_exactly():
    """DeepSpeed's test_multiple_ctxts: the same batches in two no_sync blocks give the same losses and norms."""
    model = SimpleModel()
    engine, *_ = flexspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=_config(gradient_accumulation_steps=1))
    runs = []
    for _ in range(2):
        engine.zero_grad()
        losses, norms = [], []
        with engine.no_sync():
            for x, y in _batches():
                loss = engine(x, y)
                losses.append(loss.item())
                engine.backward(loss)
                norms.append(sum(p.grad.norm() for p in engine.parameters()).item())
        runs.append((losses, norms))
    assert runs[0] == runs[1]


@pytest.mark.parametrize("stage", [2, 3])
def test_no_sync_is_refused_where_gradients_are_partitioned(stage):
    model = SimpleModel()
    engine, *_ = flexspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=_config(zero_optimization={"stage": stage}))
    with pytest.raises(AssertionError, match=f"no_sync context manager is incompatible with gradient partitioning "
                                             f"logic of ZeRO stage {stage}"):
        with engine.no_sync():
            pass


@pytest.mark.parametrize("ignore_unused_parameters", [False, True])
def test_stage2_ignore_unused_parameters(ignore_unused_parameters):
    """DeepSpeed's TestStage2IgnoreUnusedParameters: stage 2, cpu offload, accumulation 2, one rank."""
    config = _config(zero_optimization={"stage": 2, "offload_optimizer": {"device": "cpu"},
                                        "ignore_unused_parameters": ignore_unused_parameters})
    model = SimpleModel(unused=True)
    with warnings.catch_warnings():  # cpu offload is a no-op on a CPU-only run (warned once per process)
        warnings.simplefilter("ignore")
        engine, *_ = flexspeed.initialize(config=config, model=model, model_parameters=model.parameters())

    def loop() -> None:
        for x, y in _batches(5):
            engine.backward(engine(x, y))
            engine.step()

    if ignore_unused_parameters:
        loop()
        assert engine.global_steps == 2
    else:
        with pytest.raises(AssertionError) as err:
            loop()
        assert "ignore_unused_parameters" in err.value.args[0] and "unused_linear.weight" in err.value.args[0]
