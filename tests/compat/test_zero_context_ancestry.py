"""Port of DeepSpeed's ``tests/unit/runtime/zero/test_zero_context_ancestry.py``.

Cases: TestSerialParamInit.test_subclass_param_init, TestDSInitWZinit.test.

Plumbing: world 1 in this process (DeepSpeed's "serial" variant runs without a launcher too), world 2
in the session's spawned group. fp16 in DeepSpeed's config is bf16 here (the CPU has no fp16).

Deliberate difference (test_subclass_param_init): under flexspeed's ``zero.Init`` the parameters are
placeholders without values until ``initialize()`` fills them from each module's ``reset_parameters()``
or ``param_init_fn`` (docs/zero.md), so the ``.data`` arithmetic in DeepSpeed's constructors would be
lost. flexspeed refuses it at that line, naming the parameter and the fix, instead of losing it
silently. The port asserts that error (with and without DeepSpeed's ``.cpu()``), then runs the fix the
error names - the same arithmetic as a ``param_init_fn`` - and checks DeepSpeed's expected values.
"""

from __future__ import annotations

import pytest
import torch

import flexspeed as deepspeed
from tests.compat._ds_common import destroy_group
from tests.compat._ranks import expect, rank_case

CONFIG = {"train_batch_size": 1, "steps_per_print": 1, "optimizer": {"type": "Adam", "params": {"lr": 0.00015}},
          "bf16": {"enabled": True}, "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 1}}


class GrandPa(torch.nn.Module):
    def __init__(self, *args):
        super().__init__(*args)
        self.param_grandpa = torch.nn.Parameter(torch.ones(5))
        self.param_grandpa.data = (self.param_grandpa.data + 1).data  # test param is not yet partitioned


class Pa(GrandPa):
    def __init__(self, *args):
        super().__init__(*args)
        self.param_pa = torch.nn.Parameter(torch.ones(5))
        self.param_pa.data = (self.param_pa.data + 1).data
        self.param_grandpa.data = (self.param_grandpa.data + 1).data


class Son(Pa):
    def __init__(self):
        super().__init__()
        self.param = torch.nn.Parameter(torch.ones(5))
        self.param.data = (self.param.data + 1).data
        self.param_pa.data = (self.param_pa.data + 1).data
        self.param_grandpa.data = (self.param_grandpa.data + 1).data


def _son_values(module):
    """The constructors' arithmetic, as a param_init_fn."""
    with torch.no_grad():
        module.param.fill_(2.0)
        module.param_pa.fill_(3.0)
        module.param_grandpa.fill_(4.0)


class _PlainSon(torch.nn.Module):
    """Son's parameters without the constructor arithmetic (the fix the error names)."""

    def __init__(self):
        super().__init__()
        self.param_grandpa = torch.nn.Parameter(torch.ones(5))
        self.param_pa = torch.nn.Parameter(torch.ones(5))
        self.param = torch.nn.Parameter(torch.ones(5))


_REFUSAL = r"\.data = <a new value> on parameter .*param_grandpa.*would be lost.*Fix: .*reset_parameters\(\).*param_init_fn"


class TestSerialParamInit:
    def test_subclass_param_init(self):
        with pytest.raises(RuntimeError, match=_REFUSAL):
            with deepspeed.zero.Init(config=CONFIG):
                Son().cpu()  # DeepSpeed's case: the constructor's arithmetic is refused at its line

    def test_subclass_param_init_without_cpu(self):
        """The fix the refusal names: the constructors' arithmetic as a param_init_fn gives DeepSpeed's values."""
        try:
            with pytest.raises(RuntimeError, match=_REFUSAL):
                with deepspeed.zero.Init(config=CONFIG):
                    Son()
            with deepspeed.zero.Init(config=CONFIG, param_init_fn=_son_values):
                model = _PlainSon()
            # all params are placeholders (DeepSpeed: partitioned, ds_status NOT_AVAILABLE)
            for p in (model.param_grandpa, model.param_pa, model.param):
                assert p.ds_status == deepspeed.zero.ZeroParamStatus.NOT_AVAILABLE and p.ds_numel == 5
            deepspeed.initialize(model=model, config=CONFIG)
            ones = torch.ones(5)
            with deepspeed.zero.GatheredParameters(list(model.parameters(recurse=False))) as full:
                by_name = dict(zip([n for n, _ in model.named_parameters(recurse=False)], full))
                assert torch.equal(by_name["param"], ones + 1)
                assert torch.equal(by_name["param_pa"], ones + 2)
                assert torch.equal(by_name["param_grandpa"], ones + 3)
        finally:
            destroy_group()


def case_ds_init_w_zinit(tmpdir):
    ds_config = {"train_batch_size": 2, "steps_per_print": 1, "optimizer": {"type": "Adam", "params": {"lr": 0.00015}}}

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 4)

        def magic(self):
            return 42

    with deepspeed.zero.Init():
        model = Model()
        engine, *_ = deepspeed.initialize(model=model, config=ds_config, model_parameters=model.parameters())
    assert engine.magic() == 42


rank_case(__name__, "TestDSInitWZinit", case_ds_init_w_zinit)


class TestDSInitWZinit:
    def test(self, ranks2):
        expect(ranks2, __name__, "TestDSInitWZinit")
