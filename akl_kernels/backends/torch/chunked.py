"""The exact chunked PyTorch backend (``backend="torch"``): any device, any float dtype.

Rows are processed in chunks whose float32 working set stays under ``working_set_bytes()``
(128 MiB on a GPU, 32 MiB on CPU where the caches reward smaller chunks; within the
contract's 256 MiB; ``AKL_TORCH_WORKING_SET_MB`` overrides it),
so no ``N x V`` float32 temporary ever exists. Forward keeps ``N_ROW_STATS`` numbers per row;
backward recomputes the two softmaxes chunk by chunk from them and writes the gradient in the
student's dtype. Rows whose logits are all finite take a mask-free path; the path is chosen
per row, and every operation is elementwise or a reduction along a row, so no row's result
depends on its neighbours or on the chunk size (docs/contract.md §4). (On CUDA this
fallback syncs the host once per chunk to choose paths and size the head-split candidates.)
"""

from __future__ import annotations

import enum
from typing import NamedTuple

import torch

from akl_kernels.backends.torch import cpu_heap, head_split, pointwise
from akl_kernels.backends.torch.reductions import log_sum_exp, row_sum
from akl_kernels.config import POINTWISE
from akl_kernels.row_results import (
    N_ROW_STATS,
    HeadTailStats,
    RowResult,
    loss_dtype,
    mix_terms,
)
from akl_kernels.row_results import RowStat as S
from akl_kernels.validation import environment_megabytes

DEFAULT_WORKING_SET_MB = 128
# On CPU a chunk that stays in the outer caches is faster than a bigger one, and fewer chunks
# cost less Python. Since glibc keeps the freed chunks (cpu_heap), 32 MiB beats 8 MiB on 2 cores
# (N 4096, V 32000, forward + backward timed alternately in one process): FKL 1.31-1.33x, RKL
# 1.22x, JSD 1.10-1.19x faster, both dtypes; AKL's split took 2.1-2.4 s at 32, 2.3-2.9 s at 16.
CPU_WORKING_SET_MB = 32.0
# Live [rows, V] temporaries per chunk of each kind of sweep, in units of the compute dtype:
# the KL family's forward and backward, AKL's forward with its head split (matching the peak
# the benchmark CLI measured: 639 MiB = 500 MiB gradient + ~140 MiB at 128 MiB), the pointwise
# family's, and a sparse teacher's (backends/torch/topk.py: the student's chunk and one
# temporary, the cross-entropy's copy).
_LIVE_TEMPORARIES = {"kl": 10, "head_split": 18, "pointwise": 16, "topk": 3}
# The columns of a row whose divergence is NaN that its gradient reads: NaN there makes the
# gradient row NaN too, for every divergence (loss and gradient agree about a row).
_DIVERGENCE_GRADIENT_COLUMNS = (S.RKL, S.H_SUM, S.Q_ABOVE, S.Q_BELOW, S.Q_REST)


def working_set_bytes(device_type: str = "cuda") -> int:
    default = CPU_WORKING_SET_MB if device_type == "cpu" else DEFAULT_WORKING_SET_MB
    return int(environment_megabytes("AKL_TORCH_WORKING_SET_MB", default) * 2**20)


def sweep_of(kind: str, *, backward: bool = False) -> str:
    """The kind of chunk loop (a key of ``_LIVE_TEMPORARIES``) that divergence ``kind``'s
    forward or backward pass runs (AKL's backward is the KL family's: no split)."""
    if kind in POINTWISE:
        return "pointwise"
    return "head_split" if kind == "akl" and not backward else "kl"


