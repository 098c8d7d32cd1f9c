"""ParallelDims: degrees validated before any collective, and the dp x pp x tp mesh layout.

The 8-rank layout runs on torch's fake process group (one process plays each rank in turn, no
communication); the 4-rank layout runs on real gloo ranks (tests/distributed would spawn them, but
one small spawn here keeps the mesh rules in one file).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from flexspeed.config.errors import ConfigError
from flexspeed.distributed.parallel_dims import ParallelDims
from flexspeed.testing import run_ranks


def test_dp_is_the_remainder_and_coords_follow_tp_innermost():
    dims = ParallelDims.from_world(8, pp=2, tp=2)
    assert (dims.dp, dims.pp, dims.tp, dims.world_size) == (2, 2, 2, 8)
    assert [dims.coords(r) for r in (0, 1, 2, 5, 7)] == [
        {"dp": 0, "pp": 0, "tp": 0}, {"dp": 0, "pp": 0, "tp": 1}, {"dp": 0, "pp": 1, "tp": 0},
        {"dp": 1, "pp": 0, "tp": 1}, {"dp": 1, "pp": 1, "tp": 1}]
    assert dims.ranks_along("dp", 5) == [1, 5] and dims.ranks_along("pp", 5) == [5, 7]
    assert dims.ranks_along("tp", 5) == [4, 5]
    assert all(dims.rank_of(**dims.coords(r)) == r for r in range(8))
    # no tensor parallelism: the pipeline's historical rank = dp_index * num_stages + stage_id
    pipe = ParallelDims.from_world(6, pp=3)
    assert [(pipe.coords(r)["pp"], pipe.coords(r)["dp"]) for r in range(6)] == [(r % 3, r // 3) for r in range(6)]


def test_degrees_that_do_not_divide_the_world_name_numbers_sources_and_fix():
    with pytest.raises(ConfigError) as err:
        ParallelDims.from_world(6, pp=4, tp=1, world_source="WORLD_SIZE", pp_source="PipelineModule(num_stages=4)")
    msg = str(err.value)
    assert "pp 4 (from PipelineModule(num_stages=4))" in msg and "world size 6 (from WORLD_SIZE)" in msg
    assert "[1, 2, 3, 6]" in msg and "Fix:" in msg and err.value.key == "pipeline"
    with pytest.raises(ConfigError) as err:
        ParallelDims.from_world(8, pp=2, tp=3, tp_source="tensor_parallel.autotp_size=3")
    assert err.value.key == "tensor_parallel.autotp_size"  # pp 2 divides 8; tp 3 is what breaks it
    assert "tp 3 (from tensor_parallel.autotp_size=3)" in str(err.value)
    with pytest.raises(ConfigError, match="tp=0 .* must be a positive integer"):
        ParallelDims.from_world(4, tp=0)
    with pytest.raises(ConfigError, match=r"dp 2 x pp 2 x tp 2 = 8 ranks, but the world size is 4"):
        ParallelDims(dp=2, pp=2, tp=2, world_size=4)
    with pytest.raises(ValueError, match="'tp_dp' is not one of"):
        ParallelDims(dp=1).mesh("tp_dp")


_FAKE = r"""
import json, sys
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore
from flexspeed.distributed.parallel_dims import ParallelDims
out = {}
for rank in range(8):
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=8)
    dims = ParallelDims.from_world(8, pp=2, tp=2)
    root = dims.build_mesh("cpu")
    assert root.mesh_dim_names == ("dp", "pp", "tp") and tuple(root.shape) == (2, 2, 2)
    out[rank] = {name: dist.get_process_group_ranks(dims.group(name))
                 for name in ("dp", "pp", "tp", "dp_tp", "dp_pp", "pp_tp")}
    dist.destroy_process_group()
print(json.dumps(out))
"""


def test_mesh_layout_at_8_fake_ranks():
    res = subprocess.run([sys.executable, "-c", _FAKE], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    import json

    groups = {int(k): v for k, v in json.loads(res.stdout.strip().splitlines()[-1]).items()}
    dims = ParallelDims.from_world(8, pp=2, tp=2)
    for rank, got in groups.items():
        for name in ("dp", "pp", "tp"):
            assert got[name] == dims.ranks_along(name, rank), (rank, name)
        c = dims.coords(rank)
        assert got["dp_tp"] == sorted(dims.rank_of(dp=d, pp=c["pp"], tp=t) for d in range(2) for t in range(2))
        assert got["dp_pp"] == sorted(dims.rank_of(dp=d, pp=p, tp=c["tp"]) for d in range(2) for p in range(2))
        assert got["pp_tp"] == sorted(dims.rank_of(dp=c["dp"], pp=p, tp=t) for p in range(2) for t in range(2))


def _gloo_layout(rank: int, world: int) -> dict:
    import torch
    import torch.distributed as dist

    out = {}
    for pp, tp in ((2, 2), (2, 1), (1, 2), (4, 1)):
        dims = ParallelDims.from_world(world, pp=pp, tp=tp)
        groups = {name: dist.get_process_group_ranks(dims.group(name)) for name in ("dp", "pp", "tp")}
        # a real collective over each dimension: the sum of the global ranks in that group
        sums = {}
        for name in ("dp", "pp", "tp"):
            t = torch.tensor([float(rank)])
            dist.all_reduce(t, group=dims.group(name))
            sums[name] = float(t)
        out[(pp, tp)] = {"groups": groups, "sums": sums}
    return out


def test_mesh_layout_at_4_gloo_ranks():
    results = run_ranks(_gloo_layout, world_size=4, timeout=240)
    for rank, res in enumerate(results):
        for (pp, tp), got in res.items():
            dims = ParallelDims.from_world(4, pp=pp, tp=tp)
            for name in ("dp", "pp", "tp"):
                want = dims.ranks_along(name, rank)
                assert got["groups"][name] == want, (rank, pp, tp, name)
                assert got["sums"][name] == float(sum(want))
