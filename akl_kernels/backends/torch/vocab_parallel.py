"""The forward pass of a loss over vocabulary slices (docs/contract.md §7; the rounds and their
bytes: docs/vocab_parallel.md). Each rank of a process group holds a contiguous slice of the
columns of both models' logits, and every rank gets the whole vocabulary's row results.

A row's loss is made of sums along the row (``chunked.Sum``) once both models' normalisers are
known, so the pass runs in rounds, each one all-reduce of per-row values over the group:

1. MAX of each row's largest logit of both models, and of the slices' widths (which place this
   rank's columns in the vocabulary).
2. SUM of each row's ``sum exp(z - max)`` of both models (and of the student's at T = 1 with
   the label's logit, for the cross-entropy), and of its count of NaN / +inf maxima.
3. AKL only (``mu < 1``): one SUM of an [N, 2**width] histogram of the teacher's integer
   masses per digit of its key (the plan of akl_kernels/radix_split.py: 2 digits for a bf16 or
   fp16 teacher, 3 for float32, 6 for float64), then one SUM of each rank's count of tokens at
   the threshold value, [N, P], which ranks the tied tokens by global index across slices.
4. SUM of the divergence's row sums, whence the loss and the statistics.

Between the rounds each rank reads its slice in row chunks, as the single-process backend does
(``chunked.chunk_rows``), and never holds an [N, V] float32 temporary. The backward pass needs
no communication: given the whole row's statistics the gradient is elementwise, any backend's
own, with the labels shifted into the slice.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from akl_kernels import validation as checks
from akl_kernels.backends.torch import head_split
from akl_kernels.backends.torch.chunked import (
    N_SUMS,
    RowOutputs,
    Sum,
    broken_rows,
    chunk_rows,
    chunks,
    combine_sums,
    contributing_positions,
    row_groups,
    row_sums,
    scaled,
    sweep_of,
    with_broken_rows,
)
from akl_kernels.backends.torch.reductions import row_sum
from akl_kernels.radix_split import digit_plan, key_bits
from akl_kernels.row_results import N_ROW_STATS, loss_dtype
from akl_kernels.row_results import RowStat as S
from akl_kernels.vocab_shards import all_reduce_, layout_from_sizes


def _finite_or_zero(x):
    return torch.where(torch.isfinite(x), x, 0.0)


class _Normalisers:
    """Each row's max and log-normaliser of the student at T, the teacher at T and the student
    at T = 1, over the whole vocabulary (rounds 1 and 2), and the label's logit."""

    def __init__(self, s2d, t2d, group, dtype, inv_t, rows_per_chunk, labels):
        n_rows, width = s2d.shape
        rank, world = torch.distributed.get_rank(group), torch.distributed.get_world_size(group)
        # Round 1. Scaling by 1/T > 0 is monotone, so the max of the raw logits scaled is the
        # max of the scaled logits, bit for bit. A NaN or +inf maximum poisons its row: it is
        # counted apart (round 2) and kept out of the MAX.
        raw = torch.stack([s2d.amax(dim=1), t2d.amax(dim=1)], dim=1).to(dtype)
        poisoned = torch.isnan(raw) | (raw == float("inf"))
        sizes = torch.zeros(world, dtype=dtype, device=s2d.device)
        sizes[rank] = width
        first = torch.cat([torch.where(poisoned, float("-inf"), raw).view(-1), sizes])
        all_reduce_(first, "max", group)
        self.layout = layout_from_sizes(first[2 * n_rows:], rank)
        top = first[:2 * n_rows].view(n_rows, 2)
        self.m_s = _finite_or_zero(top[:, 0] * inv_t)
        self.m_t = _finite_or_zero(top[:, 1] * inv_t)
        self.m_1 = _finite_or_zero(top[:, 0])
        # Round 2: the shifted sums, the label's logit where this slice holds it (0 elsewhere),
        # the poisoned counts.
        with_ce = labels is not None
        second = torch.zeros(n_rows, 5 if with_ce else 3, dtype=dtype, device=s2d.device)
        second[:, 2] = poisoned.any(dim=1).to(dtype)
        for r0, r1 in chunks(n_rows, rows_per_chunk):
            zs = scaled(s2d[r0:r1], dtype, inv_t)
            second[r0:r1, 0] = row_sum(zs.sub_(self.m_s[r0:r1, None]).exp_())
            zt = scaled(t2d[r0:r1], dtype, inv_t)
            second[r0:r1, 1] = row_sum(zt.sub_(self.m_t[r0:r1, None]).exp_())
            if with_ce:
                s1 = s2d[r0:r1].to(dtype, copy=True)
                second[r0:r1, 3] = row_sum(s1.sub_(self.m_1[r0:r1, None]).exp_())
        if with_ce:
            self.local_labels = labels - self.layout.offset
            here = (self.local_labels >= 0) & (self.local_labels < width)
            logit = s2d.gather(1, self.local_labels.clamp(0, width - 1)[:, None])[:, 0]
            second[:, 4] = torch.where(here, logit.to(dtype), 0.0)
        all_reduce_(second, "sum", group)
        self.logz_s, self.logz_t = second[:, 0].log(), second[:, 1].log()
        self.poisoned = second[:, 2] > 0
        if with_ce:
            self.logz_1 = second[:, 3].log()
            self.cross_entropy = (self.m_1 - second[:, 4]) + self.logz_1

    def log_q(self, s_rows, rows, dtype, inv_t):
        """The student's log-probabilities of rows ``rows`` given their logits (a fresh copy)."""
        return scaled(s_rows, dtype, inv_t).sub_(self.m_s[rows, None]).sub_(
            self.logz_s[rows, None])

    def log_p(self, t_rows, rows, dtype, inv_t):
        return scaled(t_rows, dtype, inv_t).sub_(self.m_t[rows, None]).sub_(
            self.logz_t[rows, None])

    def columns(self):
        columns = {S.M_S: self.m_s, S.LOGZ_S: self.logz_s, S.M_T: self.m_t,
                   S.LOGZ_T: self.logz_t}
        if hasattr(self, "logz_1"):
            columns.update({S.M_1: self.m_1, S.LOGZ_1: self.logz_1})
        return columns


