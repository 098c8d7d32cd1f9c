"""Tensor-parallel training: the config section, plan derivation and every bad input (no process group)."""

from __future__ import annotations

import pytest
import torch

from flexspeed.config import validate_config
from flexspeed.config.errors import ConfigError
from flexspeed.distributed.tensor_parallel import (
    PackedColwise,
    build_dp_tp_mesh,
    derive_tp_plan,
    resolve_tp,
    tp_model_init,
    validate_tp_plan,
)
from flexspeed.models import GPT, GPTConfig

transformers = pytest.importorskip("transformers")


def gpt(**over) -> GPT:
    return GPT(GPTConfig(**{"vocab_size": 64, "block_size": 16, "n_layer": 2, "n_head": 4, "n_embd": 32, **over}))


def llama(kv: int = 2, inter: int = 64, heads: int = 4) -> torch.nn.Module:
    cfg = transformers.LlamaConfig(hidden_size=32, num_attention_heads=heads, num_key_value_heads=kv,
                                   intermediate_size=inter, num_hidden_layers=2, vocab_size=64)
    return transformers.LlamaForCausalLM(cfg)


def gpt2() -> torch.nn.Module:
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64,
                                                                n_positions=32))


def opt() -> torch.nn.Module:
    cfg = transformers.OPTConfig(hidden_size=32, num_attention_heads=4, num_hidden_layers=2, ffn_dim=64,
                                 vocab_size=64, max_position_embeddings=32, word_embed_proj_dim=32)
    return transformers.OPTForCausalLM(cfg)


def _styles(plan) -> dict[str, str]:
    return {name.rsplit(".", 1)[-1]: type(style).__name__ for name, style in plan.styles.items()}


def test_plans_derived_per_family():
    assert _styles(derive_tp_plan(gpt(), 2)) == {"c_attn": "PackedColwise", "c_fc": "_ColwiseAny",
                                                  "c_proj": "_RowwiseAny"}
    assert _styles(derive_tp_plan(gpt2(), 2)) == {"c_attn": "PackedColwise", "c_fc": "_ColwiseAny",
                                                   "c_proj": "_RowwiseAny"}
    lp = derive_tp_plan(llama(), 2)
    assert _styles(lp) == {**dict.fromkeys(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"), "_ColwiseAny"),
                           **dict.fromkeys(("o_proj", "down_proj"), "_RowwiseAny")}
    assert len(lp.styles) == 14 and not any("embed" in n or "lm_head" in n for n in lp.styles)
    assert "2/1 (kv) heads per rank" in lp.describe()
    op = derive_tp_plan(opt(), 2)
    assert set(_styles(op)) == {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    packed = derive_tp_plan(gpt(), 2).styles["transformer.h.0.attn.c_attn"]
    assert isinstance(packed, PackedColwise) and packed.pieces == (32, 32, 32)


@pytest.mark.parametrize("make,tp,pattern", [
    (lambda: gpt(n_head=3, n_embd=48), 2,
     r"\[tensor_parallel.autotp_size\] autotp_size=2 must divide the 3 attention heads of transformer.h.0.attn "
     r"\(CausalSelfAttention\); use one of \[1, 3\]"),
    (lambda: llama(kv=1), 2, r"4 attention heads and 1 key/value heads of model.layers.0.self_attn.*\[1\]"),
    (lambda: llama(kv=4, inter=66), 4, r"autotp_size=4 does not divide the width 66 of model.layers.0.mlp.gate_proj"),
    (lambda: torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)), 2,
     r"found no Linear layers to split.*plan=\{'module.name': 'colwise' \| 'rowwise'\}"),
])
def test_unplannable_models_name_module_numbers_and_fix(make, tp, pattern):
    model = make()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=pattern):
        derive_tp_plan(model, tp)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # nothing applied


def test_user_plan():
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    plan = validate_tp_plan(model, {"0": "colwise", "2": "rowwise"}, 2)
    assert _styles(plan) == {"0": "_ColwiseAny", "2": "_RowwiseAny"}
    fused = validate_tp_plan(gpt(), {"transformer.h.0.attn.c_attn": "colwise", "transformer.h.0.attn.c_proj": "rowwise"}, 2)
    assert fused.styles["transformer.h.0.attn.c_attn"].pieces == (32, 32, 32)  # not a contiguous q|k mix
    assert fused.layout.attention["transformer.h.0.attn"].attrs == {"n_head": 2, "n_embd": 16}
    with pytest.raises(ConfigError, match=r"\[plan\['3'\]\].*not a submodule of Sequential"):
        validate_tp_plan(model, {"3": "colwise"}, 2)
    with pytest.raises(ConfigError, match=r"\[plan\['1'\]\].*\(ReLU\) the style 'colwise'"):
        validate_tp_plan(model, {"1": "colwise"}, 2)
    with pytest.raises(ConfigError, match=r"'diagonal'"):
        validate_tp_plan(model, {"0": "diagonal"}, 2)
    with pytest.raises(ConfigError, match=r"0 \(Linear\) has 16 output features, which autotp_size=3 does not divide"):
        validate_tp_plan(model, {"0": "colwise"}, 3)


