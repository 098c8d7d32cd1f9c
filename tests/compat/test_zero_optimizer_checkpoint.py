"""Port of DeepSpeed's ``tests/unit/checkpoint/test_zero_optimizer.py``.

Cases: TestZeROCheckpoint.test_pipeline_checkpoint_loading (3), .test_load_optimizer_state (6),
.test_not_load_optimizer_state (5), .test_hybrid_optimizer_state (1, 2), .test_load_module_only (0-3);
TestZeROElasticCheckpoint.test_elastic_checkpoint_fixed_dp (8), .test_elastic_checkpoint_change_dp (8);
TestZeROSaveLoadEdgeCase.test_immediate_save_load / test_load_immediate_save /
test_save_before_accum_grad_is_done (0-3 each); TestZeROCheckpointFrozenWeights.test_load_optimizer_state /
test_not_load_optimizer_state / test_load_module_only (1-3 each), .test_save_exclude_frozen_weights /
test_save_exclude_custom_frozen_weights (1, 2); TestSaveTensorClone.test_save_tensor_clone (4);
test_elastic_checkpoint_is_deprecated_for_zero3; TestZeRONonDistributed.test_chmod_exception_handling (3);
TestZeROPPLoadCheckpoint.test_load_zeropp_model / test_load_zeropp_checkpoint.

Plumbing: the 2-rank cases run in the session's spawned group, bf16 as DeepSpeed's CPU branch picks;
the world-1 cases run here. ``model.optimizer.optimizer`` (the torch optimizer inside DeepSpeed's
ZeRO wrapper) is ``model.optimizer`` (flexspeed does not wrap it). The frozen-weight file checks read
the checkpoint through ``flexspeed.utils.zero_to_fp32`` and measure the tag folder, where DeepSpeed
opens its ``mp_rank_00_model_states.pt``. Elastic change-dp (a world-4 save then world-2 loads) is
``slow``. Deliberate differences and not-applicable cases: PORTING.md.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist

import flexspeed as deepspeed
from flexspeed.runtime.config import DeepSpeedConfig, DeepSpeedConfigError
from flexspeed.testing import run_ranks
from flexspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from tests.compat._ds_checkpoint import (checkpoint_correctness_verification, compare_opt_state_dicts,
                                         compare_state_dicts, create_deepspeed_model)
from tests.compat._ds_common import (HybridStateOptimizer, SimpleFrozenModel, SimpleModel, destroy_group,
                                     half_precision_section, random_dataloader)
from tests.compat._ranks import expect, rank_case

ADAM = {"type": "Adam", "params": {"lr": 0.00015, "betas": [0.8, 0.999], "eps": 1e-8, "weight_decay": 3e-7}}
H = 10


def _zero_models(config_dict, zero_stage, cls=SimpleModel):
    with deepspeed.zero.Init(enabled=zero_stage == 3, config_dict_or_path=config_dict):
        return [cls(H, empty_grad=False) for _ in range(2)]


# ---- TestZeROCheckpoint ---------------------------------------------------------------------------
def case_pipeline_checkpoint_loading(tmpdir, zero_stage):
    config_dict = half_precision_section({"train_batch_size": 2, "optimizer": {"type": "Adam"}, "zero_optimization": {
        "stage": zero_stage, "pipeline_loading_checkpoint": True}}, initial_scale_power=8)
    checkpoint_correctness_verification(config_dict, _zero_models(config_dict, zero_stage), H, tmpdir,
                                        load_module_only=True)


def case_load_optimizer_state(tmpdir, zero_stage, use_cpu_offload, adam_optimizer):
    config_dict = half_precision_section({"train_batch_size": 2, "steps_per_print": 1, "optimizer": ADAM,
                                          "wall_clock_breakdown": True, "zero_optimization": {
                                              "stage": zero_stage, "cpu_offload": use_cpu_offload}},
                                         initial_scale_power=8)
    checkpoint_correctness_verification(config_dict, _zero_models(config_dict, zero_stage), H, tmpdir,
                                        load_optimizer_states=True)


def case_not_load_optimizer_state(tmpdir, zero_stage, use_cpu_offload, adam_optimizer):
    config_dict = half_precision_section({"train_batch_size": 2, "steps_per_print": 1, "optimizer": ADAM,
                                          "zero_optimization": {"stage": zero_stage, "cpu_offload": use_cpu_offload}},
                                         initial_scale_power=8)
    checkpoint_correctness_verification(config_dict, _zero_models(config_dict, zero_stage), H, tmpdir,
                                        load_optimizer_states=False)


def case_hybrid_optimizer_state(tmpdir, zero_stage):
    config_dict = half_precision_section({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
                                          "steps_per_print": 1, "zero_optimization": {"stage": zero_stage},
                                          "zero_allow_untested_optimizer": True}, initial_scale_power=8)
    models = [SimpleModel(hidden_dim=H) for _ in range(2)]
    optimizers = [HybridStateOptimizer(model.parameters()) for model in models]
    checkpoint_correctness_verification(config_dict, models=models, base_optimizers=optimizers, hidden_dim=H,
                                        tmpdir=tmpdir, load_optimizer_states=True)


def case_load_module_only(tmpdir, zero_stage, model_cls=SimpleModel):
    # DeepSpeed skips stage 0 on its CPU accelerator; it runs here
    config_dict = half_precision_section({"train_batch_size": 2, "optimizer": {"type": "Adam"},
                                          "zero_optimization": {"stage": zero_stage}}, initial_scale_power=8)
    checkpoint_correctness_verification(config_dict, _zero_models(config_dict, zero_stage, model_cls), H, tmpdir,
                                        load_module_only=True)


LOAD_OPT = [(0, False, "Adam"), (1, False, "Adam"), (2, False, "Adam"), (2, True, "deepspeed_adam"),
            (3, False, "Adam"), (3, True, "deepspeed_adam")]
NOT_LOAD_OPT = LOAD_OPT[1:]
STAGES = [0, 1, 2, 3]
rank_case(__name__, "test_pipeline_checkpoint_loading[3]", case_pipeline_checkpoint_loading, zero_stage=3)
for _p in LOAD_OPT:
    rank_case(__name__, f"test_load_optimizer_state{list(_p)}", case_load_optimizer_state, zero_stage=_p[0],
              use_cpu_offload=_p[1], adam_optimizer=_p[2])
for _p in NOT_LOAD_OPT:
    rank_case(__name__, f"test_not_load_optimizer_state{list(_p)}", case_not_load_optimizer_state, zero_stage=_p[0],
              use_cpu_offload=_p[1], adam_optimizer=_p[2])
for _s in (1, 2):
    rank_case(__name__, f"test_hybrid_optimizer_state[{_s}]", case_hybrid_optimizer_state, zero_stage=_s)
for _s in STAGES:
    rank_case(__name__, f"test_load_module_only[{_s}]", case_load_module_only, zero_stage=_s)


class TestZeROCheckpoint:
    def test_pipeline_checkpoint_loading(self, ranks2):
        expect(ranks2, __name__, "test_pipeline_checkpoint_loading[3]")

    @pytest.mark.parametrize("zero_stage, use_cpu_offload, adam_optimizer", LOAD_OPT)
    def test_load_optimizer_state(self, ranks2, zero_stage, use_cpu_offload, adam_optimizer):
        expect(ranks2, __name__, f"test_load_optimizer_state{[zero_stage, use_cpu_offload, adam_optimizer]}")

    @pytest.mark.parametrize("zero_stage, use_cpu_offload, adam_optimizer", NOT_LOAD_OPT)
    def test_not_load_optimizer_state(self, ranks2, zero_stage, use_cpu_offload, adam_optimizer):
        expect(ranks2, __name__, f"test_not_load_optimizer_state{[zero_stage, use_cpu_offload, adam_optimizer]}")

    @pytest.mark.parametrize("zero_stage", [1, 2])
    def test_hybrid_optimizer_state(self, ranks2, zero_stage):
        expect(ranks2, __name__, f"test_hybrid_optimizer_state[{zero_stage}]")

    @pytest.mark.parametrize("zero_stage", STAGES)
    def test_load_module_only(self, ranks2, zero_stage):
        expect(ranks2, __name__, f"test_load_module_only[{zero_stage}]")


# ---- TestZeROElasticCheckpoint ----------------------------------------------------------------------
def _train(model, samples):
    for batch in random_dataloader(model=model, total_samples=samples, hidden_dim=H, device=model.device):
        loss = model(batch[0], batch[1])
        model.backward(loss)
        model.step()


def case_elastic_checkpoint_fixed_dp(tmpdir, elastic_save, elastic_load, load_optim):
    config_dict = half_precision_section({"train_batch_size": 2, "optimizer": {"type": "Adam"}, "zero_optimization": {
        "stage": 2, "elastic_checkpoint": elastic_save}}, initial_scale_power=8)
    models = [SimpleModel(H) for _ in range(2)]
    model, _, _, _ = deepspeed.initialize(config=config_dict, model=models[0], model_parameters=models[0].parameters())
    _train(model, 8)
    opt_state_dict_file = os.path.join(tmpdir, f"opt-state-dict_rank{dist.get_rank()}")
    if load_optim:
        torch.save(model.optimizer.state_dict(), opt_state_dict_file)
    model.save_checkpoint(tmpdir)
    config_dict["zero_optimization"]["elastic_checkpoint"] = elastic_load
    model, _, _, _ = deepspeed.initialize(config=config_dict, model=models[1], model_parameters=models[1].parameters())
    model.load_checkpoint(tmpdir, load_optimizer_states=load_optim)
    if load_optim:
        saved_sd = torch.load(opt_state_dict_file, weights_only=False)
        compare_opt_state_dicts(model.optimizer.state_dict(), saved_sd, [])
    _train(model, 8)


ELASTIC = [(s, l, o) for o in (True, False) for l in (True, False) for s in (True, False)]
for _s, _l, _o in ELASTIC:
    rank_case(__name__, f"test_elastic_checkpoint_fixed_dp[{_s}-{_l}-{_o}]", case_elastic_checkpoint_fixed_dp,
              elastic_save=_s, elastic_load=_l, load_optim=_o)


def _ws4_model_checkpoint(rank, world, root):
    """DeepSpeed's ws4_model_checkpoint fixture: world 4, stage 2, 8 steps, saved per (elastic_save, load_optim)."""
    for elastic_save in (True, False):
        for load_optim in (True, False):
            config_dict = half_precision_section({"train_batch_size": 4, "optimizer": {"type": "Adam"},
                                                  "zero_optimization": {"stage": 2, "elastic_checkpoint": elastic_save}},
                                                 initial_scale_power=8)
            torch.manual_seed(1234)
            net = SimpleModel(H)
            model, _, _, _ = deepspeed.initialize(config=config_dict, model=net, model_parameters=net.parameters())
            _train(model, 8)
            model.save_checkpoint(os.path.join(root, f"{elastic_save}-{load_optim}"))


