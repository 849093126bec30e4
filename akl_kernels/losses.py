"""Public losses on logits (docs/contract.md §3): check, pick a backend, run the custom
operator, reduce the rows."""

from __future__ import annotations

from typing import NamedTuple

import torch

from akl_kernels import validation as checks
from akl_kernels import vocab_shards
from akl_kernels.backends import resolve_backend
from akl_kernels.config import make_config
from akl_kernels.divergence_op import divergence_rows
from akl_kernels.row_results import HeadTailStats, as_rows, loss_dtype, reduce_rows
from akl_kernels.topk_teacher import TopKTeacher


class DistillationOutput(NamedTuple):
    """``distillation_loss(..., return_parts=True)``: the loss and its two parts, each reduced
    like the loss; the parts carry no gradient (they are for logging)."""

    loss: torch.Tensor
    cross_entropy: torch.Tensor
    divergence: torch.Tensor


def valid_rows(labels, ignore_index, n_rows, device):
    """[N] bool: the rows whose label is not ``ignore_index`` (all rows without labels)."""
    if labels is None:
        return torch.ones(n_rows, dtype=torch.bool, device=device)
    return (labels != ignore_index).reshape(n_rows)


class TeacherRows(NamedTuple):
    """A teacher as the custom operators take it: [N, V] logits, or a sparse teacher's [N, k]
    log-probabilities with their [N, k] int64 indices."""

    values: torch.Tensor
    indices: torch.Tensor | None


def check_teacher(student_logits, teacher_logits) -> None:
    """The student's logits and a teacher given as logits or as a ``TopKTeacher``."""
    if isinstance(teacher_logits, TopKTeacher):
        checks.check_float_tensor("student_logits", student_logits)
        checks.check_topk_teacher(teacher_logits, student_logits)
    else:
        checks.check_logit_pair(student_logits, teacher_logits)


def teacher_rows(teacher_logits) -> TeacherRows:
    if isinstance(teacher_logits, TopKTeacher):
        indices, logprobs = teacher_logits.reshape_rows()
        return TeacherRows(logprobs, indices)
    return TeacherRows(as_rows(teacher_logits), None)


def tail_of(teacher_logits) -> str:
    return teacher_logits.tail if isinstance(teacher_logits, TopKTeacher) else ""


def teacher_tensors(teacher_logits) -> tuple[torch.Tensor, ...]:
    """The teacher's float tensors (what picks and checks a backend)."""
    if isinstance(teacher_logits, TopKTeacher):
        return (teacher_logits.logprobs,)
    return () if teacher_logits is None else (teacher_logits,)


def local_inputs(student_logits, teacher_logits, labels, process_group):
    """The tensors a loss computes on and its group's name ("" for one process): DTensor
    logits become this rank's slices (vocab_shards.local_inputs)."""
    student_logits, teacher_logits, labels, process_group = vocab_shards.local_inputs(
        student_logits, teacher_logits, labels, process_group)
    checks.check_topk_teacher_ungrouped(teacher_logits, process_group)
    return student_logits, teacher_logits, labels, vocab_shards.group_name(process_group)


def divergence_loss(student_logits, teacher_logits, labels=None, *, divergence="akl",
                    temperature=1.0, ignore_index=-100, reduction="mean", backend="auto",
                    check_values=True, process_group=None, **divergence_options):
    """Any divergence of the library by name (``divergence`` as in ``distillation_loss``, its
    options by keyword); ``fkl_loss`` ... ``tvd_loss`` are this with the name fixed.

    Every loss takes the teacher as logits or as a ``TopKTeacher`` (its top-k
    log-probabilities: docs/contract.md §6); with ``check_values=True`` a sparse teacher's
    indices and log-probabilities are checked (one host sync).

    Every loss takes ``process_group``: given one, the logits' last dimension is this rank's
    contiguous slice of the vocabulary (slices in rank order, of any widths), ``labels`` hold
    global token ids, the loss returned on every rank is the whole vocabulary's and the
    gradient this slice's (docs/contract.md §7). Logits given as DTensors sharded on the last
    dimension take that path by themselves."""
    cfg = make_config(divergence, divergence_options, temperature=temperature,
                      tail=tail_of(teacher_logits))
    student_logits, teacher_logits, labels, group = local_inputs(
        student_logits, teacher_logits, labels, process_group)
    check_teacher(student_logits, teacher_logits)
    checks.check_reduction(reduction)
    checks.check_labels(labels, student_logits, ignore_index)
    checks.check_bool("check_values", check_values)
    backend = resolve_backend(backend, student_logits, *teacher_tensors(teacher_logits))
    s, teacher = as_rows(student_logits), teacher_rows(teacher_logits)
    valid = valid_rows(labels, ignore_index, s.shape[0], s.device)
    rows = divergence_rows(s, teacher.values, valid, cfg, backend=backend,
                           check_values=check_values, teacher_indices=teacher.indices,
                           process_group=group).loss
    return reduce_rows(rows, valid, reduction, student_logits.shape[:-1])


