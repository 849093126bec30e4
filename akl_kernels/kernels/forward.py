"""Forward kernel: per-row loss and the statistics its backward needs (one program per row)."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from akl_kernels.autograd import N_ROW_STATS, HeadRows, RowResult
from akl_kernels.kernels import heuristics
from akl_kernels.kernels.row_passes import (
    head_gaps,
    head_threshold,
    pointwise_sums,
    softmax_kl_stats,
)

# Columns of the head-statistics buffer (AKL only).
_HEAD_GAP, _TAIL_GAP, _HEAD_WEIGHT, _HEAD_MASS = range(4)


@triton.jit
def _divergence_forward_kernel(
    s_ptr,
    t_ptr,
    valid_ptr,
    loss_ptr,
    stats_ptr,
    head_ptr,
    count_ptr,
    labels_ptr,
    parts_ptr,
    V,
    stride_s,
    stride_t,
    inv_t,
    fkl_weight,  # FKL / RKL / mixed KL: the fixed weight of FKL; AKL ignores it
    pointwise,  # 0: the KL family; else the pointwise divergence's code (pointwise_terms)
    param,
    log_wp,
    log_wq,
    t_scale,  # T
    kd_ratio,
    mu,
    span,
    include_crossing,
    HEAD_SPLIT: tl.constexpr,
    POINTWISE: tl.constexpr,  # the pointwise family (its sweep and code compiled in)
    WITH_CE: tl.constexpr,  # distillation_loss's fused cross-entropy (one more exp per entry)
    BLOCK: tl.constexpr,
    SEARCH_BLOCK: tl.constexpr,
    PIVOTS: tl.constexpr,
    N_STATS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    stats_row = stats_ptr + row * N_STATS
    if tl.load(valid_ptr + row) != 0:
        m_s, sum_s, m_t, sum_t, fkl, rkl, p_c, q_c, bad, sum_1 = softmax_kl_stats(
            s_row, t_row, V, inv_t, t_scale, WITH_CE, BLOCK
        )
        logz_s = tl.log(sum_s)
        logz_t = tl.log(sum_t)
        w_f = fkl_weight
        if HEAD_SPLIT:
            u_star = tl.full([], float("-inf"), tl.float32)  # mu = 1: everything is head
            n_ties = V
            if (mu < 1.0) & (bad == 0):
                u_star, above, thr = head_threshold(
                    t_row, V, inv_t, m_t, mu, span, SEARCH_BLOCK, PIVOTS
                )
                # Ties at u* enter (in index order) while the cumulative mass stays <= thr.
                e_star = tl.exp(u_star - m_t).to(tl.float64)
                n_fit = tl.floor((thr - above) / e_star)
                n_ties = tl.minimum(tl.maximum(n_fit, 0.0), V).to(tl.int32) + include_crossing
                n_ties = tl.where(u_star >= m_t, tl.maximum(n_ties, 1), n_ties)  # top token
            head_gap, tail_gap, head_count, head_mass = head_gaps(
                s_row, t_row, V, inv_t, m_s, logz_s, m_t, logz_t, u_star, n_ties, BLOCK
            )
            total = head_gap + tail_gap
            w_f = tl.where(total > 0, head_gap / tl.where(total > 0, total, 1.0), 0.5)
            head_row = head_ptr + row * 4
            tl.store(head_row + 0, head_gap)
            tl.store(head_row + 1, tail_gap)
            tl.store(head_row + 2, w_f)
            tl.store(head_row + 3, head_mass)
            tl.store(count_ptr + row, head_count)
        w_r = 1.0 - w_f
        loss = w_f * fkl + w_r * rkl
        h_sum = tl.zeros([], tl.float32)
        if POINTWISE:
            loss, h_sum = pointwise_sums(
                s_row, t_row, V, inv_t, m_s, logz_s, m_t, logz_t, pointwise, param, log_wp,
                log_wq, BLOCK,
            )
        loss = tl.where(bad == 0, loss, float("nan"))
        logz_1 = logz_s
        if WITH_CE:  # (1 - kd_ratio) * CE(student at T = 1, label) + kd_ratio * loss
            z_label = tl.load(s_row + tl.load(labels_ptr + row)).to(tl.float32) * inv_t
            logz_1 = tl.log(sum_1)
            ce = (m_s - z_label) * t_scale + logz_1
            tl.store(parts_ptr + row * 2, loss)
            tl.store(parts_ptr + row * 2 + 1, ce)
            loss = kd_ratio * loss + (1.0 - kd_ratio) * ce
        tl.store(loss_ptr + row, loss)
        # Column order of akl_kernels.autograd: M_S, LOGZ_S, M_T, LOGZ_T, RKL, P_C, Q_C, W_F,
        # W_R, H_SUM
        tl.store(stats_row + 0, m_s)
        tl.store(stats_row + 1, logz_s)
        tl.store(stats_row + 2, m_t)
        tl.store(stats_row + 3, logz_t)
        tl.store(stats_row + 4, rkl)
        tl.store(stats_row + 5, p_c)
        tl.store(stats_row + 6, q_c)
        tl.store(stats_row + 7, w_f)
        tl.store(stats_row + 8, w_r)
        tl.store(stats_row + 9, h_sum)
        tl.store(stats_row + 10, m_s * t_scale)
        tl.store(stats_row + 11, logz_1)
    else:
        tl.store(loss_ptr + row, 0.0)
        for col in tl.static_range(N_STATS):
            tl.store(stats_row + col, 0.0)


def pointwise_args(cfg) -> tuple:
    """(code, param, log w_p, log w_q) of the kernels' pointwise arguments for ``cfg``."""
    weight_p = {"jsd": cfg.param, "skew_fkl": cfg.param, "skew_rkl": 1.0 - cfg.param}.get(
        cfg.kind, 0.5)
    log = lambda w: math.log(w) if w > 0 else float("-inf")  # noqa: E731
    return cfg.pointwise_code, cfg.param, log(weight_p), log(1.0 - weight_p)


