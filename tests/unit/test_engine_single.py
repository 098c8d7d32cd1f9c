"""The training engine in one process with no launcher: boundaries, counters, client objects,
forward-only engines, and the errors a user can trigger."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import flexspeed
from flexspeed.config.errors import ConfigError


@pytest.fixture(autouse=True)
def _no_group_leak():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def _cfg(**over) -> dict:
    base = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
            "optimizer": {"type": "SGD", "params": {"lr": 0.1}}, "steps_per_print": 1000}
    base.update(over)
    return base


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))


def _loss(engine, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 4, generator=g)
    return engine(x).pow(2).mean()


def test_steps_only_on_accumulation_boundaries():
    model = _model()
    engine, opt, loader, sched = flexspeed.initialize(model=model, model_parameters=model.parameters(),
                                                      config=_cfg())
    assert loader is None and sched is None and isinstance(opt, torch.optim.SGD)
    assert (engine.train_batch_size(), engine.train_micro_batch_size_per_gpu(),
            engine.gradient_accumulation_steps()) == (4, 2, 2)
    w0 = engine.module[0].weight.detach().clone()
    assert not engine.is_gradient_accumulation_boundary()
    engine.backward(_loss(engine))
    engine.step()
    assert torch.equal(engine.module[0].weight, w0), "weights changed on a non-boundary micro-step"
    assert engine.is_gradient_accumulation_boundary()
    engine.backward(_loss(engine, 1))
    engine.step()
    assert not torch.equal(engine.module[0].weight, w0)
    assert (engine.global_steps, engine.micro_steps, engine.global_samples, engine.skipped_steps) == (1, 2, 4, 0)
    assert engine.get_global_grad_norm() is not None and engine.get_lr() == [0.1]


def test_matches_plain_pytorch_with_accumulation():
    ref = _model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    model = _model()
    engine, *_ = flexspeed.initialize(model=model, model_parameters=model.parameters(), config=_cfg())
    for step in range(3):
        for m in range(2):
            engine.backward(_loss(engine, 10 * step + m))
            engine.step()
            g = torch.Generator().manual_seed(10 * step + m)
            (ref(torch.randn(2, 4, generator=g)).pow(2).mean() / 2).backward()
        ref_opt.step()
        ref_opt.zero_grad()
    for a, b in zip(engine.module.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_gradient_clipping_defaults_to_deepspeeds_1():
    """No gradient_clipping key: DeepSpeed 0.19's engine clips to 1.0 (GRADIENT_CLIPPING_DEFAULT)."""
    ref = _model()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    model = _model()
    engine, *_ = flexspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=_cfg(gradient_accumulation_steps=1))
    assert engine.gradient_clipping() == 1.0
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(0))
    engine.backward(engine(x).pow(2).mean() * 100)
    engine.step()
    assert engine.get_global_grad_norm() > 1.0  # so clipping acted
    (ref(x).pow(2).mean() * 100).backward()
    torch.nn.utils.clip_grad_norm_(ref.parameters(), 1.0)
    ref_opt.step()
    for a, b in zip(engine.module.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_scheduler_from_config_steps_on_boundaries():
    cfg = _cfg(scheduler={"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 0.1,
                                                         "warmup_num_steps": 4, "warmup_type": "linear"}})
    model = _model()
    engine, _, _, sched = flexspeed.initialize(model=model, model_parameters=model.parameters(), config=cfg)
    lrs = []
    for i in range(6):
        engine.backward(_loss(engine, i))
        engine.step()
        lrs.append(engine.get_lr()[0])
    assert sched is not None
    # the schedule advances only when step() lands on a boundary (micro-steps 1, 3, 5), to
    # iterations 0, 1, 2: DeepSpeed's WarmupLR writes warmup_min_lr at construction and at iteration 0
    assert lrs == pytest.approx([0.0, 0.0, 0.0, 0.025, 0.025, 0.05], rel=1e-12)


