"""Shared fixtures: each lives in a tests/support module and is re-exported here.

Under pytest-xdist (``scripts/test`` runs two workers) each worker and every process it starts
uses one torch thread: two workers of two threads each on two cores would fight for them.
"""

import os

import torch

from tests.support.hub import hub  # noqa: F401
from tests.support.zoo import bv_cache_dir, zoo  # noqa: F401

if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # the stacks' API and worker processes
    torch.set_num_threads(1)