def _change_dp(rank, world, root):
    out = {}
    for elastic_save in (True, False):
        for elastic_load in (True, False):
            for load_optim in (True, False):
                config_dict = half_precision_section({"train_batch_size": 4, "optimizer": {"type": "Adam"},
                                                      "zero_optimization": {"stage": 2,
                                                                            "elastic_checkpoint": elastic_load}},
                                                     initial_scale_power=8)
                net = SimpleModel(H)
                model, _, _, _ = deepspeed.initialize(config=config_dict, model=net, model_parameters=net.parameters())
                # Deliberate difference: DeepSpeed raises ZeRORuntimeException loading optimizer state saved at
                # another data-parallel size; flexspeed reshards it (and the counters) and goes on training
                path, _ = model.load_checkpoint(os.path.join(root, f"{elastic_save}-{load_optim}"),
                                                load_optimizer_states=load_optim)
                assert path is not None and model.global_steps == 8  # 8 steps of 4 samples at world 4
                _train(model, 2)
                out[(elastic_save, elastic_load, load_optim)] = model.global_steps
    return out


@pytest.fixture(scope="module")
def change_dp_results(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ws4"))
    run_ranks(_ws4_model_checkpoint, 4, (root,), timeout=300)
    return run_ranks(_change_dp, 2, (root,), timeout=300)[0]


@pytest.mark.parametrize("elastic_save", [True, False])
@pytest.mark.parametrize("elastic_load", [True, False])
@pytest.mark.parametrize("load_optim", [True, False])
class TestZeROElasticCheckpoint:
    def test_elastic_checkpoint_fixed_dp(self, ranks2, elastic_save, elastic_load, load_optim):
        expect(ranks2, __name__, f"test_elastic_checkpoint_fixed_dp[{elastic_save}-{elastic_load}-{load_optim}]")

    @pytest.mark.slow
    def test_elastic_checkpoint_change_dp(self, change_dp_results, elastic_save, elastic_load, load_optim):
        assert change_dp_results[(elastic_save, elastic_load, load_optim)] == 9


# ---- TestZeROSaveLoadEdgeCase -----------------------------------------------------------------------
def _edge_config(zero_stage, **extra):
    config = {"train_batch_size": 4, "optimizer": {"type": "Adam"}, "zero_optimization": {"stage": zero_stage}}
    config.update(extra)
    return half_precision_section(config, initial_scale_power=8)


def case_immediate_save_load(tmpdir, zero_stage):
    ds_model = create_deepspeed_model(config_dict=_edge_config(zero_stage), model=SimpleModel(H), base_optimizer=None)
    ds_model.save_checkpoint(tmpdir)
    ds_model.load_checkpoint(tmpdir, load_optimizer_states=False, load_lr_scheduler_states=False,
                             load_module_only=False)


def case_load_immediate_save(tmpdir, zero_stage):
    config_dict = _edge_config(zero_stage)
    model = SimpleModel(H)
    ds_model = create_deepspeed_model(config_dict=config_dict, model=model, base_optimizer=None)
    _train(ds_model, 1)
    ds_model.empty_partition_cache()
    ds_model.save_checkpoint(tmpdir)
    ds_model = create_deepspeed_model(config_dict=config_dict, model=model, base_optimizer=None)
    ds_model.load_checkpoint(tmpdir, load_optimizer_states=False, load_lr_scheduler_states=False,
                             load_module_only=False)
    ds_model.save_checkpoint(tmpdir)


def case_save_before_accum_grad_is_done(tmpdir, zero_stage):
    config_dict = _edge_config(zero_stage, gradient_accumulation_steps=2, train_micro_batch_size_per_gpu=1)
    config_dict["zero_optimization"]["stage3_gather_fp16_weights_on_model_save"] = True
    ds_model = create_deepspeed_model(config_dict=config_dict, model=SimpleModel(H), base_optimizer=None)
    batch = next(iter(random_dataloader(model=ds_model, total_samples=2, hidden_dim=H, device=ds_model.device)))
    loss = ds_model(batch[0], batch[1])
    ds_model.backward(loss)
    ds_model.step()
    ds_model.empty_partition_cache()
    # one micro-step of two: save the 16-bit model before the accumulation is complete
    ds_model.save_16bit_model(tmpdir, "model.pt")
    ds_model.save_checkpoint(tmpdir)


EDGE = (("test_immediate_save_load", case_immediate_save_load), ("test_load_immediate_save", case_load_immediate_save),
        ("test_save_before_accum_grad_is_done", case_save_before_accum_grad_is_done))
for _name, _fn in EDGE:
    for _s in STAGES:
        rank_case(__name__, f"{_name}[{_s}]", _fn, zero_stage=_s)


class TestZeROSaveLoadEdgeCase:
    @pytest.mark.parametrize("zero_stage", STAGES)
    def test_immediate_save_load(self, ranks2, zero_stage):
        expect(ranks2, __name__, f"test_immediate_save_load[{zero_stage}]")

    @pytest.mark.parametrize("zero_stage", STAGES)
    def test_load_immediate_save(self, ranks2, zero_stage):
        expect(ranks2, __name__, f"test_load_immediate_save[{zero_stage}]")

    @pytest.mark.parametrize("zero_stage", STAGES)
    def test_save_before_accum_grad_is_done(self, ranks2, zero_stage):
        expect(ranks2, __name__, f"test_save_before_accum_grad_is_done[{zero_stage}]")


# ---- TestZeROCheckpointFrozenWeights ----------------------------------------------------------------
def case_frozen_load_optimizer_state(tmpdir, zero_stage):
    config_dict = half_precision_section({"train_batch_size": 2, "steps_per_print": 1, "optimizer": ADAM,
                                          "wall_clock_breakdown": True, "zero_optimization": {"stage": zero_stage}},
                                         initial_scale_power=8)
    checkpoint_correctness_verification(config_dict, _zero_models(config_dict, zero_stage, SimpleFrozenModel), H,
                                        tmpdir, load_optimizer_states=True)


def case_frozen_not_load_optimizer_state(tmpdir, zero_stage):
    config_dict = half_precision_section({"train_batch_size": 2, "steps_per_print": 1, "optimizer": ADAM,
                                          "zero_optimization": {"stage": zero_stage}})
    checkpoint_correctness_verification(config_dict, _zero_models(config_dict, zero_stage, SimpleFrozenModel), H,
                                        tmpdir, load_optimizer_states=False)


for _s in (1, 2, 3):
    rank_case(__name__, f"frozen.test_load_optimizer_state[{_s}]", case_frozen_load_optimizer_state, zero_stage=_s)
    rank_case(__name__, f"frozen.test_not_load_optimizer_state[{_s}]", case_frozen_not_load_optimizer_state,
              zero_stage=_s)
    rank_case(__name__, f"frozen.test_load_module_only[{_s}]", case_load_module_only, zero_stage=_s,
              model_cls=SimpleFrozenModel)


def _tag_bytes(folder):
    return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(folder) for f in fs)