def fkl_loss(student_logits, teacher_logits, labels=None, *, temperature=1.0, ignore_index=-100,
             reduction="mean", backend="auto", check_values=True, process_group=None):
    """Forward KL(p || q), teacher p, student q, per token, reduced (options as ``akl_loss``)."""
    return divergence_loss(student_logits, teacher_logits, labels, divergence="fkl",
                           temperature=temperature, ignore_index=ignore_index,
                           reduction=reduction, backend=backend, check_values=check_values,
                           process_group=process_group)


def rkl_loss(student_logits, teacher_logits, labels=None, *, temperature=1.0, ignore_index=-100,
             reduction="mean", backend="auto", check_values=True, process_group=None):
    """Reverse KL(q || p), teacher p, student q, per token, reduced (options as ``akl_loss``)."""
    return divergence_loss(student_logits, teacher_logits, labels, divergence="rkl",
                           temperature=temperature, ignore_index=ignore_index,
                           reduction=reduction, backend=backend, check_values=check_values,
                           process_group=process_group)


def jsd_loss(student_logits, teacher_logits, labels=None, *, beta=0.5, temperature=1.0,
             ignore_index=-100, reduction="mean", backend="auto", check_values=True,
             process_group=None):
    """Generalised Jensen-Shannon divergence ``beta KL(p || m) + (1 - beta) KL(q || m)`` with
    ``m = beta p + (1 - beta) q`` (teacher p, student q). ``beta = 0`` is FKL and ``beta = 1``
    is RKL, the convention of TRL's GKD and Liger-Kernel (the formula itself tends to 0 at both
    ends). Options as ``akl_loss``."""
    return divergence_loss(student_logits, teacher_logits, labels, divergence="jsd", beta=beta,
                           temperature=temperature, ignore_index=ignore_index,
                           reduction=reduction, backend=backend, check_values=check_values,
                           process_group=process_group)


def skew_fkl_loss(student_logits, teacher_logits, labels=None, *, lam=0.1, temperature=1.0,
                  ignore_index=-100, reduction="mean", backend="auto", check_values=True,
                  process_group=None):
    """DistiLLM's skew forward KL: ``KL(p || lam p + (1 - lam) q)``; ``lam = 0`` is FKL."""
    return divergence_loss(student_logits, teacher_logits, labels, divergence="skew_fkl",
                           lam=lam, temperature=temperature, ignore_index=ignore_index,
                           reduction=reduction, backend=backend, check_values=check_values,
                           process_group=process_group)


def skew_rkl_loss(student_logits, teacher_logits, labels=None, *, lam=0.1, temperature=1.0,
                  ignore_index=-100, reduction="mean", backend="auto", check_values=True,
                  process_group=None):
    """DistiLLM's skew reverse KL: ``KL(q || (1 - lam) p + lam q)``; ``lam = 0`` is RKL."""
    return divergence_loss(student_logits, teacher_logits, labels, divergence="skew_rkl",
                           lam=lam, temperature=temperature, ignore_index=ignore_index,
                           reduction=reduction, backend=backend, check_values=check_values,
                           process_group=process_group)


def tvd_loss(student_logits, teacher_logits, labels=None, *, temperature=1.0, ignore_index=-100,
             reduction="mean", backend="auto", check_values=True, process_group=None):
    """Total variation distance ``0.5 * sum |p - q|`` (its gradient is a subgradient: 0 where
    p = q). Options as ``akl_loss``."""
    return divergence_loss(student_logits, teacher_logits, labels, divergence="tvd",
                           temperature=temperature, ignore_index=ignore_index,
                           reduction=reduction, backend=backend, check_values=check_values,
                           process_group=process_group)


def mixed_kl_loss(student_logits, teacher_logits, labels=None, *, lam=0.5, temperature=1.0,
                  ignore_index=-100, reduction="mean", backend="auto", check_values=True,
                  process_group=None):
    """``(1 - lam) * FKL + lam * RKL`` with fixed weights (the AKL paper's FKL+RKL baseline)."""
    return divergence_loss(student_logits, teacher_logits, labels, divergence="mixed_kl",
                           lam=lam, temperature=temperature, ignore_index=ignore_index,
                           reduction=reduction, backend=backend, check_values=check_values,
                           process_group=process_group)


def akl_loss(student_logits, teacher_logits, labels=None, *, mu=0.5, include_crossing=False,
             temperature=1.0, ignore_index=-100, reduction="mean", backend="auto",
             check_values=True, process_group=None):
    """Adaptive KL (Wu et al., COLING 2025): ``w_head * FKL + w_tail * RKL`` per token.

    The teacher's head is its smallest set of top tokens with cumulative mass ``<= mu`` (the top
    token always; ``include_crossing=True`` adds the token that crosses ``mu``); the weights are
    the student's share of ``sum |p - q|`` on the head and on the tail, held constant for
    differentiation. Logits are divided by ``temperature``; no ``T**2`` factor is applied.
    Returns float32 (float64 for float64 inputs); ``reduction`` is "mean" over rows whose label
    differs from ``ignore_index``, "sum", or "none" (leading shape, 0 at ignored rows).
    ``check_values``: as ``divergence_loss`` (a sparse teacher's values are checked).
    ``process_group``: vocabulary slices, as ``divergence_loss``.
    """
    return divergence_loss(student_logits, teacher_logits, labels, divergence="akl", mu=mu,
                           include_crossing=include_crossing, temperature=temperature,
                           ignore_index=ignore_index, reduction=reduction, backend=backend,
                           check_values=check_values, process_group=process_group)


