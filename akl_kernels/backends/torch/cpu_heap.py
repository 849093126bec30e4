"""glibc's malloc and the chunk loops on CPU.

A chunk loop allocates and frees the same few MiB of temporaries for every chunk, thousands of
times per call. glibc serves a block above its mmap threshold (128 KiB at first) with a fresh
mapping, and gives a heap top with more than its trim threshold free back to the kernel, so
until those thresholds are high enough every chunk's temporaries are page-faulted in again.
glibc raises them itself (mallopt(3), the dynamic mmap threshold): freeing a mapped block sets
the mmap threshold to that block's size, up to 32 MiB on 64-bit, and the trim threshold to twice
that. A long-running training process has usually freed such a block already; a fresh one, or
one whose tensors are all small or all huge, has not, and then AKL's forward plus backward on
2 cores (N 4096, V 32000, float32) took 5.0-5.7 s instead of 2.7-3.3 s (docs/results.md).

So the first CPU chunk loop of a process maps and frees one block just under the cap. A
threshold set by hand (``mallopt``, the ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_``
environment variables or ``GLIBC_TUNABLES``) turns glibc's adjustment off, and then this changes
nothing; neither does it on another C library. What it costs is the state glibc reaches by itself
once any tensor of ~31 MiB has been freed: blocks under 31 MiB come from the heap rather than
fresh mappings (fragmentation can keep more of them resident), and up to 62 MiB freed at the
heap top stays for reuse instead of going back to the kernel.
"""

from __future__ import annotations

import functools

import torch

# Under glibc's 32 MiB cap on the dynamic threshold (DEFAULT_MMAP_THRESHOLD_MAX), with room for
# its chunk header and the allocator's alignment padding.
_BLOCK_BYTES = 31 * 2**20


@functools.cache
def keep_freed_chunks_resident() -> None:
    """Map and free one block of _BLOCK_BYTES on the CPU, once per process (nothing is written
    to it, unless deterministic algorithms fill uninitialised memory: one 31 MiB fill)."""
    torch.empty(_BLOCK_BYTES, dtype=torch.uint8, device="cpu")
