"""Shared fixtures. Without CUDA the Triton kernels run in the CPU interpreter."""

import os
import warnings

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    # Must be set before the Triton backend is imported: triton.jit reads it at decoration.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

DEVICE = "cuda" if HAS_CUDA else "cpu"
# ./run.sh test runs pytest-xdist workers, one per core: each gets its share of the cores
# (torch would start a thread per core in every worker, and they would contend).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))
BACKENDS = ["torch", "triton"]


@pytest.fixture
def rng(request):
    """A fresh torch.Generator per test; the seed is printed so a failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    if "AKL_TEST_SEED" in os.environ:
        seed = int(os.environ["AKL_TEST_SEED"])
    print(f"\n[seed] {request.node.nodeid}: AKL_TEST_SEED={seed}")
    gen = torch.Generator().manual_seed(seed)
    return gen


@pytest.fixture(autouse=True)
def _quiet_interpreter():
    # The interpreter evaluates -inf - -inf in numpy for masked lanes; the kernels select those
    # lanes away, so numpy's RuntimeWarning is noise here.
    with warnings.catch_warnings(), np.errstate(invalid="ignore", over="ignore"):
        warnings.simplefilter("ignore", RuntimeWarning)
        yield
