"""Sparse (top-k) teachers on the chunked PyTorch backend (docs/contract.md §6; the design:
docs/topk_teacher.md).

A loss against a ``TopKTeacher`` is a loss between two distributions over few *categories*:
the k tokens (and, in ``"bucket"`` mode, one "rest" category holding each model's mass outside
them). Per row chunk, one pass over the student's logits gives its normaliser and its mass
outside the k tokens (``student_side``); the categories' log-probabilities then go through the
dense backend's own row computation (``chunked.group_results``), so every divergence, AKL's
split and the -inf / NaN rules are the dense ones. Backward maps the categories' gradient back
to the vocabulary: a token among the k gets its category's, a token outside gets the rest
category's in proportion to its share of the student's rest mass (``dense_gradient``).

The pieces between the two sweeps work on ``[rows, k + 1]`` tensors only; the Triton backend
reuses them around its own sweeps.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from akl_kernels.backends.torch import head_split
from akl_kernels.backends.torch.chunked import (
    RowOutputs,
    add_cross_entropy_grad,
    chunk_rows,
    chunks,
    cross_entropy,
    divergence_grad,
    group_results,
    row_groups,
)
from akl_kernels.backends.torch.reductions import row_sum
from akl_kernels.row_results import N_ROW_STATS, N_TOPK_STATS, TopKStat, loss_dtype
from akl_kernels.row_results import RowStat as S

NEG_INF = float("-inf")


def prepare(indices, logprobs, cfg):
    """[N, k] rows of a sparse teacher -> (indices safe to gather and scatter with, present
    mask, log-probabilities). AKL's tie rule orders equal probabilities by vocabulary index:
    its rows are sorted by index. Padding (-inf) never contributes; its index is replaced by
    the row's first present token's (a row without one: token 0), so that a scatter over all
    k entries writes each token one value only (``fill_values``)."""
    present = logprobs != NEG_INF
    if cfg.needs_head_split:
        indices, order = torch.where(present, indices, indices.new_full((), 2**62)).sort(dim=1)
        logprobs, present = logprobs.gather(1, order), present.gather(1, order)
    return _fill_indices(indices, present), present, logprobs


def _fill_indices(indices, present):
    first = present.to(torch.int8).argmax(dim=1, keepdim=True)  # 0 in a row without any
    stand_in = torch.where(present.any(dim=1, keepdim=True), indices.gather(1, first), 0)
    return torch.where(present, indices, stand_in)


def fill_values(values, present, current):
    """[R, k] values to scatter at ``prepare``'s indices: a padding entry repeats what its
    stand-in gets (the row's first present entry's value, or, in a row without any, the
    ``current`` value at token 0, so that nothing changes there)."""
    any_present = present.any(dim=1, keepdim=True)
    first = present.to(torch.int8).argmax(dim=1, keepdim=True)
    stand_in = torch.where(any_present, values.gather(1, first), current)
    return torch.where(present, values, stand_in)


class StudentSide(NamedTuple):
    """What one sweep over the student's row gives a sparse teacher's loss, per row."""

    zs_k: torch.Tensor  # [R, k] the scaled logits at the k tokens
    m: torch.Tensor  # the row max of the scaled logits (0 where it is not finite)
    logz: torch.Tensor  # log sum exp(zs - m) over the vocabulary
    logz_rest: torch.Tensor  # the same outside the present k tokens (-inf: nothing there)
    broken: torch.Tensor  # a NaN or +inf logit: the row's loss and gradient are NaN


def gathered_scaled(logits, indices, dtype, inv_t):
    """The k tokens' ``logits / T`` [R, k] in ``dtype`` (as every sweep scales them; "+ 0.0"
    makes -0.0 +0.0)."""
    return logits.gather(1, indices).to(dtype) * inv_t + 0.0


def shifted_into(out, logits, shift, inv_t):
    """``logits / T - shift`` (``shift`` [R, 1]) in ``out``'s dtype, in one elementwise pass."""
    if inv_t == 1.0:
        return torch.sub(logits, shift, out=out)
    return torch.add(-shift, logits, alpha=inv_t, out=out)


