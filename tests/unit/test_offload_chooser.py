"""The policy chooser (probe, cost model, search under a budget) and the ``flexspeed generate`` command."""

from __future__ import annotations

import json
import os

import pytest
import torch

from flexspeed.cli.main import main
from flexspeed.inference.offload import OffloadPolicy
from flexspeed.inference.offload.arch import arch_from_config
from flexspeed.inference.offload.chooser import MachineProfile, choose_policy, estimate, probe_machine

OPT_13B = dict(model_type="opt", hidden_size=2048, num_hidden_layers=24, ffn_dim=8192, num_attention_heads=32,
               vocab_size=50272, word_embed_proj_dim=2048)
# the reference machine of ANCHORS.md, roughly: 25 GB/s memory, cold disk 1 GB/s, 600 GFLOP/s bf16
PROFILE = MachineProfile(mem_read_bw=25e9, mem_copy_bw=20e9, disk_cold_bw=1e9, disk_warm_bw=6e9, matmul_flops=6e11)


def test_cost_model_prices_disk_reads_and_memory() -> None:
    arch = arch_from_config(OPT_13B)
    kw = dict(batch=8, prompt_len=128, gen_len=32)
    resident = estimate(arch, OffloadPolicy(), PROFILE, **kw)
    disk = estimate(arch, OffloadPolicy(w_gpu_percent=10, direct_io=True), PROFILE, **kw)
    assert disk["memory_bytes"] < 0.5 * resident["memory_bytes"]
    assert disk["tokens_per_s"] < resident["tokens_per_s"]  # every step reads ~2.4 GB at 1 GB/s
    assert disk["disk_bytes_per_step"] > 2e9
    no_overlap = estimate(arch, OffloadPolicy(w_gpu_percent=10, direct_io=True, overlap=False), PROFILE, **kw)
    assert no_overlap["total_s"] > disk["total_s"]
    compressed = estimate(arch, OffloadPolicy(w_gpu_percent=10, direct_io=True, compress_weight=True), PROFILE, **kw)
    assert compressed["disk_bytes_per_step"] < 0.35 * disk["disk_bytes_per_step"]
    bigger = estimate(arch, OffloadPolicy(w_gpu_percent=10, direct_io=True, num_gpu_batches=4), PROFILE,
                      batch=32, prompt_len=128, gen_len=32)
    assert bigger["tokens_per_s"] > disk["tokens_per_s"]  # one weight load serves four micro-batches


def test_choose_policy_fits_the_budget_and_prefers_speed() -> None:
    arch = arch_from_config(OPT_13B)
    base = OffloadPolicy(direct_io=True)
    small, est_small = choose_policy(arch, 1 << 30, PROFILE, prompt_len=128, gen_len=32, base=base, max_batch=32)
    large, est_large = choose_policy(arch, 6 << 30, PROFILE, prompt_len=128, gen_len=32, base=base, max_batch=32)
    assert est_small["memory_bytes"] <= 1 << 30 and est_large["memory_bytes"] <= 6 << 30
    assert small.w_gpu_percent < large.w_gpu_percent and est_small["tokens_per_s"] <= est_large["tokens_per_s"]
    assert small.direct_io and large.direct_io  # the caller's flags are kept
    fixed, _ = choose_policy(arch, 2 << 30, PROFILE, prompt_len=128, gen_len=32, base=base, gpu_batch_size=8,
                             num_gpu_batches=2)
    assert (fixed.gpu_batch_size, fixed.num_gpu_batches) == (8, 2)
    with pytest.raises(ValueError, match=r"mem_budget=1.0 MiB is too small.*smallest configuration needs about"):
        choose_policy(arch, 1 << 20, PROFILE, prompt_len=128, gen_len=32)


def test_probe_measures_this_machine(tmp_path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(os.urandom(8 << 20))
    profile = probe_machine(str(path), dtype=torch.float32, file_bytes=8 << 20)
    for value in (profile.mem_read_bw, profile.mem_copy_bw, profile.disk_cold_bw, profile.disk_warm_bw,
                  profile.matmul_flops):
        assert value > 0
    assert "GFLOP/s" in profile.describe()


@pytest.fixture(scope="module")
def opt_folder(tmp_path_factory) -> str:
    tf = pytest.importorskip("transformers")
    tf.utils.logging.set_verbosity_error()
    torch.manual_seed(0)
    cfg = tf.OPTConfig(num_hidden_layers=2, hidden_size=64, ffn_dim=128, num_attention_heads=4, vocab_size=97,
                       max_position_embeddings=64, word_embed_proj_dim=64)
    folder = str(tmp_path_factory.mktemp("opt"))
    tf.OPTForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
    return folder


def test_cli_generate_with_percent(opt_folder, capsys) -> None:
    rc = main(["generate", "--model", opt_folder, "--benchmark", "--percent", "10", "0", "100", "0", "100", "0",
               "--gpu-batch-size", "2", "--num-gpu-batches", "2", "--prompt-len", "8", "--gen-len", "4", "--compress-cache"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    last = out.out.strip().splitlines()[-1]
    assert "tok/s" in last and "peak RSS" in last and "percent=10/0/100/0/100/0" in last
    assert "batch 4 x 4 tokens" in last and "compress_cache" in last
    assert "generate" in out.err  # the progress bar


def test_cli_generate_with_mem_budget(opt_folder, capsys, monkeypatch) -> None:
    import flexspeed.inference.offload.chooser as chooser

    monkeypatch.setattr(chooser, "probe_machine", lambda *a, **k: PROFILE)
    rc = main(["generate", "--model", opt_folder, "--benchmark", "--mem-budget", "64MB", "--prompt-len", "8",
               "--gen-len", "3", "--max-batch", "4"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "policy (chosen for 64MB: estimated" in out.out and "throughput" in out.out


def test_cli_generate_errors(opt_folder, tmp_path, capsys) -> None:
    assert main(["generate", "--model", str(tmp_path), "--benchmark", "--percent", "100", "0", "100", "0", "100",
                 "0"]) == 2
    assert "config.json" in capsys.readouterr().err
    with open(tmp_path / "config.json", "w") as f:
        json.dump({"model_type": "t5"}, f)
    assert main(["generate", "--model", str(tmp_path), "--benchmark"]) == 2
    assert "model_type='t5' is not supported" in capsys.readouterr().err
    assert main(["generate", "--model", opt_folder, "--benchmark", "--percent", "90", "20", "100", "0", "100", "0"]) == 2
    assert "w_gpu_percent=90 plus w_cpu_percent=20" in capsys.readouterr().err
    assert main(["generate", "--model", opt_folder, "--benchmark", "--gen-len", "0"]) == 2