def distillation_loss(student_logits, teacher_logits, labels, *, divergence="akl",
                      kd_ratio=0.5, temperature=1.0, ignore_index=-100, reduction="mean",
                      backend="auto", return_parts=False, check_values=True,
                      process_group=None, **divergence_options):
    """The MiniLLM / AKL-paper objective: ``(1 - kd_ratio) * CE(student, labels) +
    kd_ratio * divergence(student, teacher)`` per token, reduced over the rows whose label is
    not ``ignore_index``.

    The hard-label cross-entropy is taken on the unscaled student logits (T = 1) and fused into
    the divergence's passes: the logits are not read again for it. A term whose weight is 0
    (``kd_ratio`` 0 or 1) is not evaluated into the loss or its gradient. ``divergence`` is any
    of "akl", "fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd", "mixed_kl", with its options
    by keyword (``mu``, ``include_crossing`` for AKL; ``beta`` for JSD; ``lam`` for the skew and
    mixed KLs). ``return_parts=True`` returns ``DistillationOutput(loss, cross_entropy,
    divergence)``. With ``check_values=True`` the labels are checked to index the vocabulary
    (one host sync); False skips that. At ``kd_ratio = 0`` the teacher may be None: the loss is
    the cross-entropy alone. No ``T**2`` factor is applied. ``process_group``: vocabulary
    slices, as ``divergence_loss`` (the labels are global token ids).
    """
    cfg = make_config(divergence, divergence_options, temperature=temperature,
                      kd_ratio=kd_ratio, tail=tail_of(teacher_logits))
    if teacher_logits is None and cfg.kd_ratio == 0.0 and isinstance(student_logits, torch.Tensor):
        # The cross-entropy alone: the student's own logits stand in for the teacher's, whose
        # term has weight 0 (no copy: a detached view).
        teacher_logits = student_logits.detach()
    student_logits, teacher_logits, labels, group = local_inputs(
        student_logits, teacher_logits, labels, process_group)
    check_teacher(student_logits, teacher_logits)
    checks.check_reduction(reduction)
    if labels is None:
        raise ValueError("labels are required: they are the cross-entropy's targets")
    checks.check_labels(labels, student_logits, ignore_index)
    checks.check_bool("return_parts", return_parts)
    checks.check_bool("check_values", check_values)
    backend = resolve_backend(backend, student_logits, *teacher_tensors(teacher_logits))
    s, teacher = as_rows(student_logits), teacher_rows(teacher_logits)
    valid = valid_rows(labels, ignore_index, s.shape[0], s.device)
    result = divergence_rows(s, teacher.values, valid, cfg, backend=backend,
                             labels=labels.reshape(-1).to(torch.int64),
                             check_values=check_values, teacher_indices=teacher.indices,
                             process_group=group)
    lead = student_logits.shape[:-1]
    loss = reduce_rows(result.loss, valid, reduction, lead)
    if not return_parts:
        return loss
    divergence_part, ce_part = (reduce_rows(result.parts[:, k], valid, reduction, lead)
                                for k in (0, 1))
    return DistillationOutput(loss, ce_part, divergence_part)


@torch.no_grad()
def head_tail_stats(student_logits, teacher_logits, *, mu=0.5, include_crossing=False,
                    temperature=1.0, backend="auto", check_values=True,
                    process_group=None) -> HeadTailStats:
    """The AKL split of every row (no gradient): gaps, head weight, head size and mass. The
    teacher may be a ``TopKTeacher`` (its head is chosen among its k tokens). With
    ``process_group`` (vocabulary slices, as ``divergence_loss``) the split is the whole
    vocabulary's, on every rank."""
    cfg = make_config("akl", dict(mu=mu, include_crossing=include_crossing),
                      temperature=temperature, tail=tail_of(teacher_logits))
    student_logits, teacher_logits, _, group = local_inputs(student_logits, teacher_logits,
                                                            None, process_group)
    check_teacher(student_logits, teacher_logits)
    checks.check_bool("check_values", check_values)
    backend = resolve_backend(backend, student_logits, *teacher_tensors(teacher_logits))
    s, teacher = as_rows(student_logits), teacher_rows(teacher_logits)
    valid = valid_rows(None, None, s.shape[0], s.device)
    head = divergence_rows(s, teacher.values, valid, cfg, backend=backend, head_stats=True,
                           check_values=check_values, teacher_indices=teacher.indices,
                           process_group=group).head
    lead = student_logits.shape[:-1]
    dtype = loss_dtype(student_logits, *teacher_tensors(teacher_logits))
    return HeadTailStats(*(column.reshape(lead) if column.dtype == torch.int64
                           else column.to(dtype).reshape(lead) for column in head))
