"""Sums along a row whose bits do not depend on how many rows are summed together.

On CPU with more than one thread, a reduction to a single value over 32768 or more elements is
split across the threads (two passes), so a row alone in its chunk would be summed in another
order than the same row among others. A stride-0 pair of it (no copy) is summed row by row like
any block. Every floating-point sum along a row in this backend goes through ``row_sum``.
"""

from __future__ import annotations

import torch


def row_sum(x: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x.sum(dim=1, dtype=dtype)`` of [R, K], each row's bits independent of R."""
    if x.shape[0] == 1 and x.device.type == "cpu":
        return x.expand(2, -1).sum(dim=1, dtype=dtype)[:1]
    return x.sum(dim=1, dtype=dtype)


def log_sum_exp(shifted: torch.Tensor) -> torch.Tensor:
    """log(sum exp) of rows already shifted by their maximum (no overflow), by ``row_sum``."""
    return row_sum(shifted.exp()).log()
