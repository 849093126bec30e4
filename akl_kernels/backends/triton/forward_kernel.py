"""Forward kernel: per-row loss and the statistics its backward needs (one program per row)."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from akl_kernels.backends.torch.pointwise import log_weight, mixture_weight, zero_mass_slope
from akl_kernels.backends.triton import launch
from akl_kernels.backends.triton import stat_columns as stat
from akl_kernels.backends.triton.radix_split import radix_threshold
from akl_kernels.backends.triton.row_passes import (
    float_key,
    head_gaps,
    head_threshold,
    mix_terms,
    pointwise_sums,
    softmax_kl_stats,
)
from akl_kernels.row_results import N_ROW_STATS, HeadTailStats, RowResult

# Columns of the head-statistics buffer (AKL only), read back into HeadTailStats below.
_HEAD_GAP, _TAIL_GAP, _HEAD_WEIGHT, _HEAD_MASS = (tl.constexpr(k) for k in range(4))
_N_HEAD = tl.constexpr(4)


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
    reads_ptr,
    V,
    stride_s,
    stride_t,
    inv_t,
    fkl_weight,  # FKL / RKL / mixed KL: the fixed weight of FKL; AKL ignores it
    pointwise,  # 0: the KL family; else the pointwise divergence's code (pointwise_terms)
    param,
    log_wp,
    log_wq,
    a0,  # the pointwise gradient's reference value (backends/torch/pointwise.py)
    t_scale,  # T
    kd_ratio,
    mu,
    span,
    include_crossing,
    HEAD_SPLIT: tl.constexpr,
    RADIX: tl.constexpr,  # the head search: radix select (fixed reads) or the pivot search
    COUNT_READS: tl.constexpr,  # debug: store the number of reads of the teacher row
    POINTWISE: tl.constexpr,  # the pointwise family (its sweep and code compiled in)
    WITH_CE: tl.constexpr,  # distillation_loss's fused cross-entropy (one more exp per entry)
    BLOCK: tl.constexpr,
    SEARCH_BLOCK: tl.constexpr,
    PIVOTS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    t_row = t_ptr + row * stride_t
    stats_row = stats_ptr + row * stat.N_STATS
    if tl.load(valid_ptr + row) != 0:
        m_s, sum_s, m_t, sum_t, fkl, rkl, p_c, q_c, bad, sum_1 = softmax_kl_stats(
            s_row, t_row, V, inv_t, t_scale, WITH_CE, BLOCK
        )
        reads = 1
        # A model whose logits are all -inf has no distribution: the divergence is NaN, as
        # for NaN or +inf logits.
        bad = bad | (sum_s == 0.0) | (sum_t == 0.0)
        logz_s = tl.log(sum_s)
        logz_t = tl.log(sum_t)
        w_f = fkl_weight
        if HEAD_SPLIT:
            key_star = tl.full([], -2147483648, tl.int32)  # mu = 1: everything is head
            n_ties = V
            above = tl.zeros([], tl.int64)
            thr = tl.zeros([], tl.int64)
            if (mu < 1.0) & (bad == 0):
                if RADIX:
                    key_star, above, thr, sweeps = radix_threshold(
                        t_row, V, inv_t, m_t, logz_t, mu,
                        t_ptr.dtype.element_ty.primitive_bitwidth, SEARCH_BLOCK
                    )
                else:
                    u_star, mass_above, mass_thr, sweeps = head_threshold(
                        t_row, V, inv_t, m_t, mu, span, SEARCH_BLOCK, PIVOTS
                    )
                    key_star = float_key(u_star)
                    # Ties at u* enter (in index order) while the cumulative mass <= thr.
                    e_star = tl.exp(u_star - m_t).to(tl.float64)
                    n_fit = tl.floor((mass_thr - mass_above) / e_star)
                    n_ties = (tl.minimum(tl.maximum(n_fit, 0.0), V).to(tl.int32)
                              + include_crossing)
                    n_ties = tl.where(u_star >= m_t, tl.maximum(n_ties, 1), n_ties)  # top
                reads += sweeps
            head_gap, tail_gap, head_count, head_mass = head_gaps(
                s_row, t_row, V, inv_t, m_s, logz_s, m_t, logz_t, key_star, n_ties, above,
                thr, include_crossing, RADIX, BLOCK
            )
            reads += 1
            total = head_gap + tail_gap
            w_f = tl.where(total > 0, head_gap / tl.where(total > 0, total, 1.0), 0.5)
            head_row = head_ptr + row * _N_HEAD
            tl.store(head_row + _HEAD_GAP, head_gap)
            tl.store(head_row + _TAIL_GAP, tail_gap)
            tl.store(head_row + _HEAD_WEIGHT, w_f)
            tl.store(head_row + _HEAD_MASS, head_mass)
            tl.store(count_ptr + row, head_count)
        w_r = 1.0 - w_f
        loss = w_f * fkl + w_r * rkl
        h_sum = tl.zeros([], tl.float32)
        q_above = tl.zeros([], tl.float32)
        q_below = tl.zeros([], tl.float32)
        q_rest = tl.zeros([], tl.float32)
        if POINTWISE:
            loss, h_sum, q_above, q_below, q_rest = pointwise_sums(
                s_row, t_row, V, inv_t, m_s, logz_s, m_t, logz_t, pointwise, param, log_wp,
                log_wq, a0, BLOCK,
            )
            reads += 1
        if COUNT_READS:
            tl.store(reads_ptr + row, reads)
        # NaN in every column the divergence's gradient reads: its gradient row is NaN too.
        nan = float("nan")
        loss = tl.where(bad == 0, loss, nan)
        rkl = tl.where(bad == 0, rkl, nan)
        h_sum = tl.where(bad == 0, h_sum, nan)
        q_above = tl.where(bad == 0, q_above, nan)
        q_below = tl.where(bad == 0, q_below, nan)
        q_rest = tl.where(bad == 0, q_rest, nan)
        logz_1 = logz_s
        if WITH_CE:  # (1 - kd_ratio) * CE(student at T = 1, label) + kd_ratio * loss
            # Clamped: with check_values=False a bad label gives a wrong loss, never a read
            # outside the row.
            label = tl.minimum(tl.maximum(tl.load(labels_ptr + row), 0), V - 1)
            z_label = tl.load(s_row + label).to(tl.float32) * inv_t
            logz_1 = tl.log(sum_1)
            ce = (m_s - z_label) * t_scale + logz_1
            tl.store(parts_ptr + row * 2, loss)
            tl.store(parts_ptr + row * 2 + 1, ce)
            loss = mix_terms(loss, ce, kd_ratio)
        tl.store(loss_ptr + row, loss)
        tl.store(stats_row + stat.M_S, m_s)
        tl.store(stats_row + stat.LOGZ_S, logz_s)
        tl.store(stats_row + stat.M_T, m_t)
        tl.store(stats_row + stat.LOGZ_T, logz_t)
        tl.store(stats_row + stat.M_1, m_s * t_scale)
        tl.store(stats_row + stat.LOGZ_1, logz_1)
        tl.store(stats_row + stat.RKL, rkl)
        tl.store(stats_row + stat.P_C, p_c)
        tl.store(stats_row + stat.Q_C, q_c)
        tl.store(stats_row + stat.W_F, w_f)
        tl.store(stats_row + stat.W_R, w_r)
        tl.store(stats_row + stat.H_SUM, h_sum)
        tl.store(stats_row + stat.Q_ABOVE, q_above)
        tl.store(stats_row + stat.Q_BELOW, q_below)
        tl.store(stats_row + stat.Q_REST, q_rest)
    else:
        tl.store(loss_ptr + row, 0.0)
        for col in tl.static_range(stat.N_STATS):
            tl.store(stats_row + col, 0.0)


def pointwise_args(cfg) -> tuple:
    """(code, param, log w_p, log w_q, a0) of the kernels' pointwise arguments for ``cfg``
    (a0 from the one definition both backends use: backends/torch/pointwise.py)."""
    weight_p = mixture_weight(cfg.kind, cfg.param)
    a0 = zero_mass_slope(cfg.kind, cfg.param) if cfg.pointwise_code else 0.0
    return (cfg.pointwise_code, cfg.param, log_weight(weight_p), log_weight(1.0 - weight_p),
            a0)


def search_span(vocab: int, mu: float) -> float:
    """Bound on m_t - u* in logits for the pivot search, plus rounding slack.

    With ``S`` the row's mass and ``e*`` the crossing token's probability, every token below
    u* weighs less than e*, so ``(1 - mu) S <= V e*``; with ``p_max <= S`` that gives
    ``log p_max - log e* <= log(V / (1 - mu))``: tokens farther below the top logit can never
    hold the crossing.
    """
    return math.log(vocab / (1.0 - mu)) + 2.0 if mu < 1.0 else 0.0


def forward(s2d, t2d, valid, cfg, *, labels=None, head_stats=False) -> RowResult:
    return _forward(s2d, t2d, valid, cfg, labels, head_stats, launch.head_search(), None)


def teacher_reads(s2d, t2d, cfg, *, search=None) -> torch.Tensor:
    """Debug: how many times the forward kernel reads each teacher row, [N] int32 (the
    statistics sweep, the head search's sweeps, the gap sweep, the pointwise sweep). The
    counting is compiled in only here; ``search`` is "radix" or "pivot" (default: as
    forward)."""
    reads = torch.zeros(s2d.shape[0], dtype=torch.int32, device=s2d.device)
    valid = torch.ones(s2d.shape[0], dtype=torch.bool, device=s2d.device)
    _forward(s2d, t2d, valid, cfg, None, False, search or launch.head_search(), reads)
    return reads


def _forward(s2d, t2d, valid, cfg, labels, head_stats, search, reads) -> RowResult:
    n_rows, vocab = s2d.shape
    device = s2d.device
    loss = torch.empty(n_rows, dtype=torch.float32, device=device)
    stats = torch.empty(n_rows, N_ROW_STATS, dtype=torch.float32, device=device)
    head_split = cfg.needs_head_split
    # Zero-filled: ignored rows are never written by the kernel.
    head = torch.zeros(n_rows if head_split else 1, _N_HEAD.value, dtype=torch.float32,
                       device=device)
    count = torch.zeros(n_rows if head_split else 1, dtype=torch.int32, device=device)
    parts = torch.zeros(n_rows if cfg.with_ce else 1, 2, dtype=torch.float32, device=device)
    labels = launch.labels_or_dummy(labels, device)
    if n_rows > 0:
        settings = launch.forward_launch(vocab, head_split, search)
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
            count if reads is None else reads,  # written only with COUNT_READS
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
            RADIX=search == "radix",
            COUNT_READS=reads is not None,
            POINTWISE=cfg.pointwise_code != 0,
            WITH_CE=cfg.with_ce,
            **settings,
        )
    head_rows = None
    if head_stats and head_split:
        head_rows = HeadTailStats(
            head[:, _HEAD_GAP.value],
            head[:, _TAIL_GAP.value],
            head[:, _HEAD_WEIGHT.value],
            count.to(torch.int64),
            head[:, _HEAD_MASS.value],
        )
    return RowResult(loss, stats, head_rows, parts if cfg.with_ce else None)
