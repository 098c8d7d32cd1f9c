"""``flexspeed.checkpointing``: DeepSpeed's module API, gradients equal to the plain run, fewer saved
tensors, configuration from ``initialize()`` and from ``configure()``, and the errors."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.nn as nn

import flexspeed
from flexspeed.config.errors import ConfigError

ck = flexspeed.checkpointing
WIDTH, DEPTH, BATCH = 32, 4, 8


@pytest.fixture(autouse=True)
def _fresh_state():
    ck._settings, ck._configured_by, ck.mpu = ck.CheckpointingSettings(), None, None
    ck.get_cuda_rng_tracker().reset()
    yield
    ck._settings, ck._configured_by, ck.mpu = ck.CheckpointingSettings(), None, None
    if dist.is_initialized():
        dist.destroy_process_group()


class Net(nn.Module):
    """Blocks with dropout (so a wrong RNG replay would change the gradients); ``use_ckpt`` routes
    each block through ``flexspeed.checkpointing.checkpoint`` as a DeepSpeed model does."""

    def __init__(self, use_ckpt: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(WIDTH, 4 * WIDTH), nn.GELU(), nn.Dropout(0.2), nn.Linear(4 * WIDTH, WIDTH))
            for _ in range(DEPTH))
        self.use_ckpt = use_ckpt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x * 1.0  # an activation (not a leaf) enters the first block
        for block in self.blocks:
            x = ck.checkpoint(block, x) if self.use_ckpt else block(x)
        return x


def _batch() -> torch.Tensor:
    return torch.randn(BATCH, WIDTH, generator=torch.Generator().manual_seed(3))


def _grads(model: nn.Module, seed: int = 7) -> tuple[torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(seed)
    loss = model(_batch()).pow(2).mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


def _saved(model: nn.Module) -> tuple[int, int]:
    """(count, bytes) of the tensors the forward keeps for backward, parameters excluded."""
    params = {p.data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.data_ptr() not in params:
            seen[t.data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(_batch()).sum()
    return len(seen), sum(seen.values())


def test_gradients_equal_the_plain_run():
    # Tolerance 0: the recomputation runs the same fp32 CPU kernels on the same inputs with the
    # forward's RNG state replayed (dropout masks equal), so gradients are bitwise equal.
    loss0, plain = _grads(Net())
    loss1, ckpt = _grads(Net(use_ckpt=True))
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=0)
    for a, b in zip(ckpt, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_saved_tensors_drop_to_the_block_inputs():
    count0, bytes0 = _saved(Net())
    count1, bytes1 = _saved(Net(use_ckpt=True))
    assert count1 == DEPTH, "a checkpointed block keeps exactly its input"
    assert bytes1 == DEPTH * BATCH * WIDTH * 4
    assert count0 >= 4 * DEPTH and bytes1 * 10 < bytes0, (count0, bytes0, count1, bytes1)


def test_module_api_forms_agree():
    block = nn.Sequential(nn.Linear(WIDTH, WIDTH), nn.Tanh())
    x = _batch().requires_grad_(True)
    ref = block(x)
    outs: list = []
    for out in (ck.checkpoint(block, x), ck.non_reentrant_checkpoint(block, x),
                ck.CheckpointFunction.apply(block, outs, x), ck.CheckpointFunction.apply(block, x)):
        torch.testing.assert_close(out, ref, rtol=0, atol=0)
    assert len(outs) == 1 and torch.equal(outs[0], ref), "all_outputs receives the outputs, as in DeepSpeed"
    two = ck.checkpoint(lambda a, scale=1.0: (a * scale, a.sum()), x, scale=2.0)
    assert isinstance(two, tuple) and torch.equal(two[0], x * 2)
    two[0].sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, 2.0))


def test_parameters_get_gradients_when_no_input_requires_grad():
    # DeepSpeed's reentrant checkpoint drops them here; the non-reentrant one does not.
    block = nn.Linear(WIDTH, 1)
    ck.checkpoint(block, _batch()).sum().backward()
    assert block.weight.grad is not None


def test_no_grad_runs_the_function_directly():
    block = nn.Linear(WIDTH, WIDTH)
    with torch.no_grad():
        out = ck.checkpoint(block, _batch())
    assert not out.requires_grad


def test_rng_tracker_states_are_replayed():
    ck.model_parallel_cuda_manual_seed(123)
    tracker = ck.get_cuda_rng_tracker()

    def block(x: torch.Tensor) -> torch.Tensor:
        with tracker.fork():
            return nn.functional.dropout(x, 0.5) * 3

    x = _batch().requires_grad_(True)
    states = tracker.get_states()
    expect = block(x)
    tracker.set_states(states)
    out = ck.checkpoint(block, x)
    torch.testing.assert_close(out, expect, rtol=0, atol=0)
    out.sum().backward()  # recomputed under the forward's tracker state: same mask
    torch.testing.assert_close(x.grad, (expect != 0).float() * 6, rtol=0, atol=0)  # kept: 2 (1/(1-p)) * 3
    with pytest.raises(ValueError, match="already tracked"):
        tracker.add("model-parallel-rng", 5)


def test_configure_keywords_and_globals():
    assert not ck.is_configured() and ck.PARTITION_ACTIVATIONS is False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ck.configure(None, partition_activations=True, checkpoint_in_cpu=True, synchronize=True, profile=True)
    assert ck.is_configured() and ck.deepspeed_checkpointing_enabled
    s = ck.settings()
    assert (s.partition_activations, s.cpu_checkpointing, s.synchronize, s.profile) == (True, True, True, True)
    assert (ck.PARTITION_ACTIVATIONS, ck.CPU_CHECKPOINT, ck.SYNCHRONIZE, ck.PROFILE_TIME) == (True,) * 4
    assert not s.partitions, "no model parallelism: nothing is split"
    ck.reset()  # no buffers to free; settings stay
    assert ck.settings() == s


def test_configure_from_config_file_with_keyword_override(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"activation_checkpointing": {"profile": True, "synchronize_checkpoint_boundary": True}}))
    ck.configure(None, deepspeed_config=str(path), synchronize=False)
    assert ck.settings().profile and not ck.settings().synchronize


def test_profile_logs_forward_and_recompute(caplog):
    ck.configure(None, profile=True)
    x = _batch().requires_grad_(True)
    with caplog.at_level("INFO", logger="flexspeed"):
        ck.checkpoint(nn.Linear(WIDTH, WIDTH), x).sum().backward()
    text = caplog.text
    assert "flexspeed.checkpointing: forward" in text and "flexspeed.checkpointing: recompute" in text


def test_no_effect_settings_are_said_once():
    from flexspeed.utils.logging import reset_warn_once

    reset_warn_once()
    with pytest.warns(UserWarning, match="partition_activations=true has no effect"):
        ck.configure(None, partition_activations=True)
    with pytest.warns(UserWarning, match="number_checkpoints=4 has no effect"):
        ck.configure(None, num_checkpoints=4)


@pytest.mark.parametrize("kwargs,key,value", [
    ({"contiguous_checkpointing": True}, "activation_checkpointing.contiguous_memory_optimization", "is true"),
    ({"num_checkpoints": 0}, "activation_checkpointing.number_checkpoints", "got 0"),
    ({"checkpoint_in_cpu": "yes"}, "activation_checkpointing.cpu_checkpointing", 'got "yes"'),
])
def test_configure_errors_name_key_value_and_fix(kwargs, key, value):
    with pytest.raises(ConfigError) as err:
        ck.configure(None, **kwargs)
    assert err.value.key == key and value in str(err.value) and "Fix:" in str(err.value)
    assert not ck.is_configured(), "a refused configure() changes nothing"


def test_mpu_without_the_interface_is_refused():
    with pytest.raises(TypeError, match="get_model_parallel_rank"):
        ck.configure(object())


def _engine_cfg(section: dict) -> dict:
    return {"train_micro_batch_size_per_gpu": BATCH, "optimizer": {"type": "SGD", "params": {"lr": 0.1}},
            "steps_per_print": 1000, "activation_checkpointing": section}


def test_initialize_configures_and_trains_like_the_plain_model():
    results = []
    for use in (False, True):
        model = Net(use_ckpt=use)
        engine, *_ = flexspeed.initialize(model=model, config=_engine_cfg({"profile": use}))
        torch.manual_seed(7)
        loss = engine(_batch()).pow(2).mean()
        engine.backward(loss)
        results.append([p.grad.clone() for p in engine.module.parameters()])
        engine.step()
        dist.destroy_process_group()
    assert ck.is_configured() and ck.settings().profile, "initialize() applied the config's section"
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_explicit_configure_wins_over_initialize():
    ck.configure(None, synchronize=True)
    flexspeed.initialize(model=Net(), config=_engine_cfg({"synchronize_checkpoint_boundary": False}))
    assert ck.settings().synchronize, "the script's own configure() call is kept, as in DeepSpeed"


def test_refused_key_is_refused_by_check_config_and_initialize(tmp_path, capsys):
    from flexspeed.cli.main import main

    cfg = _engine_cfg({"contiguous_memory_optimization": True, "partition_activations": True,
                       "number_checkpoints": 4})
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(cfg))
    assert main(["check-config", str(path), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    with pytest.raises(ConfigError) as err:
        flexspeed.initialize(model=Net(), config=cfg)
    assert report["key"] == err.value.key == "activation_checkpointing.contiguous_memory_optimization"
    assert report["error"] == str(err.value)