def search_span(vocab: int, mu: float) -> float:
    """Bound on m_t - u* in logits (head_split.py gives the argument), plus rounding slack."""
    return math.log(vocab / (1.0 - mu)) + 2.0 if mu < 1.0 else 0.0


def forward(s2d, t2d, valid, cfg, with_head_stats, labels=None) -> RowResult:
    n_rows, vocab = s2d.shape
    device = s2d.device
    loss = torch.empty(n_rows, dtype=torch.float32, device=device)
    stats = torch.empty(n_rows, N_ROW_STATS, dtype=torch.float32, device=device)
    head_split = cfg.needs_head_split
    # Zero-filled: ignored rows are never written by the kernel.
    head = torch.zeros(n_rows if head_split else 1, 4, dtype=torch.float32, device=device)
    count = torch.zeros(n_rows if head_split else 1, dtype=torch.int32, device=device)
    parts = torch.zeros(n_rows if cfg.with_ce else 1, 2, dtype=torch.float32, device=device)
    if labels is None:  # never read without WITH_CE; int64 keeps one compiled signature
        labels = torch.zeros(1, dtype=torch.int64, device=device)
    if n_rows > 0:
        launch = heuristics.forward_launch(vocab, head_split)
        _divergence_forward_kernel[(n_rows,)](
            s2d,
            t2d,
            valid.to(torch.int8),
            loss,
            stats,
            head,
            count,
            labels,
            parts,
            vocab,
            s2d.stride(0),
            t2d.stride(0),
            1.0 / cfg.temperature,
            cfg.fkl_weight,
            *pointwise_args(cfg),
            cfg.temperature,
            cfg.kd_ratio,
            cfg.mu,
            search_span(vocab, cfg.mu),
            int(cfg.include_crossing),
            HEAD_SPLIT=head_split,
            POINTWISE=cfg.pointwise_code != 0,
            WITH_CE=cfg.with_ce,
            N_STATS=N_ROW_STATS,
            **launch,
        )
    head_rows = None
    if with_head_stats and head_split:
        head_rows = HeadRows(
            head[:, _HEAD_GAP],
            head[:, _TAIL_GAP],
            head[:, _HEAD_WEIGHT],
            count.to(torch.int64),
            head[:, _HEAD_MASS],
        )
    return RowResult(loss, stats, head_rows, parts if cfg.with_ce else None)