def chunk_rows(vocab: int, dtype: torch.dtype, sweep: str, device_type: str = "cuda") -> int:
    """Rows per chunk of a chunk loop of kind ``sweep`` (``sweep_of``, or "topk"); on CPU,
    first makes glibc keep the loop's freed temporaries for reuse (``cpu_heap``)."""
    if device_type == "cpu":
        cpu_heap.keep_freed_chunks_resident()
    per_row = vocab * torch.finfo(dtype).bits // 8 * _LIVE_TEMPORARIES[sweep]
    return max(1, working_set_bytes(device_type) // per_row)


def chunks(n_rows, rows_per_chunk):
    for start in range(0, n_rows, rows_per_chunk):
        yield start, min(start + rows_per_chunk, n_rows)


def scaled(logits, dtype, inv_t):
    """A fresh compute-dtype copy of a row chunk divided by T (the passes below consume it)."""
    if inv_t == 1.0:
        return logits.to(dtype, copy=True)
    return logits.to(dtype).mul(inv_t)


def row_groups(zs, zt):
    """Row index sets for the two paths, decided per row so no row depends on its neighbours.

    Yields (rows, finite): rows is a slice of the whole chunk or an index tensor.
    """
    # A row's sum is finite only if each of its entries is (one pass, where isfinite().all()
    # costs five); a finite row whose sum overflows takes the masked path, which is exact too.
    finite = torch.isfinite(zs.sum(dim=1)) & torch.isfinite(zt.sum(dim=1))
    n_finite = int(finite.sum())
    if n_finite == len(finite):
        yield slice(None), True
    elif n_finite == 0:
        yield slice(None), False
    else:
        yield finite.nonzero()[:, 0], True
        yield (~finite).nonzero()[:, 0], False


def _log_softmax_parts(z, with_probs=False):
    """(log softmax of z, row max, log of the shifted sum, softmax of z or None); z is shifted
    in place.

    The max is taken as 0 for rows without a finite maximum (all -inf: degenerate; +inf:
    poisoned), so no -inf - -inf arises here. ``with_probs`` keeps the sum's exponentials
    and divides them by the sum: the softmax at one division per entry, not an exponential.
    """
    m = z.amax(dim=1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, 0.0)
    shifted = z.sub_(m)
    exps = shifted.exp()
    total = row_sum(exps)
    logz = total.log()
    probs = exps.div_(total[:, None]) if with_probs else None
    return shifted.sub_(logz[:, None]), m[:, 0], logz, probs


def contributing_positions(zs, zt):
    """C: both logits differ from -inf (NaN and +inf stay in and poison the row)."""
    return (zs != float("-inf")) & (zt != float("-inf"))


def poisoned_rows(z):
    return (torch.isnan(z) | (z == float("inf"))).any(dim=1)


def broken_rows(poisoned, logz_s, logz_t):
    """Rows whose divergence is NaN: a NaN or +inf logit, or a model whose logits are all -inf
    (its log-normaliser is -inf)."""
    return poisoned | torch.isneginf(logz_s) | torch.isneginf(logz_t)


class Sum(enum.IntEnum):
    """The sums along a row that a divergence's loss and statistics are made of, given both
    models' log-probabilities. Each is a sum over the row's positions, so a vocabulary shard's
    sums add up to the whole row's (backends/torch/vocab_parallel.py)."""

    FKL = 0  # sum_C p log(p / q)
    RKL = 1  # sum_C q log(q / p)
    P_OUT = 2  # the teacher's mass outside C, and its whole mass (P_C = 1 - P_OUT / P_ALL)
    P_ALL = 3
    Q_OUT = 4
    Q_ALL = 5
    HEAD_GAP = 6  # AKL: sum over the head of |p - q|, over the row, the head's size and mass
    GAP = 7
    HEAD_COUNT = 8
    HEAD_MASS = 9
    F = 10  # the pointwise family: sum_C f, sum e (pointwise.row_terms), TVD's masses
    H_SUM = 11
    Q_ABOVE = 12
    Q_BELOW = 13
    Q_REST = 14


N_SUMS = len(Sum)


def row_sums(log_p, log_q, contributing, head_of, cfg, *, totals, p=None):
    """The ``Sum`` columns ``cfg``'s divergence needs, per row of a block: ``contributing``
    is C (None: every position), ``head_of(p)`` AKL's head mask; ``totals`` asks for P_ALL and
    Q_ALL even where every position contributes (a shard's rows need them: another shard may
    hold -inf positions); ``p`` the teacher's softmax where the caller has it
    (``teacher_probs_kept``). Consumes log_p."""
    if cfg.kind in POINTWISE:
        f, e = pointwise.row_terms(cfg.kind, log_p, log_q, cfg.param, contributing)
        sums = {Sum.F: row_sum(f), Sum.H_SUM: row_sum(e)}
        if cfg.kind == "tvd":
            sums.update(zip((Sum.Q_ABOVE, Sum.Q_BELOW, Sum.Q_REST),
                            pointwise.tvd_masses(log_p, log_q, contributing), strict=True))
        return sums
    # log q, log p, q and the log-ratio are formed per element exactly as backward forms them,
    # so terms that cancel there (RKL against q (log q - log p), a one-hot student) cancel to
    # the last bit. FKL alone needs p, RKL alone q; the masks, totals and AKL's split both.
    with_fkl, with_rkl = cfg.kind != "rkl", cfg.kind != "fkl"
    both = contributing is not None or totals or cfg.needs_head_split
    if p is None and (with_fkl or both):
        p = log_p.exp()
    q = log_q.exp() if with_rkl or both else None
    if contributing is None:
        log_ratio = log_p.sub_(log_q)  # log p - log q
    else:
        log_ratio = torch.where(contributing, log_p - log_q, 0.0)
    # The weight-0 KL is 0, not evaluated: FKL's loss never meets 0 * an infinite RKL.
    zero = lambda: torch.zeros_like(log_ratio[:, 0])  # noqa: E731
    sums = {Sum.FKL: row_sum(p * log_ratio) if with_fkl else zero(),
            Sum.RKL: -row_sum(q * log_ratio) if with_rkl else zero()}
    if contributing is not None:
        sums[Sum.P_OUT] = row_sum(torch.where(contributing, 0.0, p))
        sums[Sum.Q_OUT] = row_sum(torch.where(contributing, 0.0, q))
    if contributing is not None or totals:
        sums[Sum.P_ALL], sums[Sum.Q_ALL] = row_sum(p), row_sum(q)
    if cfg.needs_head_split:
        head = head_of(p)
        err = (p - q).abs_()
        sums[Sum.GAP] = row_sum(err)
        sums[Sum.HEAD_GAP] = row_sum(torch.where(head, err, 0.0))
        sums[Sum.HEAD_COUNT] = head.sum(dim=1).to(p.dtype)
        sums[Sum.HEAD_MASS] = row_sum(torch.where(head, p, 0.0))
    return sums


def _inside(sums, out, total):
    """1 - (mass outside C) / (whole mass): exactly 1 where every position contributes (as in
    the kernels), so identical models get an exactly zero gradient."""
    if out not in sums:
        return torch.ones_like(sums[Sum.FKL])
    return 1.0 - sums[out] / sums[total]


def combine_sums(sums, cfg):
    """(loss rows, statistics columns by RowStat, AKL split or None) from a block's ``Sum``
    columns (the normalisers' columns are the caller's)."""
    if cfg.kind in POINTWISE:
        columns = {S.H_SUM: sums[Sum.H_SUM]}
        if cfg.kind == "tvd":
            columns.update({S.Q_ABOVE: sums[Sum.Q_ABOVE], S.Q_BELOW: sums[Sum.Q_BELOW],
                            S.Q_REST: sums[Sum.Q_REST]})
        return sums[Sum.F], columns, None
    fkl, rkl = sums[Sum.FKL], sums[Sum.RKL]
    head = None
    if cfg.needs_head_split:
        total, head_gap = sums[Sum.GAP], sums[Sum.HEAD_GAP]
        head_weight = torch.where(total > 0, head_gap / torch.where(total > 0, total, 1.0), 0.5)
        head = HeadTailStats(head_gap, total - head_gap, head_weight,
                             sums[Sum.HEAD_COUNT].round().long(), sums[Sum.HEAD_MASS])
        w_f = head.head_weight
    else:
        w_f = torch.full_like(fkl, cfg.fkl_weight)
    rows = w_f * fkl + (1.0 - w_f) * rkl
    columns = {S.RKL: rkl, S.P_C: _inside(sums, Sum.P_OUT, Sum.P_ALL),
               S.Q_C: _inside(sums, Sum.Q_OUT, Sum.Q_ALL), S.W_F: w_f, S.W_R: 1.0 - w_f}
    return rows, columns, head


def with_broken_rows(loss_rows, columns, broken):
    """The loss and the gradient's columns NaN at ``broken`` rows (None: none)."""
    if broken is None:
        return loss_rows
    for column in _DIVERGENCE_GRADIENT_COLUMNS:
        columns[column] = torch.where(broken, float("nan"), columns.get(column, 0.0))
    return torch.where(broken, float("nan"), loss_rows)


def cross_entropy(s1, labels):
    """Per-row CE of unscaled student logits s1 (a fresh copy), and its (M_1, LOGZ_1)."""
    m1 = s1.amax(dim=1)
    m1 = torch.where(torch.isfinite(m1), m1, 0.0)
    logz1 = log_sum_exp(s1 - m1[:, None])
    target = s1.gather(1, labels.clamp(0, s1.shape[1] - 1)[:, None])[:, 0]
    return (m1 - target) + logz1, m1, logz1


def teacher_probs_kept(cfg, finite):
    """Whether forward may take the teacher's p from its log-sum-exp's exponentials (a division
    per entry instead of an exponential): where the gradient does not use the FKL it sums
    (dFKL = q P_C - p), so a last-bit difference from backward's exp(log p) cancels nothing.
    (AKL's split keeps exp(log p): the values the Triton radix search reproduces bit for bit.)"""
    return finite and cfg.kind in ("fkl", "mixed_kl")


def group_results(zs, zt, head_of, finite, cfg):
    """A row group's (loss rows, statistics columns by RowStat, AKL split or None), its
    broken rows' loss and gradient columns NaN; ``head_of(p)``: AKL's head mask given the
    teacher's p. Consumes zs and zt."""
    contributing = None if finite else contributing_positions(zs, zt)
    poisoned = None if finite else poisoned_rows(zs) | poisoned_rows(zt)
    log_q, m_s, logz_s, _ = _log_softmax_parts(zs)
    log_p, m_t, logz_t, p = _log_softmax_parts(zt, with_probs=teacher_probs_kept(cfg, finite))
    sums = row_sums(log_p, log_q, contributing, head_of, cfg, totals=False, p=p)
    loss_rows, columns, head = combine_sums(sums, cfg)
    columns.update({S.M_S: m_s, S.LOGZ_S: logz_s, S.M_T: m_t, S.LOGZ_T: logz_t})
    broken = None if finite else broken_rows(poisoned, logz_s, logz_t)
    return with_broken_rows(loss_rows, columns, broken), columns, head


class RowOutputs(NamedTuple):
    """The forward pass's per-row outputs, filled group by group (``store``)."""

    loss: torch.Tensor
    stats: torch.Tensor
    parts: torch.Tensor | None
    head: HeadTailStats | None

    @classmethod
    def empty(cls, n_rows, n_stats, dtype, device, cfg, head_stats):
        zeros = lambda *shape: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        head = None
        if head_stats and cfg.needs_head_split:
            head = HeadTailStats(zeros(n_rows), zeros(n_rows), zeros(n_rows),
                                 torch.zeros(n_rows, dtype=torch.int64, device=device),
                                 zeros(n_rows))
        return cls(zeros(n_rows), zeros(n_rows, n_stats), zeros(n_rows, 2) if cfg.with_ce
                   else None, head)

    def store(self, out, valid, loss_rows, columns, head, cfg, cross_entropy_rows=None):
        """Rows ``out`` (index tensor) get their loss (the CE mixed in), statistics and split."""
        row_valid = valid[out]
        if self.parts is not None:
            self.parts[out] = torch.where(row_valid[:, None],
                                          torch.stack([loss_rows, cross_entropy_rows], 1), 0.0)
            loss_rows = mix_terms(loss_rows, cross_entropy_rows, cfg.kd_ratio)
        self.loss[out] = torch.where(row_valid, loss_rows, 0.0)
        zeros = torch.zeros_like(loss_rows)
        self.stats[out] = torch.stack([columns.get(k, zeros) for k in range(self.stats.shape[1])],
                                      dim=1)
        if self.head is not None:
            for target, values in zip(self.head, head, strict=True):
                target[out] = values.to(target.dtype)

    def result(self) -> RowResult:
        return RowResult(self.loss, self.stats, self.head, self.parts)


def forward(s2d, t2d, valid, cfg, *, labels=None, head_stats=False):
    n_rows, vocab = s2d.shape
    dtype = loss_dtype(s2d, t2d)
    inv_t = 1.0 / cfg.temperature
    outputs = RowOutputs.empty(n_rows, N_ROW_STATS, dtype, s2d.device, cfg, head_stats)
    sweep = sweep_of(cfg.kind)
    for r0, r1 in chunks(n_rows, chunk_rows(vocab, dtype, sweep, s2d.device.type)):
        zs = scaled(s2d[r0:r1], dtype, inv_t)
        zt = scaled(t2d[r0:r1], dtype, inv_t)
        for rows, finite in row_groups(zs, zt):
            teacher = t2d[r0:r1][rows]
            head_of = lambda p, teacher=teacher: head_split.head_mask(  # noqa: E731
                teacher, p, cfg.mu, cfg.include_crossing)
            loss_rows, columns, head = group_results(zs[rows], zt[rows], head_of, finite, cfg)
            row_ids = torch.arange(r0, r1, device=s2d.device)[rows]
            ce = None
            if cfg.with_ce:
                ce, columns[S.M_1], columns[S.LOGZ_1] = cross_entropy(
                    s2d[r0:r1][rows].to(dtype, copy=True), labels[row_ids])
            outputs.store(row_ids, valid, loss_rows, columns, head, cfg, ce)
    return outputs.result()


def _column(st, stat):
    return st[:, stat, None]


def _finite_grad(zs, zt, st, coef, kind):
    """coef * (w_f dFKL + w_r dRKL) when every logit is finite (P_C = Q_C = 1 on a whole row;
    a vocabulary slice's may be less). Consumes both.

    = coef * (q * (w_f P_C + w_r (log q - log p + 1 - RKL - Q_C)) - w_f p), built in place;
    FKL's (w_r = 0) and RKL's (w_f = 0) without their zero terms.
    """
    col = lambda stat: _column(st, stat)  # noqa: E731
    log_q = zs.sub_(col(S.M_S)).sub_(col(S.LOGZ_S))
    log_p = zt.sub_(col(S.M_T)).sub_(col(S.LOGZ_T))
    if kind == "fkl":
        g = log_q.exp_().mul_(col(S.P_C)).sub_(log_p.exp_())
        return g.mul_(coef[:, None] * col(S.W_F))
    g = (log_q - log_p).add_(1.0 - col(S.RKL) - col(S.Q_C))
    if kind == "rkl":
        return g.mul_(log_q.exp_()).mul_(coef[:, None] * col(S.W_R))
    g.mul_(col(S.W_R)).add_(col(S.W_F) * col(S.P_C))
    g.mul_(log_q.exp_())
    g.addcmul_(log_p.exp_(), col(S.W_F), value=-1.0)
    return g.mul_(coef[:, None])


def _masked_grad(zs, zt, st, coef):
    col = lambda stat: _column(st, stat)  # noqa: E731
    contributing = contributing_positions(zs, zt)
    log_q = zs.sub_(col(S.M_S)).sub_(col(S.LOGZ_S))
    log_p = zt.sub_(col(S.M_T)).sub_(col(S.LOGZ_T))
    q, p = log_q.exp(), log_p.exp()
    # docs/contract.md §2: dFKL = q P_C - p [C]; dRKL = [C] q (log q - log p + 1)
    # - q (RKL + Q_C)
    d_fkl = q * col(S.P_C) - torch.where(contributing, p, 0.0)
    d_rkl = torch.where(contributing, q * (log_q - log_p + 1.0), 0.0)
    d_rkl -= q * (col(S.RKL) + col(S.Q_C))
    g = coef[:, None] * (col(S.W_F) * d_fkl + col(S.W_R) * d_rkl)
    return torch.where(coef[:, None] != 0, g, 0.0)


def _pointwise_grad(zs, zt, st, coef, cfg, finite):
    """coef * (e - q H_SUM): the pointwise family's gradient (pointwise.row_terms; TVD's from
    its masses). Consumes zs and zt."""
    col = lambda stat: _column(st, stat)  # noqa: E731
    contributing = None if finite else contributing_positions(zs, zt)
    log_q = zs.sub_(col(S.M_S)).sub_(col(S.LOGZ_S))
    log_p = zt.sub_(col(S.M_T)).sub_(col(S.LOGZ_T))
    if cfg.kind == "tvd":
        g = pointwise.tvd_grad(log_p, log_q, contributing,
                               *(col(k) for k in (S.Q_ABOVE, S.Q_BELOW, S.Q_REST)))
    else:
        _, e = pointwise.row_terms(cfg.kind, log_p, log_q, cfg.param, contributing)
        g = e.sub_(log_q.exp() * col(S.H_SUM))
    g = g.mul_(coef[:, None])
    return g if finite else torch.where(coef[:, None] != 0, g, 0.0)


def add_cross_entropy_grad(g, s1, st, labels, coef):
    """g += coef * (softmax(s1) - onehot(labels)), zero where coef is 0. Consumes s1.

    A label outside [0, V) has no one-hot entry here: the fused linear path passes a block of
    the vocabulary with the labels shifted by the block's start."""
    q1 = s1.sub_(st[:, S.M_1, None]).sub_(st[:, S.LOGZ_1, None]).exp_()
    in_block = (labels >= 0) & (labels < s1.shape[1])
    q1.scatter_add_(1, labels.clamp(0, s1.shape[1] - 1)[:, None],
                    -in_block[:, None].to(q1.dtype))
    return torch.where(coef[:, None] != 0, g + coef[:, None] * q1, g)


def divergence_grad(zs, zt, st, coef, cfg, finite):
    if cfg.kind in POINTWISE:
        g = _pointwise_grad(zs, zt, st, coef, cfg, finite)
    else:
        g = _finite_grad(zs, zt, st, coef, cfg.kind) if finite else _masked_grad(zs, zt, st, coef)
    if finite:
        # A row of finite logits whose statistics are not (a vocabulary slice of a row that
        # another slice poisons) gets NaN times its coefficient: exactly 0 where that is 0.
        # Checked per row: one pass over the [rows, 15] statistics, not over the logits.
        silent = (coef == 0) & ~torch.isfinite(st).all(dim=1)
        if bool(silent.any()):
            g[silent] = 0.0
    return g


def backward(s2d, t2d, row_stats, coef, cfg, *, labels=None, grad_dtype=None, out=None):
    n_rows, vocab = s2d.shape
    dtype = row_stats.dtype
    inv_t = 1.0 / cfg.temperature
    # ``out`` may be s2d itself: each chunk's rows are read (copied) before they are written.
    grad = out if out is not None else torch.empty(
        (n_rows, vocab), dtype=grad_dtype or s2d.dtype, device=s2d.device)
    sweep = sweep_of(cfg.kind, backward=True)
    # A term of weight 0 is not evaluated (its NaN must not reach the gradient).
    with_divergence, with_ce = cfg.divergence_weight != 0, cfg.cross_entropy_weight != 0
    divergence_coef = coef * (cfg.divergence_weight * inv_t)  # d zs / d s = 1/T
    for r0, r1 in chunks(n_rows, chunk_rows(vocab, dtype, sweep, s2d.device.type)):
        zs = scaled(s2d[r0:r1], dtype, inv_t)
        zt = scaled(t2d[r0:r1], dtype, inv_t)
        st, row_coef = row_stats[r0:r1], divergence_coef[r0:r1]
        for rows, finite in row_groups(zs, zt):
            if with_divergence:
                g = divergence_grad(zs[rows], zt[rows], st[rows], row_coef[rows], cfg, finite)
            else:
                g = torch.zeros_like(zs[rows])
            if with_ce:
                row_ids = torch.arange(r0, r1, device=s2d.device)[rows]
                g = add_cross_entropy_grad(g, s2d[r0:r1][rows].to(dtype, copy=True), st[rows],
                                            labels[row_ids],
                                            coef[row_ids] * cfg.cross_entropy_weight)
            if isinstance(rows, slice):
                grad[r0:r1] = g
            else:
                grad[r0 + rows] = g.to(grad.dtype)
    return grad