def student_side(logits, work, indices, present, inv_t) -> StudentSide:
    """One sweep over a chunk's student ``logits``, with ``work`` (its shape, the compute
    dtype) as scratch. The mass outside the k tokens is summed there (the k tokens set to -inf
    first), never taken as a difference of near-equal numbers."""
    dtype = work.dtype
    m_raw = logits.amax(dim=1).to(dtype) * inv_t  # the max of logits / T (rounding is monotone)
    m = torch.where(torch.isfinite(m_raw), m_raw, 0.0)
    zs_k = gathered_scaled(logits, indices, dtype, inv_t)
    z_in = row_sum(torch.where(present, (zs_k - m[:, None]).exp(), 0.0))
    shifted = shifted_into(work, logits, m[:, None], inv_t)
    outside = shifted.scatter_(1, indices, fill_values(
        torch.full_like(zs_k, NEG_INF), present, shifted[:, :1]))
    z_rest = row_sum(outside.exp_())
    broken = torch.isnan(m_raw) | (m_raw == float("inf"))
    return StudentSide(zs_k, m, (z_in + z_rest).log(), z_rest.log(), broken)


def categories(zs_k, logprobs, present, m, logz, logz_rest, tail):
    """Both models' category logits [R, k (+1)]: log-probabilities over the k tokens and the
    rest (bucket), or the k tokens' own logits to be renormalised (renormalize); padding -inf
    in both."""
    dtype = zs_k.dtype
    log_p = torch.where(present, logprobs.to(dtype), NEG_INF)
    if tail == "renormalize":
        return torch.where(present, zs_k, NEG_INF), log_p
    log_q = torch.where(present, zs_k - m[:, None] - logz[:, None], NEG_INF)
    held = row_sum(log_p.exp(), dtype=torch.float64)
    log_p_rest = (1.0 - held).clamp_(min=0.0).log().to(dtype)
    return (torch.cat([log_q, (logz_rest - logz)[:, None]], dim=1),
            torch.cat([log_p, log_p_rest[:, None]], dim=1))


def head_function(logprobs, present, cfg):
    """``head_of(p)`` for the categories: AKL's head among the k tokens, by their
    log-probabilities in their own dtype; the rest category, if any, always tail (its mass
    still counts in the cumulative sum, so k tokens holding less than mu are all head). The
    split is ``head_split``'s by a sort: k entries per row are too few for radix histograms
    (the same head bit for bit, tests/test_head_split.py)."""
    keys_source = torch.where(present, logprobs, NEG_INF)
    k = logprobs.shape[1]

    def head_of(p):
        if cfg.tail == "renormalize":
            return head_split.head_mask_by_sort(keys_source, p, cfg.mu,
                                                cfg.include_crossing) & present
        total = head_split.integer_masses(p).sum(dim=1)
        head = head_split.head_mask_by_sort(keys_source, p[:, :k], cfg.mu,
                                            cfg.include_crossing, total=total)
        return torch.cat([head & present, torch.zeros_like(present[:, :1])], dim=1)

    return head_of


def store_rows(outputs, out, student: StudentSide, logprobs, present, valid, cfg,
               cross_entropy_rows=None):
    """The categories' losses, statistics and AKL split of the rows ``out`` (an index tensor)
    into ``outputs`` (chunked.RowOutputs); ``cross_entropy_rows`` is (CE, M_1, LOGZ_1)."""
    zs_cat, zt_cat = categories(student.zs_k, logprobs, present, student.m, student.logz,
                                student.logz_rest, cfg.tail)
    for rows, finite in row_groups(zs_cat, zt_cat):
        head_of = head_function(logprobs[rows], present[rows], cfg)
        loss_rows, columns, head = group_results(zs_cat[rows], zt_cat[rows], head_of, finite,
                                                 cfg)
        broken = student.broken[rows]
        loss_rows = torch.where(broken, float("nan"), loss_rows)
        columns[TopKStat.M_FULL] = torch.where(broken, float("nan"), student.m[rows])
        columns[TopKStat.LOGZ_FULL] = student.logz[rows]
        columns[TopKStat.LOGZ_REST] = student.logz_rest[rows]
        ce = None
        if cross_entropy_rows is not None:
            ce, columns[S.M_1], columns[S.LOGZ_1] = (x[rows] for x in cross_entropy_rows)
        outputs.store(out[rows], valid, loss_rows, columns, head, cfg, ce)


