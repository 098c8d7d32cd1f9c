"""The CUDA tier: skipped without a GPU.

``FLEXSPEED_GPU_TESTS_ON_CPU=1`` runs the tier's logic on the CPU instead (device "cpu", gloo):
a dry run of the tests themselves before GPU time is spent on them (``scripts/gpu_check.sh``
does this first where it can). Tests of what exists only on CUDA (graphs, pinned copies, NCCL,
host offload) are marked ``cuda_only`` and stay skipped in a dry run.
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
DRY_RUN = os.environ.get("FLEXSPEED_GPU_TESTS_ON_CPU") == "1"
DEV = torch.device("cuda", 0) if HAS_CUDA else torch.device("cpu")


def pytest_collection_modifyitems(config, items):
    here = os.path.dirname(os.path.abspath(__file__))
    skip_all = pytest.mark.skip(reason="needs a CUDA GPU (FLEXSPEED_GPU_TESTS_ON_CPU=1 dry-runs the logic on CPU)")
    skip_cuda = pytest.mark.skip(reason="CUDA only (dry run on CPU)")
    for item in items:
        if not str(item.fspath).startswith(here):
            continue
        item.add_marker(pytest.mark.gpu)
        if not HAS_CUDA and not DRY_RUN:
            item.add_marker(skip_all)
        elif not HAS_CUDA and item.get_closest_marker("cuda_only"):
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _no_tf32():
    """fp32 stays fp32 (cuBLAS would otherwise use TF32 for matmuls and break 1e-5 comparisons)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
