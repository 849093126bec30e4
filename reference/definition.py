"""docs/contract.md §2, line by line, in float64 with a full stable sort.

Readable rather than fast: every function below follows one numbered rule of docs/contract.md, and
gradients come from autograd. The package's backends are tested against these functions.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from akl_kernels import HeadTailStats  # the container only: no computation is shared


def scaled64(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    # docs/contract.md §2: z = logits / T, computed here in float64 whatever the input dtype.
    return logits.to(torch.float64) / temperature


def reference_head_mask(
    teacher_logits: torch.Tensor,
    *,
    mu: float = 0.5,
    include_crossing: bool = False,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Boolean mask of the teacher's head, shape of ``teacher_logits`` (docs/contract.md §2,
    the AKL split)."""
    p = torch.softmax(scaled64(teacher_logits.detach(), temperature), dim=-1)
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


class RowTerms(NamedTuple):
    fkl: torch.Tensor
    rkl: torch.Tensor
    p: torch.Tensor
    q: torch.Tensor
    log_p: torch.Tensor  # 0 outside C
    log_q: torch.Tensor  # 0 outside C
    contributing: torch.Tensor


def _row_terms(student_logits, teacher_logits, temperature) -> RowTerms:
    zs = scaled64(student_logits, temperature)
    zt = scaled64(teacher_logits.detach(), temperature)
    log_q = torch.log_softmax(zs, dim=-1)
    log_p = torch.log_softmax(zt, dim=-1)
    q, p = log_q.exp(), log_p.exp()
    # Contributing positions C: both logits differ from -inf. NaN and +inf stay in C so they
    # propagate into the loss (docs/contract.md §2). The logs are zeroed outside C *before* the
    # product so
    # that neither the value nor autograd ever meets 0 * inf.
    contributing = (zs != float("-inf")) & (zt != float("-inf"))
    log_q_c = torch.where(contributing, log_q, torch.zeros_like(log_q))
    log_p_c = torch.where(contributing, log_p, torch.zeros_like(log_p))
    fkl = (p * (log_p_c - log_q_c)).sum(-1)  # FKL = sum_C p (log p - log q)
    rkl = (q * (log_q_c - log_p_c)).sum(-1)  # RKL = sum_C q (log q - log p)
    return RowTerms(fkl, rkl, p, q, log_p_c, log_q_c, contributing)


def _log_mixture(log_p, log_q, weight_p):
    """log(weight_p p + (1 - weight_p) q), in log space (no 0 * log 0 for tiny masses)."""
    log_w = lambda w: math.log(w) if w > 0 else -math.inf  # noqa: E731
    return torch.logaddexp(log_p + log_w(weight_p), log_q + log_w(1.0 - weight_p))


def _pointwise_rows(kind, terms, param):
    """The divergences of the family summed over C: JSD(beta), skew FKL / RKL, TVD."""
    log_p, log_q, p, q = terms.log_p, terms.log_q, terms.p, terms.q
    if kind == "jsd":  # beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q
        log_m = _log_mixture(log_p, log_q, param)
        values = param * p * (log_p - log_m) + (1.0 - param) * q * (log_q - log_m)
    elif kind == "skew_fkl":  # KL(p || m), m = lam p + (1 - lam) q
        values = p * (log_p - _log_mixture(log_p, log_q, param))
    elif kind == "skew_rkl":  # KL(q || m), m = (1 - lam) p + lam q
        values = q * (log_q - _log_mixture(log_p, log_q, 1.0 - param))
    else:  # tvd: 0.5 sum |p - q|
        values = 0.5 * (p - q).abs()
    return torch.where(terms.contributing, values, torch.zeros_like(values)).sum(-1)


def gap_weights(p, q, head):
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
) -> HeadTailStats:
    terms = _row_terms(student_logits.detach(), teacher_logits, temperature)
    head = reference_head_mask(
        teacher_logits, mu=mu, include_crossing=include_crossing, temperature=temperature
    )
    head_gap, tail_gap, head_weight = gap_weights(terms.p, terms.q, head)
    head_mass = torch.where(head, terms.p, torch.zeros_like(terms.p)).sum(-1)
    return HeadTailStats(head_gap, tail_gap, head_weight, head.sum(-1), head_mass)


