"""DeepSpeed's ``tests/unit/checkpoint/common.py`` for the checkpoint ports: train, save, load into a
fresh engine, compare.

Differences from DeepSpeed's helper, all plumbing:

- parameters are compared as whole tensors: ``zero.GatheredParameters`` yields full copies of
  flexspeed's sharded (DTensor) parameters, where DeepSpeed's makes its own ``ds_status`` parameters
  whole in place;
- DeepSpeed compares the fp32 partitions inside its optimizer wrappers (``FP16_Optimizer``,
  ``DeepSpeedZeroOptimizer``, ...). flexspeed's ``engine.optimizer`` is the torch optimizer over
  the fp32 parameters themselves (compared above): DeepSpeed's own last branch for a plain torch
  optimizer (``pass``) is the one that applies;
- ``sparse_tensor_module_names`` is not compared (flexspeed has no sparse gradients);
- "the optimizer file is not read when ``load_optimizer_states=False``" watches flexspeed's
  ``state_dicts`` (which adds the optimizer to what is read) where DeepSpeed watches
  ``_get_optimizer_ckpt_name``.
"""

from __future__ import annotations

import numbers
import os
from unittest.mock import patch

import torch
import torch.distributed as dist

import flexspeed as deepspeed
import flexspeed.runtime.checkpoint_load as flex_checkpoint  # where load_checkpoint reads the state dicts
from tests.compat._ds_common import preferred_dtype, random_dataloader, sequence_dataloader


def _whole(t):
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def compare_deepspeed_states(saved_model, loaded_model):
    assert hasattr(loaded_model, "module")
    assert saved_model.skipped_steps == loaded_model.skipped_steps
    assert saved_model.global_steps == loaded_model.global_steps


def compare_model_states(saved_model, loaded_model, compare_optimizer=True, load_module_only=False):
    if not load_module_only:
        compare_deepspeed_states(saved_model, loaded_model)
    named0 = list(saved_model.module.named_parameters())
    named1 = list(loaded_model.module.named_parameters())
    assert len(named0) == len(named1)
    with deepspeed.zero.GatheredParameters([p for _, p in named0]) as full0, \
            deepspeed.zero.GatheredParameters([p for _, p in named1]) as full1:
        for (np0, p0), (np1, p1), f0, f1 in zip(named0, named1, full0, full1):
            assert id(p0) != id(p1), f"Comparing fp16 model state tensor against itself : {id(p0)} <====> {id(p1)}"
            assert torch.allclose(f0, f1, atol=1e-07), f"FP16 model state {f0} is not equal to {f1}, names:{np0}, {np1}"
    if not compare_optimizer:
        return
    assert isinstance(saved_model.optimizer, torch.optim.Optimizer), f"Unexpected Optimizer Type: {saved_model.optimizer}"


def compare_state_dicts(state0, state1, expected_mismatch_keys=()):
    key_set0 = set(k for k in state0.keys() if k not in expected_mismatch_keys)
    key_set1 = set(k for k in state1.keys() if k not in expected_mismatch_keys)
    assert key_set0 == key_set1, f"failure due to key mismatch {key_set0} != {key_set1}"
    for k in key_set0:
        s0, s1 = state0[k], state1[k]
        if isinstance(s0, torch.Tensor) and isinstance(s1, torch.Tensor):
            assert id(s0) != id(s1), f"Comparing optimizer state tensor against itself: {id(s0)} <====> {id(s1)}"
            assert torch.equal(_whole(s0).to("cpu"), _whole(s1).to("cpu"))
        else:
            assert s0 == s1, f"failures with keys = {k}, {k}, values = {s0} and {s1}"


def compare_opt_state_dicts(state0, state1, expected_mismatch_keys=()):
    for group0, group1 in zip(state0["param_groups"], state1["param_groups"]):
        compare_state_dicts(group0, group1, expected_mismatch_keys)
    assert "state" in state0
    assert "state" in state1
    assert len(state0["state"]) == len(state1["state"])
    for (k0, s0), (k1, s1) in zip(state0["state"].items(), state1["state"].items()):
        assert k0 == k1, f"failure due to key mismatch {k0} != {k1}"
        compare_state_dicts(s0, s1, expected_mismatch_keys)