def test_config_section_accepts_deepspeed_keys_and_refuses_unimplemented():
    cfg = validate_config({"train_batch_size": 4, "tensor_parallel": {
        "autotp_size": 2, "dtype": "bfloat16", "tp_overlap_comm": False, "vocab_parallel_lm_head": None,
        "vocab_parallel_ce_backend": "torch", "tp": {"tp_size": 2, "tp_grain_size": 1}, "preset_model": None,
        "partition_config": None, "keep_module_on_host": False, "kernel_inject": False}})
    assert cfg.tensor_parallel.size == 2 and cfg.tensor_parallel.dtype == "bf16"
    assert validate_config({"train_batch_size": 4}).tensor_parallel.size == 1
    for key, value in [("tp_overlap_comm", True), ("vocab_parallel_lm_head", True),
                       ("vocab_parallel_ce_backend", "liger"), ("preset_model", "llama"),
                       ("partition_config", {"layer_specs": []}), ("keep_module_on_host", True),
                       ("replace_with_kernel_inject", True)]:
        with pytest.raises(ConfigError, match=rf"\[tensor_parallel.{key}\].*not supported.*Fix"):
            validate_config({"train_batch_size": 4, "tensor_parallel": {"autotp_size": 2, key: value}})
    with pytest.raises(ConfigError, match=r"tensor_parallel.tp.tp_size"):
        validate_config({"train_batch_size": 4, "tensor_parallel": {"autotp_size": 2, "tp": {"tp_size": 4}}})
    with pytest.raises(ConfigError, match=r"tensor_parallel.dtype"):
        validate_config({"train_batch_size": 4, "tensor_parallel": {"dtype": "int8"}})
    with pytest.raises(ConfigError, match=r"tensor_parallel.autotp_siz"):
        validate_config({"train_batch_size": 4, "tensor_parallel": {"autotp_siz": 2}})


def test_degree_must_divide_world_and_sources_must_agree():
    model = gpt()
    assert resolve_tp({}, model, 4) == (1, None, None)
    assert resolve_tp({"tensor_parallel": {"autotp_size": 2}}, model, 4)[0] == 2
    with pytest.raises(ConfigError, match=r"autotp_size=3 does not divide the world size 4.*\[1, 2, 4\]"):
        resolve_tp({"tensor_parallel": {"autotp_size": 3}}, model, 4)
    with pytest.raises(ConfigError, match=r"autotp_size=3 does not divide the world size 4"):
        build_dp_tp_mesh(4, 3, "cpu")
    tp_model_init(model, 2, torch.bfloat16)
    assert resolve_tp({}, model, 4) == (2, None, "bf16")  # from tp_model_init alone: flexspeed builds the group
    with pytest.raises(ConfigError, match=r"autotp_size=4 in the config differs from tp_model_init\(tp_size=2\)"):
        resolve_tp({"tensor_parallel": {"autotp_size": 4}}, model, 4)
    with pytest.raises(ConfigError, match=r"tensor_parallel.dtype='fp16' differs"):
        resolve_tp({"tensor_parallel": {"autotp_size": 2, "dtype": "fp16"}}, model, 4)
    with pytest.raises(ConfigError, match=r"tp_group"):
        tp_model_init(gpt(), 2, torch.float32, tp_group=object())
    with pytest.raises(ConfigError, match=r"autotp_size=4 in the config differs"):
        tp_model_init(gpt(), 2, torch.float32, config={"train_batch_size": 4, "tensor_parallel": {"autotp_size": 4}})
    import flexspeed

    assert flexspeed.tp_model_init is tp_model_init


def test_check_config_counts_the_triad_over_data_parallel_ranks(tmp_path, capsys):
    import json

    from flexspeed.cli.main import main

    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
                                "tensor_parallel": {"autotp_size": 2}}))
    assert main(["check-config", str(path), "--world-size", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["train_batch_size"] == 2 * 2 * 4  # dp = 8 / 2
    assert main(["check-config", str(path), "--world-size", "3", "--json"]) == 1
    assert "autotp_size=2 does not divide the world size 3" in json.loads(capsys.readouterr().out)["error"]


def test_inference_and_training_tp_share_one_discovery_through_public_names():
    import ast
    import inspect

    import flexspeed.distributed.tensor_parallel as training
    import flexspeed.distributed.tp_discovery as discovery
    import flexspeed.inference.tp as inference
    import flexspeed.pipe.engine as pipe_engine
    import flexspeed.pipe.stage_tp as stage_tp

    assert inference.plan_tensor_parallel is discovery.plan_tensor_parallel is training.plan_tensor_parallel
    assert inference.localize_attention is training.localize_attention
    for module in (training, inference, stage_tp, pipe_engine):
        for node in ast.walk(ast.parse(inspect.getsource(module))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("flexspeed"):
                private = [a.name for a in node.names if a.name.startswith("_")]
                assert not private, f"{module.__name__} imports {private} from {node.module}"
