"""docs/contract.md §6 (sparse teachers) in float64, by its formulas: the k tokens' and the
rest's probabilities written out, then section 2's divergences on those categories.

The student's probabilities come from a full float64 softmax over the vocabulary; its rest mass
is the sum of its probabilities outside the k tokens (a mask, not a difference); the head is
found by a full stable sort of the k tokens. Gradients come from autograd.
"""

from __future__ import annotations

import torch

from akl_kernels import HeadTailStats
from akl_kernels.topk_teacher import TopKTeacher
from reference.definition import (
    RowTerms,
    divergence_rows,
    gap_weights,
    reduce_rows,
    scaled64,
    with_cross_entropy,
)


def category_log_probs(student_logits, teacher: TopKTeacher, temperature):
    """(log P, log Q, present, vocabulary index) of each row's categories: the k tokens, then
    in bucket mode "rest". Padding has log P = log Q = -inf."""
    log_q_full = torch.log_softmax(scaled64(student_logits, temperature), dim=-1)
    present = teacher.logprobs != float("-inf")
    index = torch.where(present, teacher.indices.long(), 0)
    log_p = torch.where(present, teacher.logprobs.detach().to(torch.float64), -torch.inf)
    log_q = torch.where(present, log_q_full.gather(-1, index), -torch.inf)
    if teacher.tail == "renormalize":
        log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
        log_q = log_q - torch.logsumexp(log_q, dim=-1, keepdim=True)
        return log_p, log_q, present, index
    # Rest: the teacher's 1 - sum_k p clamped at 0; the student's mass outside the k tokens.
    p_rest = (1.0 - log_p.exp().sum(-1, keepdim=True)).clamp(min=0.0)
    # Padding may point at any token (even one of the k): count the present ones per token.
    members = torch.zeros_like(log_q_full).scatter_add(-1, index, present.to(torch.float64))
    outside = members == 0
    q_rest = torch.where(outside, log_q_full.exp(), 0.0).sum(-1, keepdim=True)
    log_p = torch.cat([log_p, p_rest.log()], dim=-1)
    log_q = torch.cat([log_q, q_rest.log()], dim=-1)
    # The categories' probabilities sum to 1 (the teacher's k tokens may hold 1 + rounding).
    log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
    rest_index = torch.full_like(index[..., :1], -1)
    return log_p, log_q, torch.cat([present, present[..., :1] & False], -1), torch.cat(
        [index, rest_index], -1)


def _terms(log_p, log_q) -> RowTerms:
    contributing = (log_p != -torch.inf) & (log_q != -torch.inf)
    log_p_c = torch.where(contributing, log_p, 0.0)
    log_q_c = torch.where(contributing, log_q, 0.0)
    p, q = log_p.exp(), log_q.exp()
    return RowTerms((p * (log_p_c - log_q_c)).sum(-1), (q * (log_q_c - log_p_c)).sum(-1), p,
                     q, log_p_c, log_q_c, contributing)


def reference_sparse_head_mask(log_p, present, index, *, mu=0.5, include_crossing=False):
    """The head among the present k tokens (docs/contract.md §6): sorted by p descending, equal
    p by vocabulary index; cumulative mass (of the whole distribution: categories sum to 1)
    ``<= mu``, the top token always (with ``include_crossing`` the crossing token too); the
    rest category and padding never."""
    p = torch.where(present, log_p.exp(), -1.0)  # padding and rest sort last
    # Stable sort by index first, then by p descending: equal p keep index order.
    by_index = torch.sort(torch.where(present, index, 2**62), dim=-1, stable=True).indices
    p_by_index = p.gather(-1, by_index)
    order = by_index.gather(-1, torch.sort(p_by_index, dim=-1, descending=True,
                                           stable=True).indices)
    # Cumulative mass of the whole distribution (the rest, sorted last, included), normalised
    # by its own last entry so that it ends at 1 exactly: mu = 1 then keeps every token.
    c = torch.cumsum(log_p.exp().gather(-1, order), dim=-1)
    c = c / c[..., -1:]
    if include_crossing:
        head_sorted = torch.cat([torch.zeros_like(c[..., :1]), c[..., :-1]], dim=-1) <= mu
    else:
        head_sorted = c <= mu
    head_sorted[..., 0] = True
    head = torch.zeros_like(head_sorted).scatter(-1, order, head_sorted)
    return head & present


def reference_sparse_loss(kind, student_logits, teacher: TopKTeacher, labels=None, *, mu=0.5,
                          include_crossing=False, temperature=1.0, ignore_index=-100,
                          reduction="mean", param=0.0):
    """``reference_loss`` with a sparse teacher: the divergence on the categories."""
    log_p, log_q, present, index = category_log_probs(student_logits, teacher, temperature)
    rows = divergence_rows(kind, _terms(log_p, log_q), param, lambda: reference_sparse_head_mask(
        log_p, present, index, mu=mu, include_crossing=include_crossing))
    return reduce_rows(rows, labels, ignore_index, reduction)


def reference_sparse_head_tail_stats(student_logits, teacher: TopKTeacher, *, mu=0.5,
                                     include_crossing=False, temperature=1.0) -> HeadTailStats:
    log_p, log_q, present, index = category_log_probs(student_logits.detach(), teacher,
                                                       temperature)
    head = reference_sparse_head_mask(log_p, present, index, mu=mu,
                                      include_crossing=include_crossing)
    p, q = log_p.exp(), log_q.exp()
    head_gap, tail_gap, head_weight = gap_weights(p, q, head)
    head_mass = torch.where(head, p, 0.0).sum(-1)
    return HeadTailStats(head_gap, tail_gap, head_weight, head.sum(-1), head_mass)


def reference_sparse_distillation_loss(student_logits, teacher: TopKTeacher, labels, *,
                                       divergence="akl", kd_ratio=0.5, temperature=1.0,
                                       ignore_index=-100, reduction="mean", mu=0.5,
                                       include_crossing=False, param=0.0):
    """(loss, cross-entropy, divergence) as ``reference_distillation_loss``, sparse teacher."""
    per_row = reference_sparse_loss(
        divergence, student_logits, teacher, labels, mu=mu, include_crossing=include_crossing,
        temperature=temperature, ignore_index=ignore_index, reduction="none", param=param)
    return with_cross_entropy(per_row, student_logits, labels, kd_ratio, ignore_index,
                              reduction)