class _SlicedHead:
    """AKL's head over every slice of the rows (round 3): the threshold key v* of each row by
    the radix passes with each pass's histogram summed over the group, then the tokens at v*
    ranked by global index. ``mask(rows, keys)`` is then the head of this slice's rows."""

    def __init__(self, t2d, norms, cfg, group, dtype, inv_t, rows_per_chunk):
        self.include_everything = cfg.mu >= 1.0  # c_k <= 1 for every k: all head
        if self.include_everything:
            return
        n_rows = t2d.shape[0]
        counts = None  # the last pass's count of this rank's tokens per bin

        def histogram(shift, bits, chosen):  # one pass over this slice, summed over the group
            nonlocal counts
            hist = torch.zeros(n_rows, 1 << bits, dtype=torch.float64, device=t2d.device)
            if shift == 0:
                counts = torch.zeros_like(hist)
            for r0, r1 in chunks(n_rows, rows_per_chunk):
                keys = head_split.order_keys(t2d[r0:r1])
                log_p = norms.log_p(t2d[r0:r1], slice(r0, r1), dtype, inv_t)
                masses = head_split.integer_masses(log_p.exp_())
                if chosen is None:  # the top digit: every token is in the running
                    hist[r0:r1] = head_split.top_digit_histogram(keys, masses, shift, bits)
                    continue
                live = head_split.RunningTokens.of_block(keys, masses, chosen[r0:r1],
                                                         shift + bits)
                hist[r0:r1] = head_split.digit_histogram(live.rows, live.keys, live.masses,
                                                         shift, bits, r1 - r0)
                if counts is not None:
                    counts[r0:r1] = head_split.digit_histogram(
                        live.rows, live.keys, torch.ones_like(live.masses), shift, bits,
                        r1 - r0)
            return all_reduce_(hist, "sum", group)

        found = head_split.radix_passes(
            digit_plan(key_bits(t2d.dtype)), histogram,
            lambda hist: head_split.mass_threshold(hist.sum(dim=1), cfg.mu))
        # The tokens at v*: this rank's count per row, every rank's by the tie round.
        rank = torch.distributed.get_rank(group)
        ties = torch.zeros(n_rows, torch.distributed.get_world_size(group),
                           dtype=torch.float64, device=t2d.device)
        at = found.digit[:, None]
        ties[:, rank] = counts.gather(1, at)[:, 0]
        all_reduce_(ties, "sum", group)
        self.key = found.key
        self.before = ties[:, :rank].sum(dim=1)  # tied tokens in the slices before this one
        self.fit = head_split.tied_head_size(found.thr, found.above,
                                             found.hist.gather(1, at)[:, 0], ties.sum(dim=1),
                                             cfg.include_crossing)

    def mask(self, rows, t_rows):
        keys = head_split.order_keys(t_rows)
        if self.include_everything:
            return torch.ones_like(keys, dtype=torch.bool)
        key = self.key[rows, None].to(keys.dtype)
        at = keys == key
        tied_rank = at.cumsum(dim=1) + self.before[rows, None]
        return (keys > key) | (at & (tied_rank <= self.fit[rows, None]))


