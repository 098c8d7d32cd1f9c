"""``flexspeed export CKPT OUTDIR/`` writes a Hugging Face folder (config.json, safetensors shards split
as huggingface_hub splits them, an index, tied weights once) that ``from_pretrained`` loads with the
trained engine's exact logits; ``engine.save_pretrained`` writes the same from a live engine; a single
``.safetensors`` file streams the same way; and the folder/file choice follows OUT's spelling."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist

import flexspeed
from flexspeed.cli.export import output_kind
from flexspeed.cli.main import main
from flexspeed.runtime.hf_folder import TensorEntry, parse_size, plan_shards

tf = pytest.importorskip("transformers")
tf.utils.logging.set_verbosity_error()


@pytest.fixture(autouse=True)
def _no_group_leak():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def trained(model: torch.nn.Module, tmp_path) -> tuple:
    engine, *_ = flexspeed.initialize(model=model, model_parameters=model.parameters(), config={
        "train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}})
    ids = torch.randint(0, 97, (2, 8), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        out = engine(ids, labels=ids) if hasattr(model, "config") and hasattr(model.config, "n_positions") \
            else engine(ids, ids)
        engine.backward(out.loss if hasattr(out, "loss") else out)
        engine.step()
    engine.save_checkpoint(str(tmp_path / "ckpt"))
    engine.module.eval()
    return engine, ids


def gpt2() -> torch.nn.Module:
    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(tf.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=97, n_positions=32,
                                            bos_token_id=1, eos_token_id=2))


def test_folder_export_loads_with_from_pretrained(tmp_path) -> None:
    engine, ids = trained(gpt2(), tmp_path)
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "hf") + "/", "--max-shard-size", "100kB"]) == 0
    files = sorted(os.listdir(tmp_path / "hf"))
    assert "config.json" in files and "model.safetensors.index.json" in files
    shards = [f for f in files if f.startswith("model-")]
    assert len(shards) > 1 and all(f.endswith(f"-of-{len(shards):05d}.safetensors") for f in shards)
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert "lm_head.weight" not in index["weight_map"] and "transformer.wte.weight" in index["weight_map"]  # tied once
    sizes = [os.path.getsize(tmp_path / "hf" / f) for f in shards]
    assert max(sizes) < 100_000 + 4 * 97 * 64 + 4096  # a shard passes the limit only by one tensor it holds alone
    back = tf.GPT2LMHeadModel.from_pretrained(str(tmp_path / "hf")).eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, engine.module(ids).logits, rtol=0, atol=0)
    assert back.lm_head.weight.data_ptr() == back.transformer.wte.weight.data_ptr()


def test_save_pretrained_and_single_file(tmp_path) -> None:
    engine, ids = trained(gpt2(), tmp_path)
    engine.save_pretrained(str(tmp_path / "sp"), dtype="bf16")
    back = tf.GPT2LMHeadModel.from_pretrained(str(tmp_path / "sp")).eval()
    cfg = json.loads((tmp_path / "sp" / "config.json").read_text())
    assert cfg.get("dtype", cfg.get("torch_dtype")) == "bfloat16"  # transformers 5 names it dtype
    assert back.transformer.wte.weight.dtype == torch.bfloat16
    torch.testing.assert_close(back.transformer.wte.weight.float(), engine.module.transformer.wte.weight.bfloat16().float())
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "one.safetensors")]) == 0
    from safetensors.torch import load_file

    from flexspeed.runtime.export import consolidate

    got, want = load_file(str(tmp_path / "one.safetensors")), consolidate(str(tmp_path / "ckpt"))
    assert set(got) == set(want) - {"lm_head.weight"}
    for k, v in got.items():
        assert torch.equal(v, want[k]), k


def test_flexspeed_gpt_folder_serves_init_inference(tmp_path) -> None:
    from flexspeed.inference.offload import OffloadedLM
    from flexspeed.models import GPT

    torch.manual_seed(0)
    engine, ids = trained(GPT(n_layer=2, n_embd=64, n_head=4, vocab_size=97, block_size=32), tmp_path)
    assert main(["export", str(tmp_path / "ckpt"), str(tmp_path / "gpt")]) == 0  # no extension: a folder
    cfg = json.loads((tmp_path / "gpt" / "config.json").read_text())
    assert cfg["model_type"] == "flexspeed_gpt" and cfg["n_layer"] == 2
    with torch.no_grad():
        want = engine.module(ids)
        inf = flexspeed.init_inference(OffloadedLM.from_pretrained(str(tmp_path / "gpt")),
                                       checkpoint=str(tmp_path / "gpt"), dtype="fp32", offload={"w_gpu_percent": 100})
        torch.testing.assert_close(inf(ids), want, rtol=0, atol=1e-5)
    inf.offload.close()


def test_output_kind_and_shard_plan(tmp_path) -> None:
    assert output_kind("out/", None) == "folder" and output_kind("out", None) == "folder"
    assert output_kind(str(tmp_path), None) == "folder" and output_kind("m.safetensors", None) == "safetensors"
    assert output_kind("m.bin", None) == "pt" and output_kind("x.weights", "pt") == "pt"
    assert parse_size("5GB") == 5 * 10**9 and parse_size("2MiB") == 2 * 2**20 and parse_size(123) == 123
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("five gigs")
    e = [TensorEntry(str(i), torch.float32, (n,)) for i, n in enumerate([10, 10, 30, 5, 5])]  # 40, 40, 120, 20, 20 B
    assert [[x.name for x in s] for s in plan_shards(e, 80)] == [["0", "1"], ["2"], ["3", "4"]]
