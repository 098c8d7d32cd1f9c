"""Optimizers from the config: DeepSpeed names and defaults, Lamb/Lion against reference formulas."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

from flexspeed.config.errors import ConfigError
from flexspeed.runtime.optimizers import Lamb, Lion, build_optimizer, is_supported_for_zero, optimizer_names
from flexspeed.utils.logging import reset_warn_once


def _params(seed: int = 0, dtype: torch.dtype = torch.float32) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    shapes = [(4, 3), (3,), (2, 2, 2)]
    return [torch.nn.Parameter(torch.randn(s, generator=g, dtype=dtype)) for s in shapes]


def _grads(params, step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in params]


@pytest.fixture(autouse=True)
def _fresh_warnings():
    reset_warn_once()
    yield
    reset_warn_once()


# -- names, classes, hyperparameters ---------------------------------------------------------------

@pytest.mark.parametrize("name,params,cls,expect", [
    ("Adam", {"lr": 0.1}, torch.optim.AdamW, {"lr": 0.1, "weight_decay": 0.0, "betas": (0.9, 0.999)}),
    ("adam", {"weight_decay": 0.1, "betas": [0.8, 0.9], "eps": 1e-6}, torch.optim.AdamW,
     {"weight_decay": 0.1, "betas": (0.8, 0.9), "eps": 1e-6}),
    ("Adam", {"adam_w_mode": False, "weight_decay": 0.1}, torch.optim.Adam, {"weight_decay": 0.1}),
    ("Adam", {"adam_w_mode": True, "torch_adam": True, "bias_correction": True}, torch.optim.AdamW, {}),
    ("AdamW", {}, torch.optim.AdamW, {"weight_decay": 0.0, "lr": 1e-3}),
    ("ADAMW", {"weight_decay": 0.01, "amsgrad": True}, torch.optim.AdamW, {"amsgrad": True}),
    ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True}, torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    ("Adagrad", {"lr": 0.05, "lr_decay": 0.1}, torch.optim.Adagrad, {"lr": 0.05, "lr_decay": 0.1}),
    ("Lamb", {"lr": 0.01, "bias_correction": False, "max_coeff": 5.0, "min_coeff": 0.1}, Lamb,
     {"bias_correction": False, "max_coeff": 5.0, "min_coeff": 0.1}),
    ("lamb", {}, Lamb, {"betas": (0.9, 0.999), "eps": 1e-8, "max_coeff": 10.0, "min_coeff": 0.01}),
    ("Lion", {"lr": 1e-4, "betas": [0.95, 0.98], "weight_decay": 0.1}, Lion,
     {"lr": 1e-4, "betas": (0.95, 0.98), "weight_decay": 0.1}),
    ("lion", {}, Lion, {"betas": (0.9, 0.99), "weight_decay": 0.0}),
    ("RMSprop", {"alpha": 0.9, "centered": True}, torch.optim.RMSprop, {"alpha": 0.9, "centered": True}),
    ("nadam", {"momentum_decay": 0.005}, torch.optim.NAdam, {"momentum_decay": 0.005}),
    ("Rprop", {"etas": [0.4, 1.3]}, torch.optim.Rprop, {"etas": (0.4, 1.3)}),
])
def test_names_build_the_right_class(name, params, cls, expect):
    opt = build_optimizer(name, params, _params())
    assert type(opt) is cls
    for key, value in expect.items():
        assert opt.defaults[key] == value, key


def test_adam_modes_decoupled_vs_l2():
    """AdamW mode shrinks weights outside the moments; L2 mode folds decay into the gradient."""
    w = [torch.nn.Parameter(torch.full((3,), 2.0))]
    for mode, cls in ((True, torch.optim.AdamW), (False, torch.optim.Adam)):
        ours = build_optimizer("Adam", {"lr": 0.1, "weight_decay": 0.5, "adam_w_mode": mode}, copy.deepcopy(w))
        ref_params = copy.deepcopy(w)
        ref = cls(ref_params, lr=0.1, weight_decay=0.5)
        for o, ps in ((ours, ours.param_groups[0]["params"]), (ref, ref_params)):
            for step in range(3):
                ps[0].grad = torch.tensor([0.1, -0.2, 0.3]) * (step + 1)
                o.step()
        torch.testing.assert_close(ours.param_groups[0]["params"][0], ref_params[0], rtol=0, atol=0)


def test_param_groups_and_generators_are_accepted():
    ps = _params()
    opt = build_optimizer("Lamb", {"lr": 0.1}, [{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:]}])
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    opt = build_optimizer("SGD", {"lr": 0.1}, (p for p in _params()))
    assert len(opt.param_groups[0]["params"]) == 3


def test_optimizer_names():
    names = optimizer_names()
    assert names[:6] == ["Adam", "AdamW", "SGD", "Adagrad", "Lamb", "Lion"]
    assert "RMSprop" in names and "LBFGS" not in names


# -- errors ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,params,key,text", [
    ("Adamm", {}, "optimizer.type", "Did you mean 'Adam'"),
    ("Lamd", {}, "optimizer.type", "Did you mean 'Lamb'"),
    ("OneBitAdam", {}, "optimizer.type", "not implemented"),
    ("ZeroOneAdam", {}, "optimizer.type", "not implemented"),
    ("OneBitLamb", {}, "optimizer.type", "not implemented"),
    ("LBFGS", {}, "optimizer.type", "closure"),
    ("", {}, "optimizer.type", "optimizer name"),
    ("Adam", {"max_grad_norm": 1.0}, "optimizer.params.max_grad_norm", "gradient_clipping"),
    ("Lamb", {"max_grad_norm": 1.0}, "optimizer.params.max_grad_norm", "gradient_clipping"),
    ("Adam", {"lrr": 0.1}, "optimizer.params.lrr", "Did you mean 'lr'"),
    ("SGD", {"betas": [0.9, 0.99]}, "optimizer.params.betas", "Accepted: ['lr', 'momentum'"),
    ("Lion", {"eps": 1e-8}, "optimizer.params.eps", "Accepted"),
    ("Adam", {"lr": -1.0}, "optimizer.params.lr", "Invalid learning rate"),
    ("Adam", {"betas": [1.5, 0.9]}, "optimizer.params.betas", "beta"),
    ("Adam", {"lr": "fast"}, "optimizer.params.lr", "needs a number"),
    ("Adam", {"lr": "auto"}, "optimizer.params.lr", "auto"),
    ("SGD", {"nesterov": 1}, "optimizer.params.nesterov", "true or false"),
    ("Lamb", {"min_coeff": 0.0}, "optimizer.params.min_coeff", "0 < min_coeff"),
    ("Lamb", {"weight_decay": -0.1}, "optimizer.params.weight_decay", ">= 0"),
    ("Lion", {"betas": [0.9, 1.0]}, "optimizer.params.betas", "[0, 1)"),
    ("AdamW", {"adam_w_mode": False}, "optimizer.params.adam_w_mode", "\"type\": \"Adam\""),
    ("Adam", {"adam_w_mode": "no"}, "optimizer.params.adam_w_mode", "true or false"),
    ("Adam", {"bias_correction": False}, "optimizer.params.bias_correction", "Lamb"),
])
def test_config_errors_name_the_key(name, params, key, text):
    with pytest.raises(ConfigError) as err:
        build_optimizer(name, params, _params())
    assert err.value.key == key
    assert text in str(err.value)


def test_empty_model_parameters():
    with pytest.raises(ValueError, match="model_parameters is empty"):
        build_optimizer("Adam", {}, [])


def test_ignored_keys_warn_once():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            build_optimizer("Adam", {"torch_adam": False, "set_grad_none": True}, _params())
            build_optimizer("Lion", {"set_grad_none": True}, _params())
    messages = [str(w.message) for w in caught]
    assert sum("torch_adam" in m for m in messages) == 1
    assert sum("set_grad_none" in m for m in messages) == 1


def test_fused_passes_through():
    opt = build_optimizer("Adam", {"fused": True}, _params())
    assert opt.defaults["fused"] is True


# -- Lamb and Lion against per-element reference formulas -----------------------------------------

def ref_lamb(ws, grads_per_step, lr, b1, b2, eps, wd, bias_correction, max_coeff, min_coeff, eps_inside_sqrt):
    """Plain float64 LAMB, tensor by tensor, written from You et al. (2019)."""
    ws = [w.detach().double().clone() for w in ws]
    ms = [torch.zeros_like(w) for w in ws]
    vs = [torch.zeros_like(w) for w in ws]
    for t, grads in enumerate(grads_per_step, start=1):
        for w, g, m, v in zip(ws, grads, ms, vs):
            g = g.double()
            m.copy_(b1 * m + (1 - b1) * g)
            v.copy_(b2 * v + (1 - b2) * g * g)
            mh, vh = (m / (1 - b1 ** t), v / (1 - b2 ** t)) if bias_correction else (m, v)
            denom = torch.sqrt(vh + eps) if eps_inside_sqrt else torch.sqrt(vh) + eps
            u = mh / denom + wd * w
            wn, un = math.sqrt(float((w * w).sum())), math.sqrt(float((u * u).sum()))
            ratio = min(max(wn / un, min_coeff), max_coeff) if wn > 0 and un > 0 else 1.0
            w.sub_(lr * ratio * u)
    return ws


def ref_lion(ws, grads_per_step, lr, b1, b2, wd):
    """Plain float64 Lion, written from Chen et al. (2023)."""
    ws = [w.detach().double().clone() for w in ws]
    ms = [torch.zeros_like(w) for w in ws]
    for grads in grads_per_step:
        for w, g, m in zip(ws, grads, ms):
            g = g.double()
            c = b1 * m + (1 - b1) * g
            w.mul_(1 - lr * wd)
            w.sub_(lr * torch.sign(c))
            m.copy_(b2 * m + (1 - b2) * g)
    return ws


def _run(opt, params, steps: int) -> list[list[torch.Tensor]]:
    seen = []
    for s in range(steps):
        grads = _grads(params, s)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        seen.append(grads)
    return seen


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("cfg", [
    dict(lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, bias_correction=True, max_coeff=10.0,
         min_coeff=0.01, eps_inside_sqrt=False),
    dict(lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1, bias_correction=False, max_coeff=10.0,
         min_coeff=0.01, eps_inside_sqrt=True),
    dict(lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.01, bias_correction=True, max_coeff=0.5,
         min_coeff=0.3, eps_inside_sqrt=False),  # clamps bite
])
def test_lamb_matches_reference(cfg, foreach):
    params = _params()
    start = [p.detach().clone() for p in params]
    opt = Lamb(params, foreach=foreach, **cfg)
    grads = _run(opt, params, 5)
    want = ref_lamb(start, grads, cfg["lr"], *cfg["betas"], cfg["eps"], cfg["weight_decay"],
                    cfg["bias_correction"], cfg["max_coeff"], cfg["min_coeff"], cfg["eps_inside_sqrt"])
    for p, w in zip(params, want):
        torch.testing.assert_close(p.detach().double(), w, rtol=1e-5, atol=1e-6)
    coeffs = opt.get_lamb_coeffs()
    assert len(coeffs) == 3 and all(cfg["min_coeff"] <= c <= cfg["max_coeff"] for c in coeffs)


def test_lamb_zero_weight_tensor_uses_unit_trust_ratio():
    p = torch.nn.Parameter(torch.zeros(4))
    opt = Lamb([p], lr=0.1)
    p.grad = torch.tensor([1.0, -1.0, 2.0, 0.5])
    opt.step()
    assert opt.get_lamb_coeffs() == [1.0]
    # step 1 with bias correction: m^ = g, v^ = g^2, so u = sign(g) (up to eps)
    torch.testing.assert_close(p.detach(), -0.1 * torch.sign(p.grad), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("foreach", [None, False])
@pytest.mark.parametrize("cfg", [dict(lr=1e-3, betas=(0.9, 0.99), weight_decay=0.0),
                                 dict(lr=3e-3, betas=(0.95, 0.98), weight_decay=0.5)])
def test_lion_matches_reference(cfg, foreach):
    params = _params()
    start = [p.detach().clone() for p in params]
    opt = Lion(params, foreach=foreach, **cfg)
    grads = _run(opt, params, 6)
    want = ref_lion(start, grads, cfg["lr"], *cfg["betas"], cfg["weight_decay"])
    for p, w in zip(params, want):
        torch.testing.assert_close(p.detach().double(), w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("cls,kwargs", [(Lamb, {"lr": 0.01, "weight_decay": 0.01}),
                                        (Lion, {"lr": 1e-3, "weight_decay": 0.1})])
def test_state_dict_round_trip(cls, kwargs):
    params_a = _params()
    opt_a = cls([{"params": params_a[:2]}, {"params": params_a[2:], "lr": kwargs["lr"] / 2}], **kwargs)
    _run(opt_a, params_a, 3)
    params_b = [torch.nn.Parameter(p.detach().clone()) for p in params_a]
    opt_b = cls([{"params": params_b[:2]}, {"params": params_b[2:], "lr": 1.0}], **kwargs)
    opt_b.load_state_dict(copy.deepcopy(opt_a.state_dict()))
    assert opt_b.param_groups[1]["lr"] == kwargs["lr"] / 2
    assert float(opt_b.state[params_b[0]]["step"]) == 3.0
    for s in range(3, 6):
        for pa, pb, g in zip(params_a, params_b, _grads(params_a, s)):
            pa.grad, pb.grad = g.clone(), g.clone()
        opt_a.step()
        opt_b.step()
    for pa, pb in zip(params_a, params_b):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0)


@pytest.mark.parametrize("cls", [Lamb, Lion])
def test_skips_params_without_grad_and_supports_closure_and_bf16(cls):
    params = _params(dtype=torch.bfloat16)
    opt = cls(params, lr=0.01)
    params[0].grad = torch.ones_like(params[0])
    before = [p.detach().clone() for p in params]
    loss = opt.step(lambda: torch.tensor(3.0))
    assert loss == 3.0
    assert not torch.equal(params[0], before[0])
    assert torch.equal(params[1], before[1]) and params[1] not in opt.state
    assert opt.state[params[0]]["exp_avg"].dtype == torch.bfloat16


@pytest.mark.parametrize("cls", [Lamb, Lion])
def test_rejects_sparse_gradients(cls):
    p = torch.nn.Parameter(torch.zeros(3))
    opt = cls([p])
    p.grad = torch.zeros(3).to_sparse()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_is_supported_for_zero():
    ps = _params()

    class Custom(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"lr": 0.1})

    assert is_supported_for_zero(torch.optim.AdamW(ps))
    assert is_supported_for_zero(build_optimizer("RMSprop", {}, ps))
    assert is_supported_for_zero(Lamb(ps)) and is_supported_for_zero(Lion(ps))
    assert not is_supported_for_zero(torch.optim.LBFGS(ps))
    assert not is_supported_for_zero(Custom(ps))
    assert not is_supported_for_zero(object())