def forward(s2d, indices, logprobs, valid, cfg, *, labels=None, head_stats=False):
    n_rows, vocab = s2d.shape
    dtype = loss_dtype(s2d, logprobs)
    inv_t = 1.0 / cfg.temperature
    indices, present, logprobs = prepare(indices, logprobs, cfg)
    outputs = RowOutputs.empty(n_rows, N_TOPK_STATS, dtype, s2d.device, cfg, head_stats)
    # The vocabulary-sized sweep in row chunks; the categories' work, [N, k + 1], at once
    # (per chunk its many small operations would cost more than the sweep).
    # One working buffer for every chunk: a fresh allocation per chunk would be handed back to
    # the OS and faulted in again each time (glibc trims freed memory; docs/results.md).
    rows_per_chunk = chunk_rows(vocab, dtype, "topk", s2d.device.type)
    work = s2d.new_empty(min(rows_per_chunk, n_rows), vocab, dtype=dtype)
    sides, ces = [], []
    for r0, r1 in chunks(n_rows, rows_per_chunk):
        sides.append(student_side(s2d[r0:r1], work[:r1 - r0], indices[r0:r1], present[r0:r1],
                                  inv_t))
        if cfg.with_ce:
            ces.append(cross_entropy(s2d[r0:r1].to(dtype, copy=True), labels[r0:r1]))
    if n_rows:
        student = StudentSide(*(torch.cat(column) for column in zip(*sides, strict=True)))
        ce = tuple(torch.cat(column) for column in zip(*ces, strict=True)) if ces else None
        store_rows(outputs, torch.arange(n_rows, device=s2d.device), student, logprobs,
                   present, valid, cfg, ce)
    return outputs.result()


def category_gradient(zs_k, logprobs, present, st, coef, cfg):
    """coef * d loss / d (category logits) [R, k (+1)] from the forward's statistics."""
    zs_cat, zt_cat = categories(zs_k, logprobs, present, st[:, TopKStat.M_FULL],
                                st[:, TopKStat.LOGZ_FULL], st[:, TopKStat.LOGZ_REST], cfg.tail)
    g = torch.zeros_like(zs_cat)
    for rows, finite in row_groups(zs_cat, zt_cat):
        g[rows] = divergence_grad(zs_cat[rows], zt_cat[rows], st[rows, :N_ROW_STATS],
                                  coef[rows], cfg, finite)
    return g


def dense_gradient(out, logits, indices, present, st, g_cat, tail, inv_t):
    """The vocabulary's gradient of a chunk of student ``logits``, written into ``out``: the
    rest category's share ``g_rest * q_j / Q_rest`` outside the k tokens (bucket; 0 when
    renormalising), then each present token's category gradient at its index."""
    k = indices.shape[1]
    if tail == "bucket":
        logz_rest = st[:, TopKStat.LOGZ_REST, None]
        # q_j / Q_rest = exp(zs_j - M - log Z_rest) <= 1 outside the k tokens; the k tokens'
        # entries (which may overflow) are overwritten below.
        shift = st[:, TopKStat.M_FULL, None] + torch.where(torch.isfinite(logz_rest),
                                                           logz_rest, 0.0)
        g = shifted_into(out, logits, shift, inv_t).exp_().mul_(g_cat[:, k:])
    else:
        g = out.zero_()
    return g.scatter_(1, indices, fill_values(g_cat[:, :k], present, g[:, :1]))


