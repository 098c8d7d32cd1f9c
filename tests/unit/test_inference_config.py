"""init_inference config: parsing, aliases, recursive conflicts, errors; the engine at tp_size 1."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

import flexspeed
from flexspeed.config.errors import ConfigError
from flexspeed.inference.config import InferenceConfig, canonical_dtype, resolve_inference_config, training_keys
from flexspeed.models.gpt import GPT


def small_gpt(**kw) -> GPT:
    torch.manual_seed(0)
    return GPT(**{"n_layer": 2, "n_embd": 32, "n_head": 4, "vocab_size": 64, "block_size": 32, **kw}).eval()


# ------------------------------------------------------------------------------------ parsing

def test_defaults_and_every_field_documented():
    cfg = resolve_inference_config()
    assert cfg.dtype is None and cfg.tp_size == 1 and not cfg.replace_with_kernel_inject
    assert cfg.max_out_tokens == 1024 and cfg.return_tuple and cfg.replace_method == "auto"
    for section in (InferenceConfig, type(cfg.tensor_parallel), type(cfg.quant), type(cfg.quant.weight)):
        for name, f in section.model_fields.items():
            assert f.description, f"{section.__name__}.{name} has no one-line doc"


@pytest.mark.parametrize("value,expected", [
    (torch.float32, "fp32"), ("float32", "fp32"), ("fp32", "fp32"), (torch.float16, "fp16"), ("half", "fp16"),
    ("fp16", "fp16"), (torch.bfloat16, "bf16"), ("bfloat16", "bf16"), ("BF16", "bf16"), (torch.int8, "int8"),
    ("int8", "int8"),
])
def test_dtype_spellings(value, expected):
    assert canonical_dtype(value) == expected
    assert resolve_inference_config(dtype=value).dtype == expected


def test_dtype_int8_means_8bit_weights():
    cfg = resolve_inference_config(dtype=torch.int8)
    assert cfg.quantize_bits == 8 and cfg.compute_dtype is None
    assert resolve_inference_config(dtype="bf16").compute_dtype is torch.bfloat16
    assert resolve_inference_config(quant={"enabled": True, "weight": {"num_bits": 4}}).quantize_bits == 4


def test_bad_dtype_names_key_and_suggests():
    with pytest.raises(ConfigError, match=r"\[dtype\].*'bf61'.*Did you mean"):
        resolve_inference_config(dtype="bf61")


def test_dict_and_json_path(tmp_path):
    data = {"dtype": "fp16", "tensor_parallel": {"tp_size": 1}, "replace_with_kernel_inject": False}
    path = tmp_path / "inf.json"
    path.write_text(json.dumps(data))
    assert resolve_inference_config(data) == resolve_inference_config(str(path)) == resolve_inference_config(path)


def test_kwargs_add_to_config():
    cfg = resolve_inference_config({"dtype": "bf16"}, tensor_parallel={"tp_size": 1}, max_out_tokens=64)
    assert (cfg.dtype, cfg.max_out_tokens) == ("bf16", 64)


def test_missing_and_invalid_json(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_inference_config(str(tmp_path / "nope.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        resolve_inference_config(str(bad))


def test_inference_configs_go_through_the_training_loader(tmp_path):
    """Duplicate keys, HJSON, base64 and malformed files: the same error text as flexspeed.initialize()."""
    import base64

    from flexspeed.config.loader import load_config

    dup = tmp_path / "dup.json"
    dup.write_text('{"dtype": "fp16",\n "dtype": "bf16"}')
    with pytest.raises(ConfigError) as inf:
        resolve_inference_config(str(dup))
    with pytest.raises(ConfigError) as train:
        load_config(config=str(dup))
    assert str(inf.value) == str(train.value) and inf.value.key == "dtype"
    assert "twice" in str(inf.value) and "line 2 column 2" in str(inf.value)
    hjson_file = tmp_path / "inf.hjson"
    hjson_file.write_text("{\n  # comments are HJSON\n  dtype: fp16\n  tensor_parallel: {tp_size: 1}\n}")
    assert resolve_inference_config(str(hjson_file)).dtype == "fp16"
    encoded = base64.b64encode(json.dumps({"dtype": "bf16", "max_tokens": 64}).encode()).decode()
    cfg = resolve_inference_config(encoded)
    assert (cfg.dtype, cfg.max_out_tokens) == ("bf16", 64)
    with pytest.raises(ConfigError, match="init_inference"):
        resolve_inference_config(42)


# ------------------------------------------------------------------------------------ conflicts

def test_top_level_conflict_names_both_values():
    with pytest.raises(ConfigError) as e:
        resolve_inference_config({"dtype": "fp16"}, dtype="bf16")
    # the training loader's merge message: both values (as JSON) and both sources
    assert e.value.key == "dtype" and '"fp16" in config' in str(e.value) and '"bf16" in keyword arguments' in str(e.value)


def test_equal_values_in_both_are_fine():
    cfg = resolve_inference_config({"dtype": "half", "tensor_parallel": {"tp_size": 1}},
                                   dtype=torch.float16, tensor_parallel={"tp_size": 1, "enabled": True})
    assert cfg.dtype == "fp16"


def test_nested_conflict_names_full_path():
    with pytest.raises(ConfigError) as e:
        resolve_inference_config({"tensor_parallel": {"tp_size": 2}}, tensor_parallel={"tp_size": 1})
    assert e.value.key == "tensor_parallel.tp_size" and "2" in str(e.value) and "1" in str(e.value)


def test_deeply_nested_conflict():
    with pytest.raises(ConfigError) as e:
        resolve_inference_config({"quant": {"weight": {"num_bits": 8}}}, quant={"weight": {"num_bits": 4}})
    assert e.value.key == "quant.weight.num_bits"


def test_alias_conflicts_across_sources():
    with pytest.raises(ConfigError, match=r"\[replace_with_kernel_inject\]"):
        resolve_inference_config({"kernel_inject": True}, replace_with_kernel_inject=False)
    with pytest.raises(ConfigError, match=r"\[tensor_parallel.tp_size\]"):
        resolve_inference_config({"tp": {"tp_size": 2}}, tensor_parallel={"tp_size": 1})


# ------------------------------------------------------------------------------------ aliases

def test_aliases():
    cfg = resolve_inference_config(kernel_inject=True, tp={"tp_size": 1}, max_tokens=99, min_tokens=3)
    assert cfg.replace_with_kernel_inject and cfg.max_out_tokens == 99 and cfg.min_out_tokens == 3


def test_mp_size_is_deprecated_alias_of_tp_size():
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        import flexspeed.inference.config as c

        c._warned.discard("mp_size")
        cfg = resolve_inference_config({"mp_size": 2})
    assert cfg.tensor_parallel.tp_size == 2
    assert any("mp_size" in str(x.message) for x in w)
    assert resolve_inference_config(mp_size=2, tensor_parallel={"tp_size": 2}).tp_size == 2
    with pytest.raises(ConfigError, match=r"tensor_parallel.tp_size.*mp_size"):
        resolve_inference_config({"mp_size": 2, "tensor_parallel": {"tp_size": 4}})
    with pytest.raises(ConfigError, match=r"\[tensor_parallel.tp_size\]"):
        resolve_inference_config({"mp_size": 2}, tensor_parallel={"tp_size": 1})


def test_tp_config_object_and_disabled():
    from flexspeed.inference import DeepSpeedTPConfig

    cfg = resolve_inference_config(tensor_parallel=DeepSpeedTPConfig(tp_size=2, enabled=False))
    assert cfg.tensor_parallel.tp_size == 2 and cfg.tp_size == 1


def test_injection_policy_normalised():
    class Blk(torch.nn.Module):
        pass

    cfg = resolve_inference_config(injection_policy={Blk: ["attn.c_proj", "mlp.c_proj"], "Other": "o_proj"})
    assert cfg.injection_policy == {Blk: ("attn.c_proj", "mlp.c_proj"), "Other": ("o_proj",)}
    with pytest.raises(ConfigError, match=r"\[injection_policy\]"):
        resolve_inference_config(injection_policy={Blk: 3})
    assert resolve_inference_config(injection_dict={"Other": ("x",)}).injection_policy == {"Other": ("x",)}


# ------------------------------------------------------------------------------------ errors

def test_unknown_key_suggests():
    with pytest.raises(ConfigError, match=r"\[dtpye\].*Did you mean 'dtype'"):
        resolve_inference_config(dtpye="fp16")
    with pytest.raises(ConfigError, match=r"\[tensor_parallel.tp_sise\].*Did you mean 'tp_size'"):
        resolve_inference_config(tensor_parallel={"tp_sise": 2})
    with pytest.raises(ConfigError, match=r"\[quant.weight.bits\]"):
        resolve_inference_config(quant={"weight": {"bits": 4}})


@pytest.mark.parametrize("key,value", [("train_batch_size", 8), ("optimizer", {"type": "Adam"}),
                                       ("zero_optimization", {"stage": 3}), ("fp16", {"enabled": True}),
                                       ("gradient_accumulation_steps", 2), ("scheduler", {})])
def test_training_keys_point_to_initialize(key, value):
    assert key in training_keys()
    with pytest.raises(ConfigError, match=r"flexspeed.initialize\(\)") as e:
        resolve_inference_config({key: value})
    assert e.value.key == key


def test_unsupported_and_ignored_deepspeed_keys():
    with pytest.raises(ConfigError, match=r"\[moe\].*not supported"):
        resolve_inference_config(moe={"enabled": True})
    with pytest.warns(UserWarning, match="triangular_masking"):
        import flexspeed.inference.config as c

        c._warned.discard("triangular_masking")
        resolve_inference_config(triangular_masking=True)


def test_strict_types_name_key():
    with pytest.raises(ConfigError) as e:
        resolve_inference_config(tensor_parallel={"tp_size": "2"})
    assert e.value.key == "tensor_parallel.tp_size" and "'2'" in str(e.value)
    with pytest.raises(ConfigError, match=r"\[tensor_parallel.tp_size\]"):
        resolve_inference_config(tensor_parallel={"tp_size": 0})
    with pytest.raises(ConfigError, match=r"\[quant.weight.num_bits\]"):
        resolve_inference_config(quant={"weight": {"num_bits": 3}})
    with pytest.raises(ConfigError, match=r"\[replace_method\]"):
        resolve_inference_config(replace_method="manual")


def test_use_triton_and_token_bounds():
    with pytest.raises(ConfigError, match=r"\[use_triton\].*not supported"):
        resolve_inference_config(use_triton=True)
    with pytest.raises(ConfigError, match=r"\[min_out_tokens\]"):
        resolve_inference_config(max_out_tokens=8, min_out_tokens=9)
    with pytest.raises(ConfigError, match=r"\[quant.weight.num_bits\]"):
        resolve_inference_config(dtype="int8", quant={"enabled": True, "weight": {"num_bits": 4}})


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cuda_graph_on_cpu_is_an_error():
    with pytest.raises(ConfigError, match=r"\[enable_cuda_graph\].*CUDA"):
        resolve_inference_config(enable_cuda_graph=True)


def test_config_is_frozen():
    cfg = resolve_inference_config()
    with pytest.raises(Exception):
        cfg.dtype = "fp16"


# ------------------------------------------------------------------------------------ engine, tp_size 1

def test_engine_matches_model_and_exposes_deepspeed_names():
    model = small_gpt()
    x = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        want = model(x)
        engine = flexspeed.init_inference(model, {"dtype": "fp32"})
        got = engine(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert engine.module is model and engine.tp_size == engine.mp_world_size == 1
    assert engine.dtype is torch.float32 and engine.config.dtype == "fp32"
    assert not any(p.requires_grad for p in model.parameters())
    assert torch.equal(engine.forward(x), got)


def test_engine_casts_dtype():
    engine = flexspeed.init_inference(small_gpt(), dtype=torch.bfloat16)
    assert engine.dtype is torch.bfloat16
    assert all(p.dtype is torch.bfloat16 for p in engine.module.parameters())
    assert engine(torch.randint(0, 64, (1, 4))).dtype is torch.bfloat16


def test_tp_without_launcher_says_how(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    if torch.distributed.is_initialized():
        pytest.skip("a process group already exists")
    with pytest.raises(ConfigError, match=r"\[tensor_parallel.tp_size\].*torchrun --nproc_per_node 2"):
        flexspeed.init_inference(small_gpt(), tensor_parallel={"tp_size": 2})


def test_meta_model_without_checkpoint():
    with torch.device("meta"):
        model = GPT(n_layer=1, n_embd=32, n_head=4, vocab_size=64, block_size=32)
    with pytest.raises(ConfigError, match=r"\[checkpoint\].*meta"):
        flexspeed.init_inference(model)


def test_model_must_be_module():
    with pytest.raises(ConfigError, match=r"\[model\]"):
        flexspeed.init_inference(lambda x: x)


def test_generate_respects_max_out_tokens():
    engine = flexspeed.init_inference(small_gpt(), max_out_tokens=16)
    with pytest.raises(ConfigError, match=r"\[max_out_tokens\].*12 \+|\[max_out_tokens\]"):
        engine.generate(torch.zeros(1, 12, dtype=torch.long), max_new_tokens=8)


def test_generate_delegates():
    pytest.importorskip("flexspeed.inference.generation")
    engine = flexspeed.init_inference(small_gpt())
    out = engine.generate(torch.zeros(2, 4, dtype=torch.long), max_new_tokens=3)
    assert out.shape == (2, 7)


def test_int8_quantizes_after_loading():
    pytest.importorskip("flexspeed.inference.quant")
    model = small_gpt()
    x = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        want = model(x)
        engine = flexspeed.init_inference(model, dtype="int8")
        got = engine(x)
    assert type(engine.module.transformer.h[0].mlp.c_fc) is not torch.nn.Linear  # replaced by a low-bit module
    torch.testing.assert_close(got, want, rtol=0.1, atol=0.1)
