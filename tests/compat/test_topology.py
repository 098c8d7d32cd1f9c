"""Port of DeepSpeed's ``tests/unit/runtime/pipe/test_topology.py``.

Cases: test_topology_2d, test_topology_dims, test_topology_match, test_topology_rank_repr,
test_topology_3d, test_topology_comm_list, TestDistributedTopology.test_grid_pipe_data /
test_stage_to_global, test_primes.

Deliberate difference, all but test_primes: DeepSpeed's general ``ProcessTopology`` (any axes) and
``PipelineParallelGrid`` have no flexspeed counterpart (docs/compat.md): importing them is an
ImportError that says why and what to use. flexspeed's ``PipeDataParallelTopology`` places the
stages of one pipeline on consecutive ranks (DeepSpeed: the data-parallel replicas), checked below
with DeepSpeed's stage_to_global expectations side by side. Not applicable: test_primes (the private
``_prime_factors`` helper). One process: nothing here needs a group.
"""

from __future__ import annotations

import pytest

from flexspeed.runtime.pipe.topology import PipeDataParallelTopology

ABSENT = r"has no flexspeed counterpart.*PipeDataParallelTopology"


def _topo():
    from flexspeed.runtime.pipe.topology import ProcessTopology as Topo

    return Topo


@pytest.mark.parametrize("name", ["test_topology_2d", "test_topology_dims", "test_topology_match",
                                  "test_topology_rank_repr", "test_topology_3d", "test_topology_comm_list"])
def test_process_topology_refused(name):
    """The six ProcessTopology cases: each starts with ``Topo(axes=..., dims=...)``."""
    with pytest.raises(ImportError, match=ABSENT):
        _topo()


class TestDistributedTopology:
    def test_grid_pipe_data(self):
        with pytest.raises(ImportError, match=ABSENT):
            from flexspeed.runtime.pipe.topology import PipelineParallelGrid  # noqa: F401

    def test_stage_to_global(self):
        with pytest.raises(ImportError, match=ABSENT):
            from flexspeed.runtime.pipe.topology import PipelineParallelGrid  # noqa: F401
        topo = PipeDataParallelTopology(num_pp=2, num_dp=2)
        # DeepSpeed: stage_to_global(stage_id=s, data=d) == s * num_dp + d (0, 1, 2, 3);
        # flexspeed: rank = d * num_stages + s, the two stages of a pipeline are neighbours
        assert [topo.rank_of(stage_id=s, dp_index=d) for s in (0, 1) for d in (0, 1)] == [0, 2, 1, 3]
        assert topo.get_dim("pipe") == 2 and topo.get_dim("data") == 2
