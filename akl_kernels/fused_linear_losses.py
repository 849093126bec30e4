"""Public fused linear losses: every divergence of the library, from the last hidden states.

``fused_linear_akl_loss(student_hidden, student_weight, labels, teacher_hidden=...,
teacher_weight=...)`` equals ``akl_loss(student_hidden @ student_weight.T, teacher_hidden @
teacher_weight.T, labels)`` with the logits computed in float32, but neither model's logits are
ever stored whole (fused_linear_sweeps.py). The teacher may also come as logits.
"""

from __future__ import annotations

from akl_kernels import validation as checks
from akl_kernels.backends import resolve_backend
from akl_kernels.config import make_config
from akl_kernels.fused_linear_op import fused_linear_rows
from akl_kernels.losses import (
    DistillationOutput,
    tail_of,
    teacher_rows,
    teacher_tensors,
    valid_rows,
)
from akl_kernels.row_results import reduce_rows
from akl_kernels.topk_teacher import TopKTeacher
from akl_kernels.vocab_shards import group_name


def _fused_linear(cfg, student_hidden, student_weight, labels, *, teacher_hidden,
                  teacher_weight, teacher_logits, student_bias, teacher_bias, ignore_index,
                  reduction, chunk_size, backend, check_values, process_group, strategy):
    """Shared body: checks, the valid rows, the custom operator, the reduction."""
    checks.check_strategy(strategy)
    group = group_name(process_group)
    checks.check_topk_teacher_ungrouped(teacher_logits, process_group)
    teacher_optional = cfg.with_ce and cfg.kd_ratio == 0.0
    checks.check_linear_inputs(student_hidden, student_weight, student_bias, teacher_hidden,
                               teacher_weight, teacher_bias, teacher_logits,
                               teacher_optional=teacher_optional)
    checks.check_reduction(reduction)
    checks.check_labels(labels, student_hidden, ignore_index)
    checks.check_chunk_size(chunk_size)
    checks.check_bool("check_values", check_values)
    teacher = dict(teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
                   teacher_bias=teacher_bias, teacher_logits=teacher_logits)
    backend = resolve_backend(backend, student_hidden, *teacher_tensors(teacher_logits),
                              *teacher_tensors(teacher_hidden))
    lead = student_hidden.shape[:-1]
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    n_rows = hidden.shape[0]
    if isinstance(teacher_logits, TopKTeacher):
        sparse = teacher_rows(teacher_logits)
        teacher.update(teacher_logits=sparse.values, teacher_indices=sparse.indices)
    if teacher_hidden is not None:
        teacher["teacher_hidden"] = teacher_hidden.reshape(n_rows, teacher_hidden.shape[-1])
    valid = valid_rows(labels, ignore_index, n_rows, hidden.device)
    flat_labels = labels.reshape(n_rows).long() if cfg.with_ce else None
    loss, parts = fused_linear_rows(hidden, student_weight, student_bias, teacher, valid, cfg,
                                    backend=backend, labels=flat_labels, chunk_size=chunk_size,
                                    check_values=check_values, process_group=group,
                                    gradient_in_forward=_in_forward(strategy, reduction))
    reduce = lambda rows: reduce_rows(rows, valid, reduction, lead)  # noqa: E731
    return reduce(loss), None if parts is None else (reduce(parts[:, 0]), reduce(parts[:, 1]))


def _in_forward(strategy, reduction) -> bool:
    """Whether the gradients are formed in the forward pass: the "forward_gradient" strategy
    (the default, "auto"), which needs one incoming gradient for every row: "mean" and "sum"
    reductions have it, "none" (a gradient per row) takes the recomputing backward."""
    return strategy != "recompute" and reduction != "none"


