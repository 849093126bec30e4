"""Public fused linear losses: every divergence of the library, from the last hidden states.

``fused_linear_akl_loss(student_hidden, student_weight, labels, teacher_hidden=...,
teacher_weight=...)`` equals ``akl_loss(student_hidden @ student_weight.T, teacher_hidden @
teacher_weight.T, labels)`` with the logits computed in float32, but neither model's logits are
ever stored whole (akl_kernels/fused_linear.py). The teacher may also come as logits.
"""

from __future__ import annotations

import torch

from akl_kernels import _validation as checks
from akl_kernels.autograd import as_rows
from akl_kernels.fused_linear import FusedLinearFunction, GivenLogits, LinearHead
from akl_kernels.losses import DistillationOutput, _backend_module


def _fused_linear(cfg, student_hidden, student_weight, labels, *, teacher_hidden,
                  teacher_weight, teacher_logits, student_bias, teacher_bias, ignore_index,
                  reduction, chunk_size, backend):
    """Shared body: checks, the valid rows, the teacher's form, the autograd Function."""
    checks.check_linear_inputs(student_hidden, student_weight, student_bias, teacher_hidden,
                               teacher_weight, teacher_bias, teacher_logits)
    checks.check_reduction(reduction)
    checks.check_labels(labels, student_hidden, ignore_index)
    checks.check_chunk_size(chunk_size)
    teacher_dtype_probe = teacher_logits if teacher_logits is not None else teacher_hidden
    backend_name = checks.resolve_backend(backend, student_hidden, teacher_dtype_probe)
    lead = student_hidden.shape[:-1]
    hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    n_rows = hidden.shape[0]
    if labels is None:
        valid = torch.ones(n_rows, dtype=torch.bool, device=hidden.device)
        flat_labels = None
    else:
        valid = (labels != ignore_index).reshape(n_rows)
        flat_labels = labels.reshape(n_rows).to(torch.int64)
    if cfg.with_ce:
        checks.check_class_labels(labels, valid, student_weight.shape[0])
    # Ignored rows cost no GEMM: they are dropped up front (nonzero is the one host sync).
    rows = valid.nonzero()[:, 0]
    rows = None if rows.numel() == n_rows else rows
    if teacher_logits is not None:
        teacher = GivenLogits(as_rows(teacher_logits), rows)  # the kernels take a row stride
    else:
        teacher_rows = teacher_hidden.reshape(n_rows, teacher_hidden.shape[-1])
        teacher = LinearHead(teacher_rows if rows is None else teacher_rows[rows],
                             teacher_weight, teacher_bias)
    return FusedLinearFunction.apply(
        hidden, student_weight, student_bias, teacher, valid, rows,
        flat_labels if cfg.with_ce else None, cfg, _backend_module(backend_name), reduction,
        chunk_size, lead,
    )


def fused_linear_loss(
    student_hidden,
    student_weight,
    labels=None,
    *,
    divergence="akl",
    teacher_hidden=None,
    teacher_weight=None,
    teacher_logits=None,
    student_bias=None,
    teacher_bias=None,
    temperature=1.0,
    ignore_index=-100,
    reduction="mean",
    chunk_size=None,
    backend="auto",
    **divergence_options,
):
    """``divergence`` (any of the library's: "akl", "fkl", "rkl", "jsd", "skew_fkl",
    "skew_rkl", "tvd", "mixed_kl", with its options by keyword as in ``distillation_loss``)
    between ``student_hidden @ student_weight.T + student_bias`` and the teacher's logits, given
    as ``teacher_hidden @ teacher_weight.T + teacher_bias`` (the hidden sizes may differ) or as
    ``teacher_logits``. Neither model's logits are stored whole; they are computed in float32
    in row chunks (``chunk_size`` rows; by default from V and a 256 MiB budget,
    ``AKL_FUSED_LINEAR_BUDGET_MB``). Gradients flow to the student's hidden states, weight and
    bias. Reductions, ``labels`` and ``ignore_index`` as in ``akl_loss``."""
    cfg = checks.divergence_config(divergence, divergence_options, temperature=temperature)
    loss, _, _ = _fused_linear(
        cfg, student_hidden, student_weight, labels, teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight, teacher_logits=teacher_logits, student_bias=student_bias,
        teacher_bias=teacher_bias, ignore_index=ignore_index, reduction=reduction,
        chunk_size=chunk_size, backend=backend)
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


def fused_linear_distillation_loss(
    student_hidden,
    student_weight,
    labels,
    *,
    divergence="akl",
    kd_ratio=0.5,
    teacher_hidden=None,
    teacher_weight=None,
    teacher_logits=None,
    student_bias=None,
    teacher_bias=None,
    temperature=1.0,
    ignore_index=-100,
    reduction="mean",
    chunk_size=None,
    backend="auto",
    return_parts=False,
    **divergence_options,
):
    """``distillation_loss`` (``(1 - kd_ratio) CE + kd_ratio divergence``) from hidden states;
    the cross-entropy is fused into the same passes. Options as ``fused_linear_loss``."""
    if labels is None:
        raise ValueError("labels are required: they are the cross-entropy's targets")
    checks.check_unit_interval("kd_ratio", kd_ratio)
    cfg = checks.divergence_config(divergence, divergence_options, temperature=temperature,
                                   with_ce=True, kd_ratio=kd_ratio)
    loss, divergence_part, ce_part = _fused_linear(
        cfg, student_hidden, student_weight, labels, teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight, teacher_logits=teacher_logits, student_bias=student_bias,
        teacher_bias=teacher_bias, ignore_index=ignore_index, reduction=reduction,
        chunk_size=chunk_size, backend=backend)
    if return_parts:
        return DistillationOutput(loss, ce_part, divergence_part)
    return loss