def reduce_rows(rows, labels, ignore_index, reduction):
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
    param: float = 0.0,
) -> torch.Tensor:
    """``kind`` in {"fkl", "rkl", "akl", "mixed_kl", "jsd", "skew_fkl", "skew_rkl", "tvd"};
    ``param`` is beta (jsd) or lam (skew and mixed KL). Float64, differentiable in the student.
    """
    terms = _row_terms(student_logits, teacher_logits, temperature)
    rows = divergence_rows(kind, terms, param, lambda: reference_head_mask(
        teacher_logits, mu=mu, include_crossing=include_crossing, temperature=temperature))
    return reduce_rows(rows, labels, ignore_index, reduction)


def divergence_rows(kind, terms: RowTerms, param, head_mask):
    """Each row's divergence ``kind`` from its terms; ``head_mask()`` gives AKL's head."""
    if kind == "jsd" and param in (0.0, 1.0):
        # TRL / Liger-Kernel convention: JSD(0) = FKL, JSD(1) = RKL.
        kind = "fkl" if param == 0.0 else "rkl"
    if kind == "fkl":
        return terms.fkl
    if kind == "rkl":
        return terms.rkl
    if kind == "mixed_kl":
        return (1.0 - param) * terms.fkl + param * terms.rkl
    if kind in ("jsd", "skew_fkl", "skew_rkl", "tvd"):
        return _pointwise_rows(kind, terms, param)
    if kind == "akl":
        _, _, w_head = gap_weights(terms.p.detach(), terms.q.detach(), head_mask())
        # 6. AKL = w_head FKL + w_tail RKL with the weights held constant.
        return w_head * terms.fkl + (1.0 - w_head) * terms.rkl
    raise ValueError(f"unknown divergence {kind!r}")


def reference_fkl(student_logits, teacher_logits, labels=None, **kwargs):
    return reference_loss("fkl", student_logits, teacher_logits, labels, **kwargs)


def reference_rkl(student_logits, teacher_logits, labels=None, **kwargs):
    return reference_loss("rkl", student_logits, teacher_logits, labels, **kwargs)


def reference_akl(student_logits, teacher_logits, labels=None, **kwargs):
    return reference_loss("akl", student_logits, teacher_logits, labels, **kwargs)


def reference_distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    divergence: str = "akl",
    kd_ratio: float = 0.5,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: str = "mean",
    mu: float = 0.5,
    include_crossing: bool = False,
    param: float = 0.0,
):
    """(loss, cross-entropy, divergence), each reduced: ``(1 - kd_ratio) CE + kd_ratio D`` with
    the cross-entropy of the unscaled student logits (T = 1) against ``labels``."""
    per_row = reference_loss(
        divergence, student_logits, teacher_logits, labels, mu=mu,
        include_crossing=include_crossing, temperature=temperature, ignore_index=ignore_index,
        reduction="none", param=param,
    )
    return with_cross_entropy(per_row, student_logits, labels, kd_ratio, ignore_index,
                              reduction)


def with_cross_entropy(divergence_per_row, student_logits, labels, kd_ratio, ignore_index,
                       reduction):
    """(loss, cross-entropy, divergence), each reduced, from the divergence's rows: the
    cross-entropy of the unscaled student logits (T = 1) against ``labels``, mixed in."""
    log_q1 = torch.log_softmax(student_logits.to(torch.float64), dim=-1)
    valid = labels != ignore_index
    target = torch.where(valid, labels, torch.zeros_like(labels))
    ce_rows = -log_q1.gather(-1, target[..., None])[..., 0]
    rows = kd_ratio * divergence_per_row + (1.0 - kd_ratio) * ce_rows
    return tuple(reduce_rows(x, labels, ignore_index, reduction)
                 for x in (rows, ce_rows, divergence_per_row))
