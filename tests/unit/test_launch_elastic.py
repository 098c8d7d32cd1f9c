"""``flexspeed launch --nnodes MIN:MAX`` (issue 16, item 3): parsed, checked, and run on torchrun's c10d
rendezvous (the static one cannot admit a varying number of nodes)."""

from __future__ import annotations

import argparse

import pytest

from flexspeed.cli.launch import parse_nnodes, make_plan, torchrun_argv


def test_nnodes_values():
    assert parse_nnodes("2") == 2 and parse_nnodes("1:4") == "1:4" and parse_nnodes("3:3") == 3
    for bad in ("0", "4:1", "a", "1:b", "0:2"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_nnodes(bad)


def test_min_max_uses_c10d_rendezvous():
    argv = torchrun_argv(nnodes="1:2", nproc_per_node=2, node_rank=0, master_addr="10.0.0.1", master_port=29500,
                         max_restarts=0, rdzv_timeout=None, script="train.py", script_args=[])
    assert "--nnodes=1:2" in argv and "--rdzv-backend=c10d" in argv and "--rdzv-endpoint=10.0.0.1:29500" in argv


def _args(**kw):
    base = dict(hostfile=None, include=None, exclude=None, nnodes=None, node_rank=None, master_addr=None,
                master_port=None, nproc_per_node=1)
    return argparse.Namespace(**{**base, **kw})


def test_plan_checks():
    with pytest.raises(ValueError, match="--master-addr"):
        make_plan(_args(nnodes="1:2"))
    plan = make_plan(_args(nnodes="1:2", master_addr="10.0.0.1", node_rank=1))
    assert plan.nnodes == "1:2" and plan.node_rank == 1
    with pytest.raises(ValueError, match="hostfile"):
        make_plan(_args(nnodes="1:2", include="localhost:0"))
