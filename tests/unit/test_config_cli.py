"""``flexspeed check-config``."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from pathlib import Path

import pytest

from flexspeed.cli.main import main

ROOT = Path(__file__).parents[2]
GOOD = {"train_batch_size": 32, "gradient_accumulation_steps": 2, "bf16": {"enabled": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-4}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}},
        "zero_optimization": {"stage": 2}}


def write(tmp_path: Path, data: dict | str, name: str = "ds.json") -> str:
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flexspeed", "check-config", *argv],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_cli_json_valid(tmp_path):
    out = cli(write(tmp_path, GOOD), "--world-size", "4", "--json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["ok"] is True
    assert (report["train_batch_size"], report["train_micro_batch_size_per_gpu"],
            report["gradient_accumulation_steps"]) == (32, 4, 2)
    assert report["zero_stage"] == 2 and report["precision"] == "bf16"
    assert report["optimizer"]["type"] == "AdamW" and report["scheduler"]["type"] == "WarmupLR"
    assert report["world_size_source"] == "--world-size 4"


def test_cli_invalid_exits_1_without_traceback(tmp_path):
    out = cli(write(tmp_path, {**GOOD, "zero_optimization": {"stag": 2}}), "--world-size", "4")
    assert out.returncode == 1
    assert "Traceback" not in out.stderr + out.stdout
    assert "zero_optimization.stag" in out.stderr and "Did you mean 'stage'?" in out.stderr


def test_cli_triad_mismatch_names_world_size_flag(tmp_path, capsys):
    assert main(["check-config", write(tmp_path, GOOD), "--world-size", "3"]) == 1
    err = capsys.readouterr().err
    assert "--world-size 3" in err and "train_batch_size 32" in err


def test_cli_text_output(tmp_path, capsys):
    assert main(["check-config", write(tmp_path, GOOD), "--world-size", "2"]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and "zero_stage" in out and "bf16" in out and "AdamW(lr=0.0003)" in out


def test_cli_json_error(tmp_path, capsys):
    path = write(tmp_path, '{"train_batch_size": 8,\n "train_batch_size": 8}')
    assert main(["check-config", path, "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["key"] == "train_batch_size" and "line 2 column 2" in report["error"]


def test_cli_missing_file(capsys):
    assert main(["check-config", "no/such/ds_config.json"]) == 1
    assert "no/such/ds_config.json" in capsys.readouterr().err


def test_cli_auto_flags(capsys):
    path = str(ROOT / "examples" / "ds_config_hf_auto.json")
    assert main(["check-config", path, "--world-size", "2", "--json"]) == 1
    assert "--batch-size" in json.loads(capsys.readouterr().out)["error"]
    assert main(["check-config", path, "--world-size", "2", "--batch-size", "4", "--hidden-size", "64", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["train_batch_size"] == 8 and report["optimizer"]["params"]["lr"] == 1e-3


def test_cli_base64(capsys):
    encoded = base64.b64encode(json.dumps(GOOD).encode()).decode()
    assert main(["check-config", encoded, "--world-size", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["train_micro_batch_size_per_gpu"] == 8


def test_cli_deprecation_reported(tmp_path, capsys):
    data = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2, "cpu_offload": True}}
    assert main(["check-config", write(tmp_path, data), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["offload_optimizer"] == "cpu" and any("deprecated" in w for w in report["warnings"])


@pytest.mark.parametrize("argv", [["check-config", "--help"]])
def test_cli_help(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 0 and "--world-size" in capsys.readouterr().out


# ---- dp x pp x tp -------------------------------------------------------------------------------
PIPE_TP = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2, "tensor_parallel": {"autotp_size": 2}}


def test_pipeline_and_tensor_degrees_leave_the_data_parallel_size(tmp_path, capsys):
    path = write(tmp_path, PIPE_TP)
    assert main(["check-config", path, "--world-size", "8", "--pipeline-stages", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["dp"], report["pp"], report["tp"]) == (2, 2, 2)
    assert report["train_batch_size"] == 2 * 2 * 2  # the triad counts dp = 8 / (2 x 2) replicas
    assert main(["check-config", write(tmp_path, {**PIPE_TP, "pipeline": {"stages": 2}}, "staged.json"),
                 "--world-size", "8", "--json"]) == 0  # pp from an integer pipeline.stages
    assert json.loads(capsys.readouterr().out)["dp"] == 2
    assert main(["check-config", path, "--pipeline-stages", "2", "--json"]) == 0  # default: one replica
    report = json.loads(capsys.readouterr().out)
    assert (report["dp"], report["pp"], report["tp"]) == (1, 2, 2) and report["train_batch_size"] == 4


def test_a_world_that_pp_times_tp_does_not_divide_is_the_runtime_error(tmp_path, capsys):
    from flexspeed.config import ConfigError
    from flexspeed.distributed.parallel_dims import ParallelDims

    # tp 2 divides 6, pp 2 x tp 2 = 4 does not: the check the tp-only path missed
    assert main(["check-config", write(tmp_path, PIPE_TP), "--world-size", "6", "--pipeline-stages", "2",
                 "--json"]) == 1
    got = json.loads(capsys.readouterr().out)
    with pytest.raises(ConfigError) as runtime:  # what initialize() raises for a PipelineModule(num_stages=2)
        ParallelDims.from_world(6, pp=2, tp=2, world_source="--world-size 6", pp_source="--pipeline-stages 2",
                                tp_source="tensor_parallel.autotp_size=2")
    assert got["error"] == str(runtime.value) and got["key"] == runtime.value.key
    assert "pp 2" in got["error"] and "tp 2" in got["error"] and "world size 6" in got["error"]
    assert "use a pipeline degree in" in got["error"]  # the fix


def test_pipeline_stages_flag_and_config_must_agree(tmp_path, capsys):
    path = write(tmp_path, {**PIPE_TP, "pipeline": {"stages": 4}})
    assert main(["check-config", path, "--world-size", "8", "--pipeline-stages", "2", "--json"]) == 1
    got = json.loads(capsys.readouterr().out)
    assert got["key"] == "pipeline.stages" and "pipeline.stages=4" in got["error"] and "--pipeline-stages 2" in got[
        "error"]
    assert main(["check-config", write(tmp_path, PIPE_TP, "plain.json"), "--world-size", "8", "--pipeline-stages", "0",
                 "--json"]) == 1
    assert "must be a positive integer" in json.loads(capsys.readouterr().out)["error"]
