"""Shared test set-up.

This machine has 2 cores and torch's intra-op threads contend badly on it (small models ran
10-50x slower with 2 threads), so every test runs torch with ONE thread.
"""

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

# the shared references, models and fit helpers (tests/_helpers) import as top-level modules
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "_helpers"))


def pytest_report_header(config):
    return f"netprobe tests: torch {torch.__version__}, torch threads = {torch.get_num_threads()} (set to 1 on purpose)"


@pytest.fixture
def gen():
    """A seeded generator; tests never draw from the global RNG unless they test exactly that."""
    return torch.Generator().manual_seed(0)


# hypothesis draws the same examples on every run: CI is reproducible, never flaky by chance
from hypothesis import settings  # noqa: E402

settings.register_profile("netprobe", derandomize=True, deadline=None)
settings.load_profile("netprobe")
