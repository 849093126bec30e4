"""The one ``torch.autograd.Function`` behind every loss, whatever the backend.

A backend computes, per row, the loss and a handful of row statistics (forward), then the
gradient from those statistics (backward). Both backends share that two-step structure, so the
reduction, the ``grad_output`` handling and ignored rows live here once.

Backend protocol (``akl_kernels.chunked`` and ``akl_kernels.kernels``):
- ``forward(s2d, t2d, valid, cfg, with_head_stats, labels) -> RowResult``
- ``backward(s2d, t2d, row_stats, coef, cfg, labels, grad_dtype=None) -> grad``, in
  ``grad_dtype`` (default the student's dtype), with ``grad[i] = coef[i] * d loss_i / d s_i``
  (the 1/T of the divergence's part included by the backend) and exactly zero where
  ``coef[i] == 0``. It is elementwise given the row statistics, so s2d and t2d may be a block
  of the vocabulary's columns (labels then shifted by the block's start).
``labels`` ([N] int64) are the cross-entropy's targets when ``cfg.with_ce``, else None.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

# Columns of the per-row statistics a forward pass hands to its backward pass. Each model's
# log-normaliser is kept as (row max M, log of the shifted sum Z): log q = (zs - M_S) - LOGZ_S
# stays exact near the top even when |zs| is ~1e4 and log Z ~1e-4 (M + log Z would round it away).
# RKL, P_C, Q_C, W_F, W_R serve the KL family's gradient; H_SUM = sum_C q df/dq the pointwise
# family's (akl_kernels/pointwise.py); M_1, LOGZ_1 are the student's at T = 1 for the fused
# cross-entropy of distillation_loss.
M_S, LOGZ_S, M_T, LOGZ_T, RKL, P_C, Q_C, W_F, W_R, H_SUM, M_1, LOGZ_1 = range(12)
N_ROW_STATS = 12


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
    parts: torch.Tensor | None = None  # [N, 2]: (divergence, cross-entropy) with cfg.with_ce


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


def row_grad_coef(grad_output, valid, reduction, dtype):
    """d loss / d loss_row for every row, zero at ignored rows. No host sync."""
    n = valid.numel()
    grad_output = grad_output.to(dtype)
    if reduction == "none":
        per_row = grad_output.reshape(n)
    elif reduction == "sum":
        per_row = grad_output.expand(n)
    else:
        per_row = (grad_output / valid.sum().clamp(min=1)).expand(n)
    return torch.where(valid, per_row, torch.zeros_like(per_row))


class DivergenceFunction(torch.autograd.Function):
    """Returns (loss, divergence part, cross-entropy part), each reduced; the parts (None
    without cross-entropy) are for logging and carry no gradient."""

    @staticmethod
    def forward(ctx, student, teacher, valid, cfg, backend, reduction, labels):
        result = backend.forward(as_rows(student), as_rows(teacher), valid, cfg, False, labels)
        ctx.save_for_backward(student, teacher, result.row_stats, valid, labels)
        ctx.cfg, ctx.backend, ctx.reduction = cfg, backend, reduction
        lead = student.shape[:-1]
        loss = reduce_rows(result.loss, valid, reduction, lead)
        if result.parts is None:
            return loss, None, None
        divergence, cross_entropy = (reduce_rows(result.parts[:, k], valid, reduction, lead)
                                     for k in (0, 1))
        ctx.mark_non_differentiable(divergence, cross_entropy)
        return loss, divergence, cross_entropy

    @staticmethod
    def backward(ctx, grad_output, _grad_divergence, _grad_cross_entropy):
        student, teacher, row_stats, valid, labels = ctx.saved_tensors
        coef = row_grad_coef(grad_output, valid, ctx.reduction, row_stats.dtype)
        grad = ctx.backend.backward(
            as_rows(student), as_rows(teacher), row_stats, coef, ctx.cfg, labels
        )
        return grad.view(student.shape), None, None, None, None, None, None
