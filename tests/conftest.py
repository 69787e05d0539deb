"""Shared test set-up: the repo root on sys.path, few threads (the CI machine has 2 cores)."""
import os
import sys

# numba's compile of ffcv pipelines costs 15-120 s per process; the tests' tiny batches run as
# plain Python instead (same results). Set before anything imports numba; subprocesses inherit it.
os.environ.setdefault('NUMBA_DISABLE_JIT', '1')

import torch  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_DATA = os.path.join(os.path.dirname(ROOT), 'shared', 'data')
torch.set_num_threads(2)
