"""Pipeline behaviours a DeepSpeed user relies on (issue 14), 2 ranks x 2 stages:

- ``PipelineModule(layers=nn.Sequential(...))`` and ``layers=nn.ModuleList(...)`` are accepted (DeepSpeed
  takes any sequence of layers), with the ``nn.Sequential``'s own state-dict keys;
- a stage whose first layer works in place on what it receives (AlexNet's ``ReLU(inplace=True)``) trains:
  the engine runs each stage on a copy of its incoming activations, as DeepSpeed's does;
- the engine passes unknown attributes through to the module, and refuses ``save_checkpoint("")``.

Both equal the same ``nn.Sequential`` trained in one process (fp32, 1e-5).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from flexspeed.testing import run_ranks

MICRO, GAS, STEPS, LR = 2, 2, 3, 1e-2


def sequential() -> nn.Sequential:
    """Uniform partition over 2 stages: stage 1 starts with ReLU(inplace=True)."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 16), nn.ReLU(inplace=True), nn.Linear(16, 4))


def batches(step: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(step)
    return [(torch.randn(MICRO, 8, generator=g), torch.randn(MICRO, 4, generator=g)) for _ in range(GAS)]


def _both(rank: int, world: int) -> dict:
    return {container: _train(container) for container in ("Sequential", "ModuleList")}


def _train(container: str) -> dict:
    import flexspeed
    from flexspeed.pipe import PipelineModule

    seq = sequential()
    layers = seq if container == "Sequential" else nn.ModuleList(list(seq))
    module = PipelineModule(layers=layers, num_stages=2, loss_fn=F.mse_loss, partition_method="uniform")
    cfg = {"train_micro_batch_size_per_gpu": MICRO, "gradient_accumulation_steps": GAS, "steps_per_print": 1000,
           "gradient_clipping": 0.0,  # the reference does not clip (DeepSpeed's default is 1.0)
           "optimizer": {"type": "Adam", "params": {"lr": LR}}}
    engine, *_ = flexspeed.initialize(model=module, model_parameters=module.parameters(), config=cfg)
    losses = [float(engine.train_batch(iter(batches(s)))) for s in range(STEPS)]
    try:
        engine.save_checkpoint("")
        refused = ""
    except ValueError as err:
        refused = str(err)
    return {"losses": losses, "state": engine.module.to_sequential_state_dict(), "refused": refused,
            "num_layers": engine.num_layers,  # the PipelineModule's, through the engine
            "first_layer": type(engine.module.stage_modules[0].layers[next(iter(engine.module.stage_modules[0]
                                                                               .layers))]).__name__}


@pytest.fixture(scope="module")
def world2() -> list[dict]:
    return run_ranks(_both, world_size=2, timeout=180)


def reference() -> tuple[list[float], dict[str, torch.Tensor]]:
    model = copy.deepcopy(sequential())
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    losses = []
    for s in range(STEPS):
        opt.zero_grad()
        total = 0.0
        for x, y in batches(s):
            loss = F.mse_loss(model(x), y) / GAS
            loss.backward()
            total += loss.item()
        opt.step()
        losses.append(total)
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("container", ["Sequential", "ModuleList"])
def test_sequential_layers_with_an_in_place_first_layer_match_one_process(world2, container):
    results = [r[container] for r in world2]
    ref_losses, ref_state = reference()
    assert [r["first_layer"] for r in results] == ["Linear", "ReLU"]  # stage 1 starts in place
    assert [r["num_layers"] for r in results] == [4, 4]
    assert all("save_dir must be a non-empty path" in r["refused"] for r in results)
    for r in results:
        torch.testing.assert_close(torch.tensor(r["losses"]), torch.tensor(ref_losses), rtol=0, atol=1e-5)
        assert list(r["state"]) == list(ref_state)  # the nn.Sequential's own keys, in order
        for k, v in ref_state.items():
            torch.testing.assert_close(r["state"][k], v, rtol=0, atol=1e-5, msg=k)


def test_layers_of_another_type_are_refused_with_the_fix():
    from flexspeed.pipe import PipelineModule

    with pytest.raises(ValueError, match=r"list, tuple, nn.Sequential or nn.ModuleList of layers, got ModuleDict"
                                         r".*Fix: pass e.g."):
        PipelineModule(layers=nn.ModuleDict({"a": nn.Linear(2, 2)}), num_stages=1)
