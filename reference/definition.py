"""SPEC section 2, line by line, in float64 with a full stable sort.

Readable rather than fast: every function below follows one numbered rule of the SPEC, and
gradients come from autograd. The package's backends are tested against these functions.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class ReferenceHeadTailStats(NamedTuple):
    head_gap: torch.Tensor
    tail_gap: torch.Tensor
    head_weight: torch.Tensor
    head_count: torch.Tensor
    head_mass: torch.Tensor


def _scaled64(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    # SPEC 2: z = logits / T, computed here in float64 whatever the input dtype.
    return logits.to(torch.float64) / temperature


def reference_head_mask(
    teacher_logits: torch.Tensor,
    *,
    mu: float = 0.5,
    include_crossing: bool = False,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Boolean mask of the teacher's head, shape of ``teacher_logits`` (SPEC 2, AKL split)."""
    p = torch.softmax(_scaled64(teacher_logits.detach(), temperature), dim=-1)
    # 1. order: p descending, stable, so equal p keep the lower vocabulary index first.
    p_sorted, order = torch.sort(p, dim=-1, descending=True, stable=True)
    # 2. inclusive cumulative mass. Normalised by its own last entry so that the final c_k is
    #    exactly 1 (the sum of p rounds to 1 +- 1e-16); mu = 1 then keeps every token.
    c = torch.cumsum(p_sorted, dim=-1)
    c = c / c[..., -1:]
    # 3. head = order[0] plus every order[k] with c_k <= mu (official rule); with
    #    include_crossing the first token whose c_k exceeds mu joins: c_{k-1} <= mu.
    if include_crossing:
        c_before = torch.cat([torch.zeros_like(c[..., :1]), c[..., :-1]], dim=-1)
        head_sorted = c_before <= mu
    else:
        head_sorted = c <= mu
    head_sorted[..., 0] = True
    return torch.zeros_like(head_sorted).scatter(-1, order, head_sorted)


class _RowTerms(NamedTuple):
    fkl: torch.Tensor
    rkl: torch.Tensor
    p: torch.Tensor
    q: torch.Tensor


def _row_terms(student_logits, teacher_logits, temperature) -> _RowTerms:
    zs = _scaled64(student_logits, temperature)
    zt = _scaled64(teacher_logits.detach(), temperature)
    log_q = torch.log_softmax(zs, dim=-1)
    log_p = torch.log_softmax(zt, dim=-1)
    q, p = log_q.exp(), log_p.exp()
    # Contributing positions C: both logits differ from -inf. NaN and +inf stay in C so they
    # propagate into the loss (SPEC 2). The logs are zeroed outside C *before* the product so
    # that neither the value nor autograd ever meets 0 * inf.
    contributing = (zs != float("-inf")) & (zt != float("-inf"))
    log_q_c = torch.where(contributing, log_q, torch.zeros_like(log_q))
    log_p_c = torch.where(contributing, log_p, torch.zeros_like(log_p))
    fkl = (p * (log_p_c - log_q_c)).sum(-1)  # FKL = sum_C p (log p - log q)
    rkl = (q * (log_q_c - log_p_c)).sum(-1)  # RKL = sum_C q (log q - log p)
    return _RowTerms(fkl, rkl, p, q)


def _gap_weights(p, q, head):
    # 4. gaps on probabilities; 5. weights, 0.5 each when the gaps are both zero.
    err = (p - q).abs()
    head_gap = torch.where(head, err, torch.zeros_like(err)).sum(-1)
    tail_gap = torch.where(head, torch.zeros_like(err), err).sum(-1)
    total = head_gap + tail_gap
    safe_total = torch.where(total > 0, total, torch.ones_like(total))
    head_weight = torch.where(total > 0, head_gap / safe_total, torch.full_like(total, 0.5))
    return head_gap, tail_gap, head_weight


def reference_head_tail_stats(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    mu: float = 0.5,
    include_crossing: bool = False,
    temperature: float = 1.0,
) -> ReferenceHeadTailStats:
    terms = _row_terms(student_logits.detach(), teacher_logits, temperature)
    head = reference_head_mask(
        teacher_logits, mu=mu, include_crossing=include_crossing, temperature=temperature
    )
    head_gap, tail_gap, head_weight = _gap_weights(terms.p, terms.q, head)
    head_mass = torch.where(head, terms.p, torch.zeros_like(terms.p)).sum(-1)
    return ReferenceHeadTailStats(head_gap, tail_gap, head_weight, head.sum(-1), head_mass)


def _reduce(rows, labels, ignore_index, reduction):
    if labels is None:
        valid = torch.ones(rows.shape, dtype=torch.bool, device=rows.device)
    else:
        valid = labels != ignore_index
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1)


def reference_loss(
    kind: str,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    mu: float = 0.5,
    include_crossing: bool = False,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> torch.Tensor:
    """``kind`` in {"fkl", "rkl", "akl"}; float64 result, differentiable in the student."""
    terms = _row_terms(student_logits, teacher_logits, temperature)
    if kind == "fkl":
        rows = terms.fkl
    elif kind == "rkl":
        rows = terms.rkl
    elif kind == "akl":
        head = reference_head_mask(
            teacher_logits, mu=mu, include_crossing=include_crossing, temperature=temperature
        )
        _, _, w_head = _gap_weights(terms.p.detach(), terms.q.detach(), head)
        # 6. AKL = w_head FKL + w_tail RKL with the weights held constant.
        rows = w_head * terms.fkl + (1.0 - w_head) * terms.rkl
    else:
        raise ValueError(f"kind must be 'fkl', 'rkl' or 'akl', got {kind!r}")
    return _reduce(rows, labels, ignore_index, reduction)


def reference_fkl(student_logits, teacher_logits, labels=None, **kwargs):
    return reference_loss("fkl", student_logits, teacher_logits, labels, **kwargs)


def reference_rkl(student_logits, teacher_logits, labels=None, **kwargs):
    return reference_loss("rkl", student_logits, teacher_logits, labels, **kwargs)


def reference_akl(student_logits, teacher_logits, labels=None, **kwargs):
    return reference_loss("akl", student_logits, teacher_logits, labels, **kwargs)