def test_client_optimizer_and_scheduler_objects_and_callables():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    cfg = {k: v for k, v in _cfg().items() if k != "optimizer"}
    engine, got_opt, _, got_sched = flexspeed.initialize(model=model, optimizer=opt, lr_scheduler=sched, config=cfg)
    assert got_opt is opt and got_sched is sched
    for i in range(2):
        engine.backward(_loss(engine, i))
        engine.step()
    assert engine.get_lr() == [0.025]
    dist.destroy_process_group()
    model = _model()
    engine, got_opt, _, got_sched = flexspeed.initialize(
        model=model, optimizer=lambda params: torch.optim.SGD(params, lr=0.3),
        lr_scheduler=lambda o: torch.optim.lr_scheduler.StepLR(o, 1), config=cfg)
    assert isinstance(got_opt, torch.optim.SGD) and got_opt.defaults["lr"] == 0.3
    assert isinstance(got_sched, torch.optim.lr_scheduler.StepLR)


def test_optimizer_given_twice_with_different_values_is_an_error():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with pytest.raises(ConfigError, match=r"optimizer.*given twice.*0\.1.*0\.05"):
        flexspeed.initialize(model=model, optimizer=opt, config=_cfg())


def test_optimizer_given_twice_identically_is_fine():
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    engine, got, *_ = flexspeed.initialize(model=model, optimizer=opt, config=_cfg())
    assert got is opt


def test_forward_only_engine_without_optimizer():
    model = _model()
    cfg = {k: v for k, v in _cfg().items() if k != "optimizer"}
    engine, opt, _, _ = flexspeed.initialize(model=model, config=cfg)
    assert opt is None
    engine.eval()
    with torch.no_grad():
        out = engine(torch.ones(3, 4))
    assert out.shape == (3, 1)
    with pytest.raises(RuntimeError, match="needs an optimizer"):
        engine.backward(engine(torch.ones(3, 4)).sum())


def test_dataloader_and_backward_errors():
    from torch.utils.data import TensorDataset

    model = _model()
    ds = TensorDataset(torch.randn(10, 4))
    engine, _, loader, _ = flexspeed.initialize(model=model, model_parameters=model.parameters(),
                                               training_data=ds, config=_cfg(dataloader_drop_last=True))
    assert len(loader) == 5 and all(b[0].shape == (2, 4) for b in loader)
    with pytest.raises(ValueError, match="scalar"):
        engine.backward(engine(torch.ones(2, 4)))


def test_mpu_is_rejected_with_a_pointer():
    with pytest.raises(ValueError, match="mpu"):
        flexspeed.initialize(model=_model(), mpu=object(), config=_cfg())


def test_no_sync_context():
    model = _model()
    engine, *_ = flexspeed.initialize(model=model, model_parameters=model.parameters(), config=_cfg())
    with engine.no_sync():
        engine.backward(_loss(engine))
    assert engine.module[0].weight.grad is not None


def test_second_initialize_adopts_or_refuses_a_stage3_sharded_model():
    """DeepSpeed builds a second engine on the same model; at stage 3 flexspeed adopts FSDP2's sharding."""
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    z3 = {"stage": 3, "stage3_param_persistence_threshold": 10}  # the 32-element weight sharded, the rest whole
    first, *_ = flexspeed.initialize(model=model, config=_cfg(zero_optimization=z3))
    first.backward(_loss(first))
    first.step()
    first.backward(_loss(first, 1))
    first.step()
    second, opt, *_ = flexspeed.initialize(model=model, config=_cfg(zero_optimization=z3))
    assert second.module is model and "adopted" in " ".join(second.zero_strategy.notes)
    w0 = model[0].weight.full_tensor().clone()
    for seed in (2, 3):
        second.backward(_loss(second, seed))
        second.step()
    assert not torch.equal(model[0].weight.full_tensor(), w0) and second.global_steps == 1
    for other, why in ((_cfg(zero_optimization={"stage": 2}), "zero_optimization.stage=2"),
                       (_cfg(zero_optimization={"stage": 3}), "persistence_threshold=100000")):
        with pytest.raises(ValueError, match=why):
            flexspeed.initialize(model=model, config=other)


def test_stage2_keeps_the_users_module_and_plain_parameters():
    model = _model()
    engine, opt, *_ = flexspeed.initialize(model=model, config=_cfg(zero_optimization={"stage": 2}))
    params = list(model.parameters())
    for seed in range(4):
        engine.backward(_loss(engine, seed))
        engine.step()
    assert engine.module is model and type(model) is nn.Sequential
    assert all(type(p) is nn.Parameter for p in model.parameters()) and list(model.parameters()) == params
    assert engine.zero_optimization_stage() == 2 and engine.global_steps == 2
