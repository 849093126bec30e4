"""The AKL algorithm as the paper's authors published it, restated (not copied).

What makes it "official-style", and what the benchmarks measure as the baseline:
- float32 softmax and log-softmax of both models, several full ``N x V`` float32 copies;
- an *unstable* full descending sort of the teacher's probabilities per row;
- the inclusive cumulative sum ``> mu`` marks the tail, the top token is forced into the head;
- the gap weights are computed on detached probabilities;
- positions where the student's logit is infinite are zeroed in both KL terms;
- the loss is the token mean over ``labels != -100``.

It agrees with ``reference.definition`` on tie-free finite inputs (tests/test_reference.py);
with ties its unstable sort may pick another head, and where the two gaps are both zero its
weights are 0/0 = NaN. Those are the differences the contract (docs/contract.md) fixes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _gap_ratios(teacher_logits, student_logits, mu):
    p = F.softmax(teacher_logits, dim=-1, dtype=torch.float32)
    q = F.softmax(student_logits.detach(), dim=-1, dtype=torch.float32)
    p_sorted, order = p.sort(dim=-1, descending=True)
    q_sorted = q.gather(-1, order)
    err = (p_sorted - q_sorted).abs()
    in_tail = p_sorted.cumsum(dim=-1) > mu
    in_tail[..., 0] = False
    head_gap = err.masked_fill(in_tail, 0.0).sum(-1)
    tail_gap = err.masked_fill(~in_tail, 0.0).sum(-1)
    return head_gap / (head_gap + tail_gap), tail_gap / (head_gap + tail_gap)


def _kl_rows(target_logits, model_logits, inf_mask):
    # sum_i target_i (log target_i - log model_i), products zeroed where inf_mask is set.
    target = F.softmax(target_logits, dim=-1, dtype=torch.float32)
    target_log = F.log_softmax(target_logits, dim=-1, dtype=torch.float32)
    model_log = F.log_softmax(model_logits, dim=-1, dtype=torch.float32)
    entropy_part = (target * target_log).masked_fill(inf_mask, 0.0).sum(-1)
    cross_part = (target * model_log).masked_fill(inf_mask, 0.0).sum(-1)
    return entropy_part - cross_part


def _token_mean(rows, labels):
    if labels is None:
        token_mask = torch.ones_like(rows)
    else:
        token_mask = (labels != -100).to(rows.dtype)
    return (rows * token_mask).sum() / token_mask.sum()


def _scaled(student_logits, teacher_logits, temperature):
    return student_logits / temperature, teacher_logits.detach() / temperature


def official_akl(student_logits, teacher_logits, labels=None, *, mu=0.5, temperature=1.0):
    """Token-mean AKL over ``labels != -100`` (all tokens when labels is None), float32."""
    student_logits, teacher_logits = _scaled(student_logits, teacher_logits, temperature)
    inf_mask = torch.isinf(student_logits)
    head_ratio, tail_ratio = _gap_ratios(teacher_logits, student_logits, mu)
    fkl = _kl_rows(teacher_logits, student_logits, inf_mask)
    rkl = _kl_rows(student_logits, teacher_logits, inf_mask)
    return _token_mean(head_ratio * fkl + tail_ratio * rkl, labels)


def official_fkl(student_logits, teacher_logits, labels=None, *, temperature=1.0):
    """The official code's forward KL term alone (its ``get_kl`` without a ratio)."""
    student_logits, teacher_logits = _scaled(student_logits, teacher_logits, temperature)
    rows = _kl_rows(teacher_logits, student_logits, torch.isinf(student_logits))
    return _token_mean(rows, labels)


def official_rkl(student_logits, teacher_logits, labels=None, *, temperature=1.0):
    """The official code's reverse KL term alone (``get_kl`` with the roles swapped)."""
    student_logits, teacher_logits = _scaled(student_logits, teacher_logits, temperature)
    rows = _kl_rows(student_logits, teacher_logits, torch.isinf(student_logits))
    return _token_mean(rows, labels)