def compare_optimizer_states(saved_model, loaded_model, hidden_dim, fp16=True):
    # DeepSpeed's fp16 path reads the optimizer inside its FP16_Optimizer wrapper; flexspeed has none
    saved_optimizer, loaded_optimizer = saved_model.optimizer, loaded_model.optimizer
    assert len(saved_optimizer.state) == len(loaded_optimizer.state)
    for state0, state1 in zip(saved_optimizer.state.values(), loaded_optimizer.state.values()):
        compare_state_dicts(state0, state1)


def compare_lr_scheduler_states(saved_model, loaded_model):
    assert hasattr(saved_model, "lr_scheduler")
    assert hasattr(loaded_model, "lr_scheduler")
    saved_scheduler, loaded_scheduler = saved_model.lr_scheduler, loaded_model.lr_scheduler
    assert hasattr(saved_scheduler, "state_dict")
    assert hasattr(loaded_scheduler, "state_dict")
    saved_sd, loaded_sd = saved_scheduler.state_dict(), loaded_scheduler.state_dict()
    assert saved_sd.keys() == loaded_sd.keys()
    for state0, state1 in zip(saved_sd.values(), loaded_sd.values()):
        if isinstance(state0, numbers.Number) and isinstance(state1, numbers.Number):
            assert state0 == state1


def create_moe_param_groups(model):
    # DeepSpeed splits expert parameters into their own groups; these models have none, so the
    # split returns the one named group
    return [{"params": list(model.parameters()), "name": "parameters"}]


def create_deepspeed_model(config_dict, model, base_optimizer):
    ds_model, _, _, _ = deepspeed.initialize(config=config_dict, model=model,
                                             model_parameters=create_moe_param_groups(model), optimizer=base_optimizer)
    ds_model.empty_partition_cache()
    return ds_model


def _barrier():
    if dist.is_initialized():
        dist.barrier()


def checkpoint_correctness_verification(config_dict, models, hidden_dim, tmpdir, load_optimizer_states=False,
                                        load_lr_scheduler_states=False, train_batch=False,
                                        base_optimizers=(None, None), empty_tag=False, seq_dataloader=False,
                                        load_module_only=False, dtype=None):
    """Train ``models[0]`` on 50 random samples, save, load into ``models[1]``'s engine, compare."""
    dtype = dtype or preferred_dtype()
    ds_model = create_deepspeed_model(config_dict=config_dict, model=models[0], base_optimizer=base_optimizers[0])
    make_loader = sequence_dataloader if seq_dataloader else random_dataloader
    data_loader = make_loader(model=ds_model, total_samples=50, hidden_dim=hidden_dim, device=ds_model.device,
                              dtype=dtype)
    if train_batch:
        ds_model.set_dataloader(data_loader)
        for _ in data_loader:
            ds_model.train_batch()
    else:
        for batch in data_loader:
            loss = ds_model(batch[0], batch[1])
            ds_model.backward(loss)
            ds_model.step()
    ds_model.empty_partition_cache()
    trained_model = ds_model

    save_folder = os.path.join(str(tmpdir), "saved_checkpoint")
    save_tag = None if empty_tag else "1"
    trained_model.save_checkpoint(save_folder, tag=save_tag)
    _barrier()

    loaded_model = create_deepspeed_model(config_dict=config_dict, model=models[1], base_optimizer=base_optimizers[1])
    assert list(trained_model.parameters())[0].dtype == list(loaded_model.parameters())[0].dtype

    with patch.object(flex_checkpoint, "state_dicts", wraps=flex_checkpoint.state_dicts) as reads:
        loaded_model.load_checkpoint(save_folder, tag=save_tag, load_optimizer_states=load_optimizer_states,
                                     load_lr_scheduler_states=load_lr_scheduler_states,
                                     load_module_only=load_module_only)
    if not load_optimizer_states:
        # should not attempt to read the optimizer state
        assert reads.call_count == 1 and reads.call_args.kwargs["with_optimizer"] is False, reads.call_args_list

    compare_model_states(trained_model, loaded_model, compare_optimizer=load_optimizer_states,
                         load_module_only=load_module_only)
    if load_optimizer_states:
        compare_optimizer_states(trained_model, loaded_model, hidden_dim, dtype == torch.float16)
    if load_lr_scheduler_states:
        compare_lr_scheduler_states(trained_model, loaded_model)
    return trained_model, loaded_model
