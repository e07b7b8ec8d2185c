import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite runs in parallel (pytest-xdist, `-n auto` in pyproject.toml): one worker per core, at most 4 (each
# holds torch, Lightning and transformers, ~1.2 GB); the workers share the cores' torch threads (at least one each).
MAX_WORKERS = 4
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1) // _WORKERS))


def pytest_xdist_auto_num_workers(config):
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
