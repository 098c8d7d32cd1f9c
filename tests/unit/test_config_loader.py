"""Config sources (path, dict, base64, HJSON), duplicate keys, and merging with conflict detection."""

from __future__ import annotations

import argparse
import base64
import json

import pytest

from flexspeed.config import ConfigError, add_config_arguments, build_config, load_config
from flexspeed.config.loader import merge_sources, parse_config_text

BASE = {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 1}}


def write(tmp_path, text: str, name: str = "ds_config.json") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_path_dict_and_pathlike(tmp_path):
    path = write(tmp_path, json.dumps(BASE))
    assert load_config(config=path) == BASE
    assert load_config(config=tmp_path / "ds_config.json") == BASE
    assert load_config(config=BASE) == BASE
    assert load_config(config_params=BASE) == BASE


def test_missing_path_named(tmp_path):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(ConfigError) as info:
        load_config(config=missing)
    assert missing in str(info.value) and "does not exist" in str(info.value)


def test_directory_is_not_a_config(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(config=str(tmp_path))


def test_base64_standard_and_urlsafe():
    text = json.dumps({**BASE, "optimizer": {"type": "AdamW", "params": {"lr": 0.5}}})
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        encoded = encode(text.encode()).decode()
        assert load_config(config=encoded)["optimizer"]["params"]["lr"] == 0.5
    unpadded = base64.b64encode(text.encode()).decode().rstrip("=")
    assert load_config(config=unpadded) == json.loads(text)


def test_base64_of_bad_json_reports_base64():
    encoded = base64.b64encode(b'{"a": 1,, }').decode()
    with pytest.raises(ConfigError, match=r"base64.*line 1 column"):
        load_config(config=encoded)


def test_malformed_json_line_and_column(tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "hjson", None)  # hjson not importable
    path = write(tmp_path, '{\n  "train_batch_size": 8,\n  "fp16": {"enabled": tru}\n}')
    with pytest.raises(ConfigError) as info:
        load_config(config=path)
    assert "line 3 column" in str(info.value) and path in str(info.value)
    assert "hjson" in str(info.value)


def test_hjson_accepted(tmp_path):
    pytest.importorskip("hjson")
    path = write(tmp_path, """{
      # HJSON: comments, unquoted keys and strings, no commas
      train_micro_batch_size_per_gpu: 4
      optimizer: {
        type: AdamW
        params: {lr: 0.001}
      }
      zero_optimization: {stage: 2}
    }""", "ds.hjson")
    cfg = build_config(path, world_size=2, world_size_source="test")
    assert cfg.train_batch_size == 8 and cfg.optimizer.type == "AdamW" and cfg.zero_optimization.stage == 2


def test_invalid_json_and_hjson(tmp_path):
    pytest.importorskip("hjson")
    path = write(tmp_path, '{"a": [1, 2}')
    with pytest.raises(ConfigError, match="not valid JSON.*line 1 column.*not valid HJSON"):
        load_config(config=path)


def test_duplicate_key_top_level_line_col(tmp_path):
    path = write(tmp_path, '{\n  "train_batch_size": 8,\n  "train_batch_size": 16\n}')
    with pytest.raises(ConfigError) as info:
        load_config(config=path)
    e = info.value
    assert e.key == "train_batch_size"
    assert "line 3 column 3" in str(e) and "twice" in str(e)


def test_duplicate_key_nested_path():
    text = '{"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "device": "none"}}}'
    with pytest.raises(ConfigError) as info:
        parse_config_text(text)
    assert info.value.key == "zero_optimization.offload_optimizer.device"
    assert "line 1 column" in str(info.value)


def test_same_key_in_sibling_objects_is_fine():
    text = '{"fp16": {"enabled": false}, "bf16": {"enabled": true}, "x": [{"a": 1}, {"a": 2}]}'
    assert parse_config_text(text)["x"][1]["a"] == 2


def test_duplicate_inside_list_item():
    text = '{"x": [{"a": 1}, {"a": 2, "b": {"c": 1, "c": 2}}]}'
    with pytest.raises(ConfigError) as info:
        parse_config_text(text)
    assert info.value.key == "x[1].b.c"


def test_duplicate_key_hjson(tmp_path):
    pytest.importorskip("hjson")
    path = write(tmp_path, "{\n a: 1\n a: 2\n}")
    with pytest.raises(ConfigError, match="twice"):
        load_config(config=path)


def test_top_level_must_be_object(tmp_path):
    with pytest.raises(ConfigError, match="JSON object"):
        load_config(config=write(tmp_path, "[1, 2]"))


def test_no_config_says_how():
    with pytest.raises(ConfigError) as info:
        load_config()
    assert "--deepspeed_config" in str(info.value) and "config=" in str(info.value)


def test_wrong_source_type():
    with pytest.raises(ConfigError, match="must be a path, a dict"):
        load_config(config=42)  # type: ignore[arg-type]


def test_merge_identical_is_fine(tmp_path):
    path = write(tmp_path, json.dumps(BASE))
    args = argparse.Namespace(deepspeed_config=path)
    merged = load_config(config=BASE, config_params={"zero_optimization": {"stage": 1, "overlap_comm": True}}, args=args)
    assert merged == {"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": 1, "overlap_comm": True}}


