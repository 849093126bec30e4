"""The one ``torch.autograd.Function`` behind every loss, whatever the backend.

A backend computes, per row, the loss and a handful of row statistics (forward), then the
gradient from those statistics (backward). Both backends share that two-step structure, so the
reduction, the ``grad_output`` handling and ignored rows live here once.

Backend protocol (``akl_kernels.chunked`` and ``akl_kernels.kernels``):
- ``forward(s2d, t2d, valid, cfg, with_head_stats) -> RowResult``
- ``backward(s2d, t2d, row_stats, coef, cfg) -> grad``, in the student's dtype, with
  ``grad[i] = coef[i] * d loss_i / d zs_i`` and exactly zero where ``coef[i] == 0``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# Columns of the per-row statistics a forward pass hands to its backward pass. Each model's
# log-normaliser is kept as (row max M, log of the shifted sum Z): log q = (zs - M_S) - LOGZ_S
# stays exact near the top even when |zs| is ~1e4 and log Z ~1e-4 (M + log Z would round it away).
M_S, LOGZ_S, M_T, LOGZ_T, RKL, P_C, Q_C, W_F, W_R = range(9)
N_ROW_STATS = 9


class HeadRows(NamedTuple):
    """Per-row AKL split statistics (SPEC 3: ``head_tail_stats``), each of shape [N]."""

    head_gap: torch.Tensor
    tail_gap: torch.Tensor
    head_weight: torch.Tensor
    head_count: torch.Tensor
    head_mass: torch.Tensor


class RowResult(NamedTuple):
    loss: torch.Tensor  # [N], 0 at ignored rows
    row_stats: torch.Tensor  # [N, N_ROW_STATS]
    head: HeadRows | None


def as_rows(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [N, V] without copying when the rows are evenly strided (e.g. x[..., :V])."""
    rows = logits.reshape(-1, logits.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def loss_dtype(student: torch.Tensor, teacher: torch.Tensor) -> torch.dtype:
    # float32 (SPEC 2); float64 inputs keep float64 so gradcheck can run on them.
    wide = torch.float64 in (student.dtype, teacher.dtype)
    return torch.float64 if wide else torch.float32


def reduce_rows(rows: torch.Tensor, valid: torch.Tensor, reduction: str, lead_shape):
    if reduction == "none":
        return rows.reshape(lead_shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1)


def row_grad_coef(grad_output, valid, reduction, temperature, dtype):
    """d loss / d loss_row for every row, times 1/T, zero at ignored rows. No host sync."""
    n = valid.numel()
    grad_output = grad_output.to(dtype)
    if reduction == "none":
        per_row = grad_output.reshape(n)
    elif reduction == "sum":
        per_row = grad_output.expand(n)
    else:
        per_row = (grad_output / valid.sum().clamp(min=1)).expand(n)
    return torch.where(valid, per_row / temperature, torch.zeros_like(per_row))


class DivergenceFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, valid, cfg, backend, reduction):
        result = backend.forward(as_rows(student), as_rows(teacher), valid, cfg, False)
        ctx.save_for_backward(student, teacher, result.row_stats, valid)
        ctx.cfg, ctx.backend, ctx.reduction = cfg, backend, reduction
        return reduce_rows(result.loss, valid, reduction, student.shape[:-1])

    @staticmethod
    def backward(ctx, grad_output):
        student, teacher, row_stats, valid = ctx.saved_tensors
        coef = row_grad_coef(
            grad_output, valid, ctx.reduction, ctx.cfg.temperature, row_stats.dtype
        )
        grad = ctx.backend.backward(as_rows(student), as_rows(teacher), row_stats, coef, ctx.cfg)
        return grad.view(student.shape), None, None, None, None, None
