"""Shared test set-up: the repo root on sys.path, few threads (the CI machine has 2 cores)."""
import os
import sys

import pytest

# numba's compile of ffcv pipelines costs 15-120 s per process; the tests' tiny batches run as
# plain Python instead (same results). Set before anything imports numba; subprocesses inherit it.
os.environ.setdefault('NUMBA_DISABLE_JIT', '1')

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_DATA = os.path.join(os.path.dirname(ROOT), 'shared', 'data')
torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _no_process_group_leaks():
    """Stages run in-process here; one that exits through a clear error (SystemExit) keeps its
    world-size-1 process group, which the next test that makes its own would trip over."""
    yield
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
