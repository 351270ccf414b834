import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def pytest_configure(config):
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    # the evaluation data beside the checkout, unless the caller points elsewhere
    shared = REPO.parent / "shared" / "data"
    if "PT2LLM_DATA_DIR" not in os.environ and shared.is_dir():
        os.environ["PT2LLM_DATA_DIR"] = str(shared)


@pytest.fixture
def gen():
    return torch.Generator().manual_seed(1234)
