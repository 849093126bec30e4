"""The exact chunked PyTorch backend (``backend="torch"``): any device, any float dtype."""

from akl_kernels.backends.torch.chunked import backward, forward

__all__ = ["backward", "forward"]