@pytest.fixture
def _one_rank():
    yield
    destroy_group()


class TestZeROCheckpointFrozenWeights:
    @pytest.mark.parametrize("zero_stage", [1, 2, 3])
    def test_load_optimizer_state(self, ranks2, zero_stage):
        expect(ranks2, __name__, f"frozen.test_load_optimizer_state[{zero_stage}]")

    @pytest.mark.parametrize("zero_stage", [1, 2, 3])
    def test_not_load_optimizer_state(self, ranks2, zero_stage):
        expect(ranks2, __name__, f"frozen.test_not_load_optimizer_state[{zero_stage}]")

    @pytest.mark.parametrize("zero_stage", [1, 2, 3])
    def test_load_module_only(self, ranks2, zero_stage):
        expect(ranks2, __name__, f"frozen.test_load_module_only[{zero_stage}]")

    @pytest.mark.parametrize("zero_stage", [1, 2])
    def test_save_exclude_frozen_weights(self, _one_rank, tmpdir, zero_stage):
        config_dict = half_precision_section({"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "Adam"},
                                              "zero_optimization": {"stage": zero_stage}}, initial_scale_power=8)
        model = SimpleFrozenModel(H, empty_grad=False)
        ds_engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config_dict)
        # backwards compatibility: frozen parameters are saved by default
        all_ckpt_folder = os.path.join(tmpdir, "all_params")
        ds_engine.save_checkpoint(all_ckpt_folder)
        loaded_all_param_model = get_fp32_state_dict_from_zero_checkpoint(all_ckpt_folder, tag="global_step0")
        all_param_names = set(n for n, p in model.named_parameters())
        assert set(loaded_all_param_model.keys()) == all_param_names
        # exclusion of frozen parameters
        trainable_ckpt_folder = os.path.join(tmpdir, "no_frozen_params")
        ds_engine.save_checkpoint(trainable_ckpt_folder, exclude_frozen_parameters=True)
        # excluding frozen parameters should reduce checkpoint size
        assert _tag_bytes(os.path.join(all_ckpt_folder, "global_step0")) > \
            _tag_bytes(os.path.join(trainable_ckpt_folder, "global_step0"))
        loaded_trainable_param_model = get_fp32_state_dict_from_zero_checkpoint(trainable_ckpt_folder,
                                                                                tag="global_step0",
                                                                                exclude_frozen_parameters=True)
        frozen_param_names = set(n for n, p in model.named_parameters() if not p.requires_grad)
        loaded_trainable_param_names = set(loaded_trainable_param_model.keys())
        assert len(loaded_trainable_param_names & frozen_param_names) == 0
        trainable_param_names = set(n for n, p in model.named_parameters() if p.requires_grad)
        assert loaded_trainable_param_names == trainable_param_names

    @pytest.mark.parametrize("zero_stage", [1, 2])
    def test_save_exclude_custom_frozen_weights(self, _one_rank, tmpdir, zero_stage):
        config_dict = half_precision_section({"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "Adam"},
                                              "zero_optimization": {"stage": zero_stage}}, initial_scale_power=8)
        model = SimpleFrozenModel(H, empty_grad=False)
        ds_engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config_dict)
        state_dict_bk = model.state_dict
        model.state_dict = model.custom_state_dict
        try:
            folder = os.path.join(tmpdir, "custom_state_dict")
            ds_engine.save_checkpoint(folder, exclude_frozen_parameters=True)
            loaded = get_fp32_state_dict_from_zero_checkpoint(folder, tag="global_step0",
                                                              exclude_frozen_parameters=True)
            custom_state_dict_param_names = set(model.state_dict().keys())
            trainable_param_names = set(n for n, p in model.named_parameters() if p.requires_grad)
            assert set(loaded.keys()) == custom_state_dict_param_names & trainable_param_names
        finally:
            model.state_dict = state_dict_bk