def fused_linear_loss(student_hidden, student_weight, labels=None, *, divergence="akl",
                      teacher_hidden=None, teacher_weight=None, teacher_logits=None,
                      student_bias=None, teacher_bias=None, temperature=1.0, ignore_index=-100,
                      reduction="mean", chunk_size=None, backend="auto", check_values=True,
                      process_group=None, strategy="auto", **divergence_options):
    """``divergence`` (any of the library's: "akl", "fkl", "rkl", "jsd", "skew_fkl",
    "skew_rkl", "tvd", "mixed_kl", with its options by keyword as in ``distillation_loss``)
    between ``student_hidden @ student_weight.T + student_bias`` and the teacher's logits, given
    as ``teacher_hidden @ teacher_weight.T + teacher_bias`` (the hidden sizes may differ) or as
    ``teacher_logits`` (logits, or a ``TopKTeacher``: then nothing of size N x V exists at
    all). Neither model's logits are stored whole; they are computed in float32
    in row chunks (``chunk_size`` rows; by default from V and a 256 MiB budget,
    ``AKL_FUSED_LINEAR_BUDGET_MB``). Gradients flow to the student's hidden states, weight and
    bias. Reductions, ``labels`` and ``ignore_index`` as in ``akl_loss``. One host sync per call
    finds the rows that are not ignored.

    ``strategy`` (docs/fused_linear.md): "forward_gradient" forms the gradients in the
    forward pass from tiles of whole rows (4 GEMMs, as many as the unfused path; the weight's
    gradient accumulated to float32 accuracy: a float32 sum for a float32 weight, a compensated
    pair in the weight's dtype for bf16/fp16, the bytes of one float32 ``V x H`` buffer);
    "recompute" computes the logits again per vocabulary block in backward
    (6 GEMMs, no ``V x H`` buffer beyond the gradient: the leanest memory). "auto" (default)
    is "forward_gradient", except with ``reduction="none"`` (a gradient per row, not known in
    forward) or without a differentiable input (no gradient work at all in forward).

    ``process_group``: the column-parallel LM head of tensor parallelism (docs/contract.md §7).
    ``student_weight`` and ``student_bias`` (and the teacher's weight and bias, or its logits)
    are this rank's contiguous slice of the vocabulary, the hidden states are replicated and
    the labels are global token ids (the same on every rank). The loss is the whole
    vocabulary's on every rank; the weight's and bias's gradients are this slice's, and the
    hidden states' gradient is this slice's partial sum, which the column-parallel layer
    all-reduces (Megatron's convention)."""
    cfg = make_config(divergence, divergence_options, temperature=temperature,
                      tail=tail_of(teacher_logits))
    loss, _ = _fused_linear(
        cfg, student_hidden, student_weight, labels, teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight, teacher_logits=teacher_logits, student_bias=student_bias,
        teacher_bias=teacher_bias, ignore_index=ignore_index, reduction=reduction,
        chunk_size=chunk_size, backend=backend, check_values=check_values,
        process_group=process_group, strategy=strategy)
    return loss


def fused_linear_akl_loss(student_hidden, student_weight, labels=None, *, mu=0.5,
                          include_crossing=False, **options):
    """Adaptive KL from hidden states: ``akl_loss`` of the two heads' logits, which are never
    stored whole. Options as ``fused_linear_loss``."""
    return fused_linear_loss(student_hidden, student_weight, labels, divergence="akl", mu=mu,
                             include_crossing=include_crossing, **options)


def fused_linear_fkl_loss(student_hidden, student_weight, labels=None, **options):
    """Forward KL from hidden states; options as ``fused_linear_loss``."""
    return fused_linear_loss(student_hidden, student_weight, labels, divergence="fkl", **options)


def fused_linear_rkl_loss(student_hidden, student_weight, labels=None, **options):
    """Reverse KL from hidden states; options as ``fused_linear_loss``."""
    return fused_linear_loss(student_hidden, student_weight, labels, divergence="rkl", **options)


def fused_linear_distillation_loss(student_hidden, student_weight, labels, *, divergence="akl",
                                   kd_ratio=0.5, teacher_hidden=None, teacher_weight=None,
                                   teacher_logits=None, student_bias=None, teacher_bias=None,
                                   temperature=1.0, ignore_index=-100, reduction="mean",
                                   chunk_size=None, backend="auto", return_parts=False,
                                   check_values=True, process_group=None, strategy="auto",
                                   **divergence_options):
    """``distillation_loss`` (``(1 - kd_ratio) CE + kd_ratio divergence``) from hidden states;
    the cross-entropy is fused into the same passes. Options as ``fused_linear_loss``. At
    ``kd_ratio = 0`` the teacher may be left out: the loss is then the cross-entropy alone."""
    if labels is None:
        raise ValueError("labels are required: they are the cross-entropy's targets")
    cfg = make_config(divergence, divergence_options, temperature=temperature,
                      kd_ratio=kd_ratio, tail=tail_of(teacher_logits))
    checks.check_bool("return_parts", return_parts)
    loss, parts = _fused_linear(
        cfg, student_hidden, student_weight, labels, teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight, teacher_logits=teacher_logits, student_bias=student_bias,
        teacher_bias=teacher_bias, ignore_index=ignore_index, reduction=reduction,
        chunk_size=chunk_size, backend=backend, check_values=check_values,
        process_group=process_group, strategy=strategy)
    if return_parts:
        divergence_part, ce_part = parts
        return DistillationOutput(loss, ce_part, divergence_part)
    return loss