def test_merge_conflict_names_key_values_and_sources(tmp_path):
    path = write(tmp_path, json.dumps(BASE))
    args = argparse.Namespace(deepspeed_config=path)
    with pytest.raises(ConfigError) as info:
        load_config(config={"zero_optimization": {"stage": 3}}, args=args)
    msg = str(info.value)
    assert info.value.key == "zero_optimization.stage"
    assert "3 in config (dict)" in msg and "1 in --deepspeed_config" in msg and path in msg


def test_merge_conflict_bool_vs_int():
    with pytest.raises(ConfigError, match="different values"):
        merge_sources([("a", {"x": True}), ("b", {"x": 1})])
    assert merge_sources([("a", {"x": 1}), ("b", {"x": 1.0})]) == {"x": 1}


def test_merge_dict_vs_scalar_conflict():
    with pytest.raises(ConfigError) as info:
        merge_sources([("a", {"fp16": {"enabled": True}}), ("b", {"fp16": True})])
    assert info.value.key == "fp16"


def test_merge_aliases_across_sources():
    with pytest.raises(ConfigError) as info:
        load_config(config={"bf16": {"enabled": True}}, config_params={"bfloat16": {"enabled": False}})
    assert info.value.key == "bf16.enabled" and "config_params" in str(info.value)


def test_merge_does_not_mutate_sources():
    a, b = {"z": {"s": 1}}, {"z": {"t": 2}}
    merge_sources([("a", a), ("b", b)])
    assert a == {"z": {"s": 1}} and b == {"z": {"t": 2}}


def test_args_deepspeed_and_deepscale_config(tmp_path):
    path = write(tmp_path, json.dumps(BASE))
    parser = add_config_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--deepspeed", "--deepspeed_config", path])
    assert args.deepspeed is True and load_config(args=args) == BASE
    legacy = parser.parse_args(["--deepscale", "--deepscale_config", path])
    assert legacy.deepscale is True and load_config(args=legacy) == BASE
    assert "--deepscale" not in parser.format_help()
    assert "--deepspeed_config" in parser.format_help()


def test_args_missing_path_is_named(tmp_path):
    args = argparse.Namespace(deepspeed_config=str(tmp_path / "gone.json"))
    with pytest.raises(ConfigError, match="gone.json.*--deepspeed_config.*does not exist"):
        load_config(args=args)


def test_package_level_add_config_arguments():
    import flexspeed

    parser = flexspeed.add_config_arguments(argparse.ArgumentParser())
    assert parser.parse_args([]).deepspeed_config is None
