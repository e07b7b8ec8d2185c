import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite runs in parallel (pytest-xdist, `-n auto` in pyproject.toml): one worker per core, at most 4 (each
# holds torch, Lightning and transformers, ~1.2 GB), each with its share of the cores as torch threads (1 or 2).
MAX_WORKERS = 4
CORES = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, CORES // _WORKERS)))


def pytest_xdist_auto_num_workers(config):
    return max(1, min(MAX_WORKERS, CORES))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
