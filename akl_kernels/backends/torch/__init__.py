"""The exact chunked PyTorch backend (``backend="torch"``): any device, any float dtype."""

from akl_kernels.backends.torch.chunked import backward, forward
from akl_kernels.backends.torch.topk import backward as topk_backward
from akl_kernels.backends.torch.topk import forward as topk_forward

__all__ = ["backward", "forward", "topk_backward", "topk_forward"]
