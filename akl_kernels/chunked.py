"""The exact chunked PyTorch backend (``backend="torch"``): any device, any dtype.

Rows are processed in chunks whose float32 working set stays under ``working_set_bytes()``
(128 MiB by default, within the SPEC's 256 MiB; ``AKL_TORCH_WORKING_SET_MB`` overrides it),
so no ``N x V`` float32 temporary ever exists. Forward keeps ten numbers per row; backward
recomputes the two softmaxes chunk by chunk from them and writes the gradient in the
student's dtype. Rows whose logits are all finite take a mask-free path; the path is chosen
per row, so no row's result depends on its neighbours. (On CUDA this fallback syncs the host
once per chunk to choose paths and size the head-split candidates.)
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from akl_kernels import head_split, pointwise
from akl_kernels._validation import POINTWISE
from akl_kernels.autograd import (
    H_SUM,
    LOGZ_1,
    LOGZ_S,
    LOGZ_T,
    M_1,
    M_S,
    M_T,
    N_ROW_STATS,
    P_C,
    Q_C,
    RKL,
    W_F,
    W_R,
    HeadRows,
    RowResult,
    loss_dtype,
)

DEFAULT_WORKING_SET_MB = 128
# Live [rows, V] temporaries per chunk in units of the compute dtype; AKL's matches the peak
# measured by akl-bench (639 MiB = 500 MiB gradient + ~140 MiB at 128 MiB).
_LIVE_TEMPORARIES = {"fkl": 10, "rkl": 10, "mixed_kl": 10, "akl": 18,
                     **dict.fromkeys(POINTWISE, 16)}


def working_set_bytes() -> int:
    return int(float(os.environ.get("AKL_TORCH_WORKING_SET_MB", DEFAULT_WORKING_SET_MB)) * 2**20)


def chunk_rows(vocab: int, dtype: torch.dtype, kind: str) -> int:
    per_row = vocab * torch.finfo(dtype).bits // 8 * _LIVE_TEMPORARIES[kind]
    return max(1, working_set_bytes() // per_row)


def _chunks(n_rows, rows_per_chunk):
    for start in range(0, n_rows, rows_per_chunk):
        yield start, min(start + rows_per_chunk, n_rows)


def _scaled(logits, dtype, inv_t):
    """A fresh compute-dtype copy of a row chunk divided by T (the passes below consume it)."""
    return logits.to(dtype).mul(inv_t)


def _row_groups(zs, zt):
    """Row index sets for the two paths, decided per row so no row depends on its neighbours.

    Yields (rows, finite): rows is a slice of the whole chunk or an index tensor.
    """
    finite = torch.isfinite(zs).all(dim=1) & torch.isfinite(zt).all(dim=1)
    n_finite = int(finite.sum())
    if n_finite == len(finite):
        yield slice(None), True
    elif n_finite == 0:
        yield slice(None), False
    else:
        yield finite.nonzero()[:, 0], True
        yield (~finite).nonzero()[:, 0], False


class _Terms(NamedTuple):
    m_s: torch.Tensor  # row maxima and log-normalisers of the shifted logits (autograd.py)
    logz_s: torch.Tensor
    m_t: torch.Tensor
    logz_t: torch.Tensor
    fkl: torch.Tensor
    rkl: torch.Tensor
    p_c: torch.Tensor
    q_c: torch.Tensor
    p: torch.Tensor  # teacher probabilities
    q: torch.Tensor  # student probabilities
    poisoned: torch.Tensor | None  # rows holding NaN or +inf


def _log_softmax_parts(z):
    """(log softmax of z, row max, log of the shifted sum); z is shifted in place.

    The max is taken as 0 for rows without a finite maximum (all -inf: degenerate; +inf:
    poisoned), so no -inf - -inf arises here.
    """
    m = z.amax(dim=1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)
    shifted = z.sub_(m)
    logz = torch.logsumexp(shifted, dim=1)
    return shifted.sub_(logz[:, None]), m[:, 0], logz


def _finite_terms(zs, zt, keep_zt):
    """Every logit finite: C is everything, so no masks (the common case, and the fast one).

    log q, log p and the log-ratio are formed per element exactly as backward forms them, so
    terms that cancel there (RKL against q (log q - log p), a one-hot student) cancel to the
    last bit. Consumes zs (and zt unless keep_zt).
    """
    log_q, m_s, logz_s = _log_softmax_parts(zs)
    log_p, m_t, logz_t = _log_softmax_parts(zt.clone() if keep_zt else zt)
    p, q = log_p.exp(), log_q.exp()
    log_ratio = log_p.sub_(log_q)  # log p - log q
    fkl = (p * log_ratio).sum(dim=1)
    rkl = -(q * log_ratio).sum(dim=1)
    ones = torch.ones_like(fkl)
    return _Terms(m_s, logz_s, m_t, logz_t, fkl, rkl, ones, ones, p, q, None)


def _masked_terms(zs, zt, keep_zt):
    """The general case: -inf positions leave C (SPEC 2), NaN and +inf poison their row."""
    contributing = _contributing(zs, zt)
    poisoned = _poisoned(zs) | _poisoned(zt)
    log_q, m_s, logz_s = _log_softmax_parts(zs)
    log_p, m_t, logz_t = _log_softmax_parts(zt.clone() if keep_zt else zt)
    q, p = log_q.exp(), log_p.exp()
    log_ratio = torch.where(contributing, log_p - log_q, 0.0)  # log p - log q on C
    # 1 - (mass outside C): exactly 1 when every position contributes (as in the kernels),
    # so identical models get an exactly zero gradient.
    p_c = 1.0 - torch.where(contributing, 0.0, p).sum(dim=1) / p.sum(dim=1)
    q_c = 1.0 - torch.where(contributing, 0.0, q).sum(dim=1) / q.sum(dim=1)
    fkl = (p * log_ratio).sum(dim=1)
    rkl = -(q * log_ratio).sum(dim=1)
    return _Terms(m_s, logz_s, m_t, logz_t, fkl, rkl, p_c, q_c, p, q, poisoned)


def _contributing(zs, zt):
    # C: both logits differ from -inf (NaN and +inf stay in and poison the row, SPEC 2).
    return (zs != float("-inf")) & (zt != float("-inf"))


def _poisoned(z):
    return (torch.isnan(z) | (z == float("inf"))).any(dim=1)


def _head_weights(zt, p, q, cfg):
    head = head_split.head_mask(zt, p, cfg.mu, cfg.include_crossing)
    err = (p - q).abs_()
    total = err.sum(dim=1)
    head_gap = err.masked_fill_(~head, 0.0).sum(dim=1)
    head_weight = torch.where(total > 0, head_gap / torch.where(total > 0, total, 1.0), 0.5)
    head_mass = p.masked_fill(~head, 0.0).sum(dim=1)
    return HeadRows(head_gap, total - head_gap, head_weight, head.sum(dim=1), head_mass)


def _pointwise_rows(zs, zt, finite, cfg):
    """The pointwise family: D = sum_C f and H_SUM = sum_C h per row (consumes zs, zt)."""
    contributing = None if finite else _contributing(zs, zt)
    poisoned = None if finite else _poisoned(zs) | _poisoned(zt)
    log_q, m_s, logz_s = _log_softmax_parts(zs)
    log_p, m_t, logz_t = _log_softmax_parts(zt)
    f, h = pointwise.terms(cfg.kind, log_p, log_q, cfg.param)
    if contributing is not None:
        f, h = torch.where(contributing, f, 0.0), torch.where(contributing, h, 0.0)
    rows = f.sum(dim=1)
    if poisoned is not None:
        rows = torch.where(poisoned, float("nan"), rows)
    columns = {M_S: m_s, LOGZ_S: logz_s, M_T: m_t, LOGZ_T: logz_t, H_SUM: h.sum(dim=1)}
    return rows, columns, None


def _row_results(zs, zt, finite, cfg):
    """Per-row loss, statistics columns and AKL split of a block of rows (consumes zs, zt)."""
    if cfg.kind in POINTWISE:
        return _pointwise_rows(zs, zt, finite, cfg)
    row_terms = _finite_terms if finite else _masked_terms
    terms = row_terms(zs, zt, keep_zt=cfg.needs_head_split)
    head = None
    if cfg.needs_head_split:
        head = _head_weights(zt, terms.p, terms.q, cfg)
        w_f = head.head_weight
    else:
        w_f = torch.full_like(terms.fkl, cfg.fkl_weight)
    rows = w_f * terms.fkl + (1.0 - w_f) * terms.rkl
    if terms.poisoned is not None:
        rows = torch.where(terms.poisoned, float("nan"), rows)
    columns = {M_S: terms.m_s, LOGZ_S: terms.logz_s, M_T: terms.m_t, LOGZ_T: terms.logz_t,
               RKL: terms.rkl, P_C: terms.p_c, Q_C: terms.q_c, W_F: w_f, W_R: 1.0 - w_f}
    return rows, columns, head


def _cross_entropy(s1, labels):
    """Per-row CE of unscaled student logits s1 (a fresh copy), and its (M_1, LOGZ_1)."""
    m1 = s1.amax(dim=1)
    m1 = torch.where(torch.isfinite(m1), m1, 0.0)
    logz1 = torch.logsumexp(s1 - m1[:, None], dim=1)
    target = s1.gather(1, labels.clamp(0, s1.shape[1] - 1)[:, None])[:, 0]
    return (m1 - target) + logz1, m1, logz1


def forward(s2d, t2d, valid, cfg, with_head_stats, labels=None):
    n_rows, vocab = s2d.shape
    dtype = loss_dtype(s2d, t2d)
    inv_t = 1.0 / cfg.temperature
    loss = torch.zeros(n_rows, dtype=dtype, device=s2d.device)
    stats = torch.zeros(n_rows, N_ROW_STATS, dtype=dtype, device=s2d.device)
    parts = torch.zeros(n_rows, 2, dtype=dtype, device=s2d.device) if cfg.with_ce else None
    head_rows = _empty_head_rows(n_rows, dtype, s2d.device) if with_head_stats else None
    for r0, r1 in _chunks(n_rows, chunk_rows(vocab, dtype, cfg.kind)):
        zs = _scaled(s2d[r0:r1], dtype, inv_t)
        zt = _scaled(t2d[r0:r1], dtype, inv_t)
        for rows, finite in _row_groups(zs, zt):
            loss_rows, columns, head = _row_results(zs[rows], zt[rows], finite, cfg)
            out = torch.arange(r0, r1, device=s2d.device)[rows]
            row_valid = valid[out]
            if parts is not None:
                ce, columns[M_1], columns[LOGZ_1] = _cross_entropy(
                    s2d[r0:r1][rows].to(dtype, copy=True), labels[out])
                parts[out] = torch.where(row_valid[:, None], torch.stack([loss_rows, ce], 1), 0.0)
                loss_rows = cfg.kd_ratio * loss_rows + (1.0 - cfg.kd_ratio) * ce
            loss[out] = torch.where(row_valid, loss_rows, 0.0)
            zeros = torch.zeros_like(loss_rows)
            for column in (W_F, W_R, H_SUM):  # ignored rows get no gradient
                columns[column] = torch.where(row_valid, columns.get(column, zeros), 0.0)
            stats[out] = torch.stack([columns.get(k, zeros) for k in range(N_ROW_STATS)], dim=1)
            if head_rows is not None and head is not None:
                for target, values in zip(head_rows, head, strict=True):
                    target[out] = values.to(target.dtype)
    return RowResult(loss, stats, head_rows, parts)


def _empty_head_rows(n_rows, dtype, device):
    zeros = lambda: torch.zeros(n_rows, dtype=dtype, device=device)  # noqa: E731
    count = torch.zeros(n_rows, dtype=torch.int64, device=device)
    return HeadRows(zeros(), zeros(), zeros(), count, zeros())


def _finite_grad(zs, zt, st, coef):
    """coef * (w_f dFKL + w_r dRKL) when every logit is finite (P_C = Q_C = 1). Consumes both.

    = coef * (q * (w_f P_C + w_r (log q - log p + 1 - RKL - Q_C)) - w_f p), built in place.
    """
    col = lambda k: st[:, k, None]  # noqa: E731
    log_q = zs.sub_(col(M_S)).sub_(col(LOGZ_S))
    log_p = zt.sub_(col(M_T)).sub_(col(LOGZ_T))
    g = log_q - log_p
    g.add_(1.0 - col(RKL) - col(Q_C)).mul_(col(W_R)).add_(col(W_F) * col(P_C))
    g.mul_(log_q.exp_())
    g.addcmul_(log_p.exp_(), col(W_F), value=-1.0)
    return g.mul_(coef[:, None])


def _masked_grad(zs, zt, st, coef):
    col = lambda k: st[:, k, None]  # noqa: E731
    contributing = _contributing(zs, zt)
    log_q = zs.sub_(col(M_S)).sub_(col(LOGZ_S))
    log_p = zt.sub_(col(M_T)).sub_(col(LOGZ_T))
    q, p = log_q.exp(), log_p.exp()
    # SPEC 2: dFKL = q P_C - p [C]; dRKL = [C] q (log q - log p + 1) - q (RKL + Q_C)
    d_fkl = q * col(P_C) - torch.where(contributing, p, 0.0)
    d_rkl = torch.where(contributing, q * (log_q - log_p + 1.0), 0.0)
    d_rkl -= q * (col(RKL) + col(Q_C))
    g = coef[:, None] * (col(W_F) * d_fkl + col(W_R) * d_rkl)
    return torch.where(coef[:, None] != 0, g, 0.0)


def _pointwise_grad(zs, zt, st, coef, cfg, finite):
    """coef * ([C] h - q H_SUM): the pointwise family's gradient. Consumes zs and zt."""
    col = lambda k: st[:, k, None]  # noqa: E731
    contributing = None if finite else _contributing(zs, zt)
    log_q = zs.sub_(col(M_S)).sub_(col(LOGZ_S))
    log_p = zt.sub_(col(M_T)).sub_(col(LOGZ_T))
    _, h = pointwise.terms(cfg.kind, log_p, log_q, cfg.param)
    if contributing is not None:
        h = torch.where(contributing, h, 0.0)
    g = h.sub_(log_q.exp() * col(H_SUM)).mul_(coef[:, None])
    return g if finite else torch.where(coef[:, None] != 0, g, 0.0)