def _sliced_sums(s2d, t2d, norms, head, cfg, dtype, inv_t, rows_per_chunk):
    """[N, N_SUMS]: the ``Sum`` columns of this slice's part of every row."""
    n_rows = s2d.shape[0]
    sums = torch.zeros(n_rows, N_SUMS, dtype=dtype, device=s2d.device)
    for r0, r1 in chunks(n_rows, rows_per_chunk):
        log_q = norms.log_q(s2d[r0:r1], slice(r0, r1), dtype, inv_t)
        log_p = norms.log_p(t2d[r0:r1], slice(r0, r1), dtype, inv_t)
        for rows, finite in row_groups(log_q, log_p):
            out = torch.arange(r0, r1, device=s2d.device)[rows]
            contributing = None
            if not finite:
                contributing = contributing_positions(log_q[rows], log_p[rows])
            head_of = None
            if head is not None:
                head_of = lambda p, out=out: head.mask(out, t2d[out])  # noqa: E731
            columns = row_sums(log_p[rows], log_q[rows], contributing, head_of, cfg,
                               totals=True)
            for column, values in columns.items():
                sums[out, column] = values
    return sums


def forward(s2d, t2d, valid, cfg, group, *, labels=None, head_stats=False, check_values=True):
    """Like ``chunked.forward`` for this rank's slices ``s2d``, ``t2d`` [N, V_rank] of the
    rows, with ``labels`` global token ids: every row's results over the whole vocabulary, and
    the labels shifted into this slice (for the backward pass; None without them)."""
    n_rows, width = s2d.shape
    dtype = loss_dtype(s2d, t2d)
    inv_t = 1.0 / cfg.temperature
    rows_per_chunk = chunk_rows(width, dtype, sweep_of(cfg.kind), s2d.device.type)
    norms = _Normalisers(s2d, t2d, group, dtype, inv_t, rows_per_chunk,
                         labels if cfg.with_ce else None)
    if cfg.with_ce and check_values:
        checks.check_class_labels(labels, valid, norms.layout.vocab)
    head = None
    if cfg.needs_head_split:
        head = _SlicedHead(t2d, norms, cfg, group, dtype, inv_t, rows_per_chunk)
    sums = _sliced_sums(s2d, t2d, norms, head, cfg, dtype, inv_t, rows_per_chunk)
    all_reduce_(sums, "sum", group)  # round 4
    loss_rows, columns, split = combine_sums(dict(zip(Sum, sums.unbind(1), strict=True)), cfg)
    columns.update(norms.columns())
    broken = broken_rows(norms.poisoned, norms.logz_s, norms.logz_t)
    loss_rows = with_broken_rows(loss_rows, columns, broken)
    outputs = RowOutputs.empty(n_rows, N_ROW_STATS, dtype, s2d.device, cfg, head_stats)
    outputs.store(torch.arange(n_rows, device=s2d.device), valid, loss_rows, columns, split,
                  cfg, norms.cross_entropy if cfg.with_ce else None)
    return outputs.result(), (norms.local_labels if cfg.with_ce else None)


class SlicedBackend(NamedTuple):
    """A backend whose forward pass is ``forward`` above over ``group`` (its rounds per call)
    and whose backward pass is ``inner``'s, elementwise given the whole rows' statistics: what
    the fused linear sweeps call on row chunks of a vocabulary slice's logits."""

    inner: Any  # a backends.interface.Backend
    group: Any  # a torch.distributed.ProcessGroup

    def forward(self, student, teacher, valid, cfg, *, labels=None, head_stats=False):
        return forward(student, teacher, valid, cfg, self.group, labels=labels,
                       head_stats=head_stats, check_values=False)[0]

    def backward(self, *args, **kwargs):
        return self.inner.backward(*args, **kwargs)
