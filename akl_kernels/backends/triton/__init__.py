"""The Triton backend (``backend="triton"``): fused forward and backward kernels."""

from akl_kernels.backends.triton.forward_kernel import forward
from akl_kernels.backends.triton.grad_kernel import backward
from akl_kernels.backends.triton.topk import backward as topk_backward
from akl_kernels.backends.triton.topk import forward as topk_forward

__all__ = ["backward", "forward", "topk_backward", "topk_forward"]
