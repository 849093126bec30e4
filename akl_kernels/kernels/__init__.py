"""Triton backend (``backend="triton"``): fused forward and backward kernels."""

from akl_kernels.kernels.backward import backward
from akl_kernels.kernels.forward import forward

__all__ = ["backward", "forward"]