# ---- one-rank cases ---------------------------------------------------------------------------------
@pytest.mark.parametrize("zero_stage", [1, 2])
@pytest.mark.parametrize("use_cpu_device", [True, False])
def test_save_tensor_clone(_one_rank, tmpdir, zero_stage, use_cpu_device):
    from flexspeed.checkpoint.utils import clone_tensors_for_torch_save

    config_dict = {"optimizer": {"type": "AdamW"}, "zero_optimization": {"stage": zero_stage}, "train_batch_size": 1,
                   "train_micro_batch_size_per_gpu": 1}
    model = SimpleModel(1024, nlayers=4).half()
    ref_model_state_dict = model.state_dict()
    ds_engine, _, _, _ = deepspeed.initialize(model=model, config_params=config_dict)
    clone_device = torch.device("cpu") if use_cpu_device else ds_engine.device  # unused, as in DeepSpeed
    clone_state_dict = clone_tensors_for_torch_save(ds_engine.module.state_dict())
    compare_state_dicts(ref_model_state_dict, clone_state_dict)

    ref_ckpt_file = os.path.join(tmpdir, "ref_ckpt.pt")
    torch.save(ref_model_state_dict, ref_ckpt_file)
    clone_ckpt_file = os.path.join(tmpdir, "clone_ckpt.pt")
    torch.save(clone_state_dict, clone_ckpt_file)
    compare_state_dicts(torch.load(ref_ckpt_file), torch.load(clone_ckpt_file))


def test_elastic_checkpoint_is_deprecated_for_zero3():
    # Deliberate difference: flexspeed checkpoints are always elastic (resharded on load); the key is
    # accepted at every stage without DeepSpeed's deprecation warning
    assert DeepSpeedConfig({"train_batch_size": 1, "zero_optimization": {"stage": 3, "elastic_checkpoint": True}})


def test_load_zeropp_config_refused():
    """TestZeROPPLoadCheckpoint (both cases): ZeRO++'s hierarchical partitioning is refused (deliberate)."""
    with pytest.raises(DeepSpeedConfigError, match=r"zero_hpz_partition_size"):
        DeepSpeedConfig({"train_batch_size": 1, "optimizer": {"type": "Adam"},
                         "zero_optimization": {"stage": 3, "zero_hpz_partition_size": 2}})
