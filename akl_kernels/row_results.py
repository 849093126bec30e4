"""What a backend computes per row, and how rows become a loss.

A backend's forward pass returns, per row, the loss and the statistics its backward pass needs
(``RowStat`` names their columns; the Triton kernels take their column indices from it too),
and for AKL the head/tail split (``HeadTailStats``). Reductions over rows are plain PyTorch
outside the custom operators, so that ``torch.compile`` traces them.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import torch


class RowStat(enum.IntEnum):
    """Columns of the per-row statistics a forward pass hands to its backward pass.

    Each model's log-normaliser is kept as (row max M, log of the shifted sum Z): log q =
    (zs - M_S) - LOGZ_S stays exact near the top even when |zs| is ~1e4 and log Z ~1e-4
    (M + log Z would round it away). M_1, LOGZ_1 are the student's at T = 1, for the fused
    cross-entropy of distillation_loss.
    """

    M_S = 0
    LOGZ_S = 1
    M_T = 2
    LOGZ_T = 3
    M_1 = 4
    LOGZ_1 = 5
    # The KL family's gradient (docs/contract.md §2): RKL, P_C = sum_C p, Q_C = sum_C q
    # and the two weights (AKL's per row, the others' fixed). A row whose divergence is NaN
    # (NaN or +inf logits, or a model with no finite logit) has RKL = NaN, so its gradient is.
    RKL = 6
    P_C = 7
    Q_C = 8
    W_F = 9
    W_R = 10
    # The pointwise family's gradient: H_SUM = sum_C q df/dq (NaN where the divergence is).
    H_SUM = 11
    # TVD's gradient from masses summed apart (no cancellation): the student's mass where
    # q > p, where q < p, and everywhere else (ties, positions outside C).
    Q_ABOVE = 12
    Q_BELOW = 13
    Q_REST = 14


N_ROW_STATS = len(RowStat)


class TopKStat(enum.IntEnum):
    """Row statistics a sparse teacher's backward pass needs beyond the categories' own
    (``RowStat``, which describe the k (+1) categories): the student's whole-vocabulary row
    maximum and log-normaliser at T, and the log of its mass outside the k tokens in the same
    units (-inf when there is none). A row with NaN or +inf student logits has M_FULL = NaN."""

    M_FULL = N_ROW_STATS
    LOGZ_FULL = N_ROW_STATS + 1
    LOGZ_REST = N_ROW_STATS + 2


N_TOPK_STATS = N_ROW_STATS + len(TopKStat)


class HeadTailStats(NamedTuple):
    """The AKL split of each row (``head_tail_stats``; the reference's too)."""

    head_gap: torch.Tensor  # sum over the head of |p - q|
    tail_gap: torch.Tensor  # sum over the tail of |p - q|
    head_weight: torch.Tensor  # head_gap / (head_gap + tail_gap), 0.5 when both are 0
    head_count: torch.Tensor  # tokens in the head (int64)
    head_mass: torch.Tensor  # teacher mass of the head


class RowResult(NamedTuple):
    loss: torch.Tensor  # [N], 0 at ignored rows
    row_stats: torch.Tensor  # [N, N_ROW_STATS] (a sparse teacher's: its own columns)
    head: HeadTailStats | None = None  # [N] each, when asked for (AKL only)
    parts: torch.Tensor | None = None  # [N, 2]: (divergence, cross-entropy) with the CE


def as_rows(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [N, V] without copying when the rows are evenly strided (e.g. x[..., :V])."""
    rows = logits.reshape(-1, logits.shape[-1])
    return rows if rows.stride(-1) == 1 else rows.contiguous()


def loss_dtype(*tensors: torch.Tensor) -> torch.dtype:
    # float32 (docs/contract.md §2); float64 inputs keep float64 so gradcheck can run.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def reduce_rows(rows: torch.Tensor, valid: torch.Tensor, reduction: str, lead_shape):
    """Per-row values (0 at ignored rows) reduced: "mean" over the valid rows, "sum", or
    "none" in the leading shape. No host sync."""
    if reduction == "none":
        return rows.reshape(lead_shape)
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1)


def mix_terms(divergence, cross_entropy, kd_ratio: float):
    """``kd_ratio * divergence + (1 - kd_ratio) * cross_entropy`` where a term of weight
    exactly 0 is not evaluated: its NaN or inf never reaches the result."""
    if kd_ratio == 1.0:
        return divergence
    if kd_ratio == 0.0:
        return cross_entropy
    return kd_ratio * divergence + (1.0 - kd_ratio) * cross_entropy
