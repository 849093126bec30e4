"""The Triton backend (``backend="triton"``): fused forward and backward kernels."""

from akl_kernels.backends.triton.backward import backward
from akl_kernels.backends.triton.forward import forward

__all__ = ["backward", "forward"]
