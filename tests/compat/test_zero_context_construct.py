"""Constructor arithmetic under ``zero.Init`` (extends the port of DeepSpeed's ``test_zero_context.py``).

DeepSpeed keeps a module's parameters whole until its ``__init__`` returns, so ``self.p.data = self.p.data + 1``
in a constructor works there. flexspeed's parameters hold no values inside ``Init`` (``initialize()`` fills
them by running ``reset_parameters()`` again), so such a write would be lost: it raises at that line, naming
the parameter and the fix, and the fix (``param_init_fn``) gives the eager model's weights. Value-free
initialisers (``normal_``, ``zero_``, ``fill_``, ``torch.nn.init``) keep working.
"""

from __future__ import annotations

import pytest
import torch

import flexspeed as deepspeed
from tests.compat._ds_common import destroy_group


class Shifted(torch.nn.Module):
    """A layer whose constructor does arithmetic on its freshly initialised weights (the pattern that is lost)."""

    def __init__(self, how: str = "none") -> None:
        super().__init__()
        self.linear = torch.nn.Linear(4, 3)
        self.bias2 = torch.nn.Parameter(torch.zeros(3))
        self.emb = torch.nn.Embedding(5, 4, padding_idx=0)  # Embedding zeroes its padding row in place
        self.norm = torch.nn.LayerNorm(3)
        with torch.no_grad():
            self.bias2.data.normal_()   # value-free initialisers are allowed
            self.bias2.data[0].zero_()
            torch.nn.init.xavier_uniform_(self.linear.weight)
            if how == "data":
                self.linear.weight.data = self.linear.weight.data + 1
            elif how == "mul_":
                self.linear.weight.data.mul_(2)
            elif how == "iadd":
                self.bias2 += 1
            elif how == "setitem":
                self.bias2[1] = 3.0
            elif how == "copy":
                self.linear.bias.copy_(torch.ones(3))
            elif how == "view":
                self.linear.weight[0].add_(1)
            elif how == "torch_out":
                torch.add(self.bias2, 1, out=self.bias2)


@pytest.fixture
def one_rank():
    yield
    destroy_group()


@pytest.mark.parametrize("how,op,param", [
    ("data", ".data = ", "Linear.weight"), ("mul_", "mul_()", "Linear.weight"), ("iadd", "add_()", "Shifted.bias2"),
    ("setitem", "__setitem__()", "Shifted.bias2"), ("copy", "copy_()", "Linear.bias"),
    ("view", "add_()", "Linear.weight"), ("torch_out", "out=", "Shifted.bias2")])
def test_constructor_arithmetic_raises_at_the_line(how, op, param):
    with pytest.raises(RuntimeError) as err:
        with deepspeed.zero.Init():
            Shifted(how)
    msg = str(err.value)
    assert op in msg and param in msg and "would be lost" in msg and "param_init_fn" in msg and "Fix" in msg
    # the failing line is in the constructor, not deep inside initialize()
    assert any(f.name == "__init__" for f in err.traceback if "test_zero_context_construct" in str(f.path))
    # the guard left with the context: arithmetic on ordinary tensors works again
    layer = torch.nn.Linear(2, 2)
    layer.weight.data = layer.weight.data + 1


def test_value_free_initialisers_and_nesting_are_allowed():
    with deepspeed.zero.Init():
        with deepspeed.zero.Init():
            model = Shifted("none")
    assert model.linear.weight.numel() == 0 or model.linear.weight.is_meta
    t = torch.zeros(2)
    t.add_(1)  # no guard outside Init
    assert t.tolist() == [1.0, 1.0]


def test_gathered_parameters_write_inside_init_is_allowed(one_rank):
    with deepspeed.zero.Init():
        layer = torch.nn.Linear(3, 2)
        with deepspeed.zero.GatheredParameters(list(layer.parameters()), modifier_rank=0):
            with torch.no_grad():
                layer.weight.copy_(torch.full((2, 3), 0.5))
                layer.bias.data = layer.bias.data + 2  # whole inside the block: kept
    engine, *_ = deepspeed.initialize(model=layer, config={"train_batch_size": 1, "zero_optimization": {"stage": 3}})
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())) as (w, b):
        assert torch.equal(w, torch.full((2, 3), 0.5)) and torch.equal(b, torch.full((2,), 2.0))


def _init_own(module):
    if isinstance(module, Shifted):  # Shifted's own parameter has no reset_parameters()
        module.bias2.data.normal_()


def _build(param_init_fn):
    torch.manual_seed(0)
    with deepspeed.zero.Init(param_init_fn=param_init_fn):
        model = Shifted("none")
    engine, *_ = deepspeed.initialize(model=model, config={"train_batch_size": 1, "zero_optimization": {"stage": 3}})
    with deepspeed.zero.GatheredParameters(list(engine.module.parameters())) as full:
        out = {n: t.clone() for (n, _), t in zip(engine.module.named_parameters(), full)}
    destroy_group()
    return out


def test_the_fix_param_init_fn_applies_the_arithmetic(one_rank):
    def shift(module):
        _init_own(module)
        if isinstance(module, torch.nn.Linear):
            module.weight.data = module.weight.data * 2  # the refused constructor line, moved here

    got, ref = _build(shift), _build(_init_own)
    assert set(got) == {"linear.weight", "linear.bias", "bias2", "emb.weight", "norm.weight", "norm.bias"}
    assert torch.equal(got["linear.weight"], ref["linear.weight"] * 2)
    for name in set(got) - {"linear.weight"}:
        assert torch.equal(got[name], ref[name]), name
    assert not torch.equal(ref["linear.weight"], torch.zeros_like(ref["linear.weight"]))
