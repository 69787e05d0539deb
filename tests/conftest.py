"""Shared test set-up: the repo root on sys.path, few threads (the CI machine has 2 cores)."""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SHARED_DATA = os.path.join(os.path.dirname(ROOT), 'shared', 'data')
torch.set_num_threads(2)
