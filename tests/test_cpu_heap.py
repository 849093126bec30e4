"""The torch backend's chunk loops on CPU do not page-fault their temporaries in again on every
chunk (akl_kernels/backends/torch/cpu_heap.py): minor page faults of a second AKL call, in a
fresh process each, with glibc's thresholds raised and without."""

import os
import platform
import subprocess
import sys

import pytest


def _huge_pages_always():
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


pytestmark = [
    pytest.mark.skipif(sys.platform != "linux" or platform.libc_ver()[0] != "glibc"
                       or "LD_PRELOAD" in os.environ,  # another malloc (jemalloc, tcmalloc)
                       reason="glibc's dynamic malloc thresholds"),
    # Huge pages fault 2 MiB at a time: the counts below would not be pages.
    pytest.mark.skipif(_huge_pages_always(), reason="transparent huge pages always on")]

_SECOND_CALL_FAULTS = """
import resource, sys, torch
import akl_kernels
from akl_kernels.backends.torch import cpu_heap
if sys.argv[1] == "unchanged":
    cpu_heap.keep_freed_chunks_resident = lambda: None
g = torch.Generator().manual_seed(0)
t = 2 * torch.randn(512, 32000, generator=g)
s = (t + torch.randn(512, 32000, generator=g)).requires_grad_()
def call():
    akl_kernels.akl_loss(s, t, backend="torch").backward()
    s.grad = None
call()
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
call()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""


def _second_call_faults(variant):
    # glibc's own defaults: a MALLOC_* tunable in the environment would fix the thresholds.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}
    done = subprocess.run([sys.executable, "-c", _SECOND_CALL_FAULTS, variant],
                          capture_output=True, text=True, check=True, env=env)
    return int(done.stdout.split()[-1])


def test_the_chunk_loops_reuse_their_freed_memory():
    raised, unchanged = _second_call_faults("raised"), _second_call_faults("unchanged")
    gradient_pages = 512 * 32000 * 4 // 4096  # the gradient is a fresh mapping either way
    assert raised < unchanged / 3, (raised, unchanged)
    assert raised < 3 * gradient_pages, (raised, gradient_pages)
