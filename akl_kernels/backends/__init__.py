"""The backends: ``torch/`` (exact chunked PyTorch) and ``triton/`` (fused kernels).

The interface and the choice by name live in ``interface.py``: the package's own namespace holds
the subpackages ``torch`` and ``triton``, whose names would shadow the libraries here.
"""

from akl_kernels.backends.interface import Backend, get_backend, resolve_backend
from akl_kernels.validation import BACKENDS

__all__ = ["BACKENDS", "Backend", "get_backend", "resolve_backend"]
