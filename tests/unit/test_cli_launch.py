"""``flexspeed launch`` without starting processes: hostfile parsing, DeepSpeed's include/exclude
syntax, Slurm translation, the --local_rank heuristic, the torchrun arguments, and --dry-run."""

from __future__ import annotations

import shlex

import pytest

from flexspeed.cli.launch import local_rank_flag, parse_hostfile, select_hosts, slurm_settings, torchrun_argv
from flexspeed.cli.main import main


@pytest.fixture(autouse=True)
def _not_in_slurm(monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)  # the CLI tests below must not pick up a real job


HOSTFILE = """
# two workers
worker-1 slots=4   # the first
worker-2   slots = 2

"""


def test_parse_hostfile():
    assert parse_hostfile(HOSTFILE) == {"worker-1": 4, "worker-2": 2}


@pytest.mark.parametrize("text, match", [
    ("worker-1 4", r"line 1: 'worker-1 4' is not 'HOST slots=N'"),
    ("a slots=1\na slots=2", r"line 2: host 'a' is listed twice"),
    ("a slots=0", r"slots=0; give at least 1"),
    ("# nothing\n", r"lists no hosts"),
])
def test_parse_hostfile_errors(text, match):
    with pytest.raises(ValueError, match=match):
        parse_hostfile(text)


HOSTS = {"worker-1": 4, "worker-2": 4, "worker-3": 2}


@pytest.mark.parametrize("include, exclude, expected", [
    (None, None, {"worker-1": [0, 1, 2, 3], "worker-2": [0, 1, 2, 3], "worker-3": [0, 1]}),
    ("worker-1:0,2@worker-3", None, {"worker-1": [0, 2], "worker-3": [0, 1]}),
    ("worker-2", None, {"worker-2": [0, 1, 2, 3]}),
    ("worker-1:1@worker-1:0", None, {"worker-1": [0, 1]}),
    (None, "worker-1:0,1@worker-3", {"worker-1": [2, 3], "worker-2": [0, 1, 2, 3]}),
    (None, "worker-3:0,1", {"worker-1": [0, 1, 2, 3], "worker-2": [0, 1, 2, 3]}),
])
def test_include_exclude(include, exclude, expected):
    assert select_hosts(HOSTS, include, exclude) == expected


def test_num_nodes_and_slots():
    assert select_hosts(HOSTS, num_nodes=2, num_slots=2) == {"worker-1": [0, 1], "worker-2": [0, 1]}
    with pytest.raises(ValueError, match=r"--nnodes 4 but only 3 host"):
        select_hosts(HOSTS, num_nodes=4)
    with pytest.raises(ValueError, match=r"--nproc-per-node 3 but host\(s\) \['worker-3'\]"):
        select_hosts(HOSTS, num_slots=3)


@pytest.mark.parametrize("include, exclude, match", [
    ("worker-1", "worker-2", "cannot be combined"),
    ("worker-9", None, r"host 'worker-9' is not in the hostfile \(hosts: worker-1, worker-2, worker-3\)"),
    ("worker-3:5", None, r"worker-3 has no slot\(s\) \[5\]; its slots are \[0, 1\]"),
    ("worker-1:a", None, "must be integers"),
    (None, "worker-1@worker-2@worker-3", "leaves no host"),
])
def test_selection_errors(include, exclude, match):
    with pytest.raises(ValueError, match=match):
        select_hosts(HOSTS, include, exclude)