def block_tokens(indices, present, column_offset, width):
    """The k tokens as seen by a block of ``width`` vocabulary columns from
    ``column_offset``: (indices into the block, present there)."""
    local = indices - column_offset
    here = present & (local >= 0) & (local < width)
    return _fill_indices(local, here), here


def unit_category_gradient(s2d, indices, logprobs, row_stats, cfg):
    """d loss / d (category logits) [N, k (+1)] for a unit ``grad_output`` (the divergence's
    weight and 1/T included), in ``prepare``'s order: a fused linear loss keeps it from its
    forward sweep, where the k tokens' logits are at hand, for its backward's vocabulary
    blocks."""
    indices, present, logprobs = prepare(indices, logprobs, cfg)
    inv_t = 1.0 / cfg.temperature
    unit = torch.full_like(row_stats[:, 0], cfg.divergence_weight * inv_t)
    return category_gradient(gathered_scaled(s2d, indices, row_stats.dtype, inv_t), logprobs,
                             present, row_stats, unit, cfg)


def backward(s2d, indices, logprobs, row_stats, coef, cfg, *, labels=None, grad_dtype=None,
             category_grad=None, column_offset=0):
    """The gradient of rows ``s2d``; with ``category_grad`` (``unit_category_gradient``)
    ``s2d`` may be the block of the vocabulary's columns from ``column_offset`` (labels shifted
    by it), as the fused linear losses' backward sweeps it."""
    n_rows, vocab = s2d.shape
    dtype = row_stats.dtype
    inv_t = 1.0 / cfg.temperature
    indices, present, logprobs = prepare(indices, logprobs, cfg)
    grad = torch.empty((n_rows, vocab), dtype=grad_dtype or s2d.dtype, device=s2d.device)
    divergence_coef = coef * (cfg.divergence_weight * inv_t)  # d zs / d s = 1/T
    with_divergence, with_ce = cfg.divergence_weight != 0, cfg.cross_entropy_weight != 0
    if with_divergence:
        if category_grad is None:
            category_grad = category_gradient(gathered_scaled(s2d, indices, dtype, inv_t),
                                              logprobs, present, row_stats, divergence_coef,
                                              cfg)
        else:
            category_grad = category_grad * coef[:, None]
    # Where the gradient has the compute dtype it is formed in place, chunk by chunk; else in
    # one working buffer reused by every chunk (docs/results.md: glibc trims freed memory).
    rows_per_chunk = chunk_rows(vocab, dtype, "topk", s2d.device.type)
    in_place = grad.dtype == dtype
    work = None if in_place else s2d.new_empty(min(rows_per_chunk, n_rows), vocab, dtype=dtype)
    for r0, r1 in chunks(n_rows, rows_per_chunk):
        idx, here, st = indices[r0:r1], present[r0:r1], row_stats[r0:r1]
        out = grad[r0:r1] if in_place else work[:r1 - r0]
        if with_divergence:
            g = dense_gradient(out, s2d[r0:r1], *block_tokens(idx, here, column_offset, vocab),
                               st, category_grad[r0:r1], cfg.tail, inv_t)
        else:
            g = out.zero_()
        if with_ce:
            g = add_cross_entropy_grad(g, s2d[r0:r1].to(dtype, copy=True), st, labels[r0:r1],
                                       coef[r0:r1] * cfg.cross_entropy_weight)
        # A row with NaN or +inf student logits has a NaN gradient (its loss is NaN); an
        # ignored row exactly 0 (whatever its logits).
        dead = coef[r0:r1] == 0
        broken = torch.isnan(st[:, TopKStat.M_FULL]) & ~dead
        if bool((dead | broken).any()):
            g[broken] = float("nan")
            g[dead] = 0.0
        if g.data_ptr() != grad[r0:r1].data_ptr():
            grad[r0:r1] = g
    return grad