def _add_cross_entropy_grad(g, s1, st, labels, coef):
    """g += coef * (softmax(s1) - onehot(labels)), zero where coef is 0. Consumes s1.

    A label outside [0, V) has no one-hot entry here: the fused linear path passes a block of
    the vocabulary with the labels shifted by the block's start."""
    q1 = s1.sub_(st[:, M_1, None]).sub_(st[:, LOGZ_1, None]).exp_()
    in_block = (labels >= 0) & (labels < s1.shape[1])
    q1.scatter_add_(1, labels.clamp(0, s1.shape[1] - 1)[:, None],
                    -in_block[:, None].to(q1.dtype))
    return torch.where(coef[:, None] != 0, g + coef[:, None] * q1, g)


def backward(s2d, t2d, row_stats, coef, cfg, labels=None, grad_dtype=None):
    n_rows, vocab = s2d.shape
    dtype = row_stats.dtype
    inv_t = 1.0 / cfg.temperature
    grad = torch.empty((n_rows, vocab), dtype=grad_dtype or s2d.dtype, device=s2d.device)
    kind = cfg.kind if cfg.kind in POINTWISE else "fkl"
    divergence_coef = coef * (cfg.kd_ratio * inv_t)  # d zs / d s = 1/T
    for r0, r1 in _chunks(n_rows, chunk_rows(vocab, dtype, kind)):
        zs = _scaled(s2d[r0:r1], dtype, inv_t)
        zt = _scaled(t2d[r0:r1], dtype, inv_t)
        st, row_coef = row_stats[r0:r1], divergence_coef[r0:r1]
        for rows, finite in _row_groups(zs, zt):
            if cfg.kind in POINTWISE:
                g = _pointwise_grad(zs[rows], zt[rows], st[rows], row_coef[rows], cfg, finite)
            else:
                grad_rows = _finite_grad if finite else _masked_grad
                g = grad_rows(zs[rows], zt[rows], st[rows], row_coef[rows])
            if cfg.with_ce:
                out = torch.arange(r0, r1, device=s2d.device)[rows]
                g = _add_cross_entropy_grad(g, s2d[r0:r1][rows].to(dtype, copy=True), st[rows],
                                            labels[out], coef[out] * (1.0 - cfg.kd_ratio))
            if isinstance(rows, slice):
                grad[r0:r1] = g
            else:
                grad[r0 + rows] = g.to(grad.dtype)
    return grad