def test_slurm_translation():
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "3", "SLURM_NTASKS": "3", "SLURM_STEP_ID": "0",
           "SLURM_NODEID": "2", "SLURM_JOB_NODELIST": "gpu[07-09]", "SLURM_GPUS_ON_NODE": "8"}
    s = slurm_settings(env)
    assert (s.nnodes, s.node_rank, s.master_addr, s.master_port, s.gpus_per_node) == (3, 2, "gpu07", 29500 + 4242, 8)
    s = slurm_settings({**env, "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "1234"})
    assert (s.master_addr, s.master_port) == ("10.0.0.5", 1234)
    assert slurm_settings({"PATH": "/bin"}) is None
    one_node = slurm_settings({"SLURM_JOB_ID": "7", "SLURM_NNODES": "1", "SLURM_NTASKS": "4",
                               "SLURM_NODELIST": "cpu1"})  # batch script on one node: fine
    assert (one_node.nnodes, one_node.node_rank, one_node.master_addr) == (1, 0, "cpu1")


@pytest.mark.parametrize("extra", [{"SLURM_NTASKS": "6"}, {"SLURM_STEP_ID": None}])
def test_slurm_needs_one_launcher_per_node(extra):
    env = {"SLURM_JOB_ID": "1", "SLURM_NNODES": "3", "SLURM_NTASKS": "3", "SLURM_STEP_ID": "0",
           "SLURM_NODELIST": "n[1-3]"}
    env.update(extra)
    env = {k: v for k, v in env.items() if v is not None}
    with pytest.raises(ValueError, match=r"srun --ntasks-per-node=1 flexspeed launch"):
        slurm_settings(env)


def test_local_rank_heuristic(tmp_path):
    declares = tmp_path / "a.py"
    declares.write_text('p.add_argument("--local_rank", type=int, default=-1)\n')
    dashed = tmp_path / "b.py"
    dashed.write_text("p.add_argument('--local-rank', type=int)\n")
    plain = tmp_path / "c.py"
    plain.write_text("rank = int(os.environ['LOCAL_RANK'])  # local_rank from the environment\n")
    assert local_rank_flag(str(declares)) == "--local_rank"
    assert local_rank_flag(str(dashed)) == "--local-rank"
    assert local_rank_flag(str(plain)) is None
    assert local_rank_flag(str(tmp_path / "missing.py")) is None
    assert local_rank_flag("json", module=True) is None


def test_torchrun_argv():
    common = dict(nnodes=2, nproc_per_node=4, node_rank=1, master_addr="10.0.0.1", master_port=29500,
                  rdzv_timeout=30, script="train.py", script_args=["--lr", "1"])
    static = torchrun_argv(max_restarts=0, **common)
    assert static == ["--nnodes=2", "--nproc-per-node=4", "--max-restarts=0", "--node-rank=1",
                      "--master-addr=10.0.0.1", "--master-port=29500", "--rdzv-conf=timeout=30", "train.py",
                      "--lr", "1"]
    elastic = torchrun_argv(max_restarts=2, local_rank="--local_rank", **common)
    assert "--rdzv-backend=c10d" in elastic and "--rdzv-endpoint=10.0.0.1:29500" in elastic
    assert "--rdzv-conf=is_host=0,join_timeout=30" in elastic
    assert elastic[-6:] == ["-m", "flexspeed.cli.launch", "--local-rank-flag=--local_rank", "train.py", "--lr", "1"]


def test_dry_run_local(tmp_path, capsys):
    script = tmp_path / "train.py"
    script.write_text("print('hi')\n")
    assert main(["launch", "--nproc-per-node", "3", "--master-port", "1234", "--dry-run", str(script), "--x"]) == 0
    cmd = shlex.split(capsys.readouterr().out)
    assert cmd[1:3] == ["-m", "torch.distributed.run"]
    assert "--nproc-per-node=3" in cmd and "--master-addr=127.0.0.1" in cmd and cmd[-2:] == [str(script), "--x"]


def test_hostfile_with_remote_hosts_prints_node_commands(tmp_path, capsys):
    hostfile = tmp_path / "hosts"
    hostfile.write_text(HOSTFILE)
    script = tmp_path / "train.py"
    script.write_text("\n")
    code = main(["launch", "--hostfile", str(hostfile), "--exclude", "worker-1:3", "--max-restarts", "1",
                 str(script), "--epochs", "2"])
    out = capsys.readouterr().out
    assert code == 0
    lines = [ln for ln in out.splitlines() if not ln.startswith("#")]
    assert len(lines) == 2, out
    first, second = map(shlex.split, lines)
    assert first[0] == "CUDA_VISIBLE_DEVICES=0,1,2"
    assert first[1:3] == ["flexspeed", "launch"] and first[first.index("--node-rank") + 1] == "0"
    assert first[first.index("--nproc-per-node") + 1] == "3" and first[first.index("--master-addr") + 1] == "worker-1"
    assert second[second.index("--node-rank") + 1] == "1" and second[second.index("--nproc-per-node") + 1] == "2"
    assert "--max-restarts" in second and second[-3:] == [str(script), "--epochs", "2"]


def test_local_hostfile_runs_here(tmp_path, capsys):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("localhost slots=4\n")
    script = tmp_path / "train.py"
    script.write_text("\n")
    assert main(["launch", "-H", str(hostfile), "-i", "localhost:1,3", "--dry-run", str(script)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("CUDA_VISIBLE_DEVICES=1,3 ") and "--nproc-per-node=2" in out


def test_errors_name_the_fix(tmp_path, capsys):
    script = tmp_path / "train.py"
    script.write_text("\n")
    assert main(["launch", "--nnodes", "2", str(script)]) == 2
    assert "--nnodes 2 needs --master-addr" in capsys.readouterr().err
    assert main(["launch", "--nnodes", "2", "--node-rank", "2", "--master-addr", "h", str(script)]) == 2
    assert "--node-rank 2 is outside 0..1" in capsys.readouterr().err
    assert main(["launch", str(tmp_path / "nope.py")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        main(["launch", "--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and "--hostfile" in out and "--max-restarts" in out
