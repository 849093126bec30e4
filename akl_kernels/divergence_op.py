"""The custom operators behind every loss on logits.

``akl_kernels::divergence_rows`` runs a backend's forward pass (each row's loss and
statistics) and ``akl_kernels::divergence_grad`` its backward pass; the first is differentiable
through the second (``register_autograd``), and both have fake implementations, so that
``torch.compile(fullgraph=True)`` traces a loss as one graph with the backend as an opaque call
(docs/contract.md §8). The non-tensor options travel as one ``LossConfig``; the operators'
schemas take its fields in order (``config.schema_arguments``).

Checks that need the values of a tensor (the label range of the fused cross-entropy, a sparse
teacher's indices and log-probabilities) run inside ``divergence_rows`` with
``check_values=True`` only: with False no host synchronisation happens,
so a Triton loss call can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch

from akl_kernels import validation as checks
from akl_kernels.backends import get_backend
from akl_kernels.backends.torch import vocab_parallel
from akl_kernels.config import LossConfig, schema_arguments
from akl_kernels.row_results import (
    N_ROW_STATS,
    N_TOPK_STATS,
    HeadTailStats,
    RowResult,
    loss_dtype,
)
from akl_kernels.vocab_shards import resolve_group

_CONFIG = schema_arguments()


def _forward(student, teacher, teacher_indices, valid, labels, backend, process_group,
             *fields_and_flags):
    *fields, head_stats, check_values = fields_and_flags
    cfg = LossConfig(*fields)
    if cfg.with_ce and check_values and not process_group:
        checks.check_class_labels(labels, valid, student.shape[-1])
    chosen = get_backend(backend)
    labels_in_slice = student.new_empty(0, dtype=torch.int64)
    if process_group:
        # The rows are this rank's slice of the vocabulary (the statistics' rounds:
        # backends/torch/vocab_parallel.py, whatever the backend; its backward is the backend's).
        result, shifted = vocab_parallel.forward(student, teacher, valid, cfg,
                                                 resolve_group(process_group), labels=labels,
                                                 head_stats=head_stats,
                                                 check_values=check_values)
        if shifted is not None:
            labels_in_slice = shifted
    elif cfg.sparse:
        if check_values:
            checks.check_topk_values(teacher_indices, teacher, student.shape[-1])
        result = chosen.topk_forward(student, teacher_indices, teacher, valid, cfg,
                                     labels=labels, head_stats=head_stats)
    else:
        result = chosen.forward(student, teacher, valid, cfg, labels=labels,
                                head_stats=head_stats)
    # Absent outputs are empty tensors (an operator returns tensors), each its own: outputs
    # must not alias one another.
    def empty(*shape, dtype=result.loss.dtype):
        return student.new_empty(shape, dtype=dtype)

    parts = result.parts if result.parts is not None else empty(0, 2)
    if result.head is None:
        return (result.loss, result.row_stats, parts, empty(0, 4), empty(0, dtype=torch.int64),
                labels_in_slice)
    head = result.head
    columns = torch.stack([head.head_gap, head.tail_gap, head.head_weight, head.head_mass], 1)
    return (result.loss, result.row_stats, parts, columns.to(result.loss.dtype),
            head.head_count, labels_in_slice)


_forward_op = torch.library.custom_op(
    "akl_kernels::divergence_rows", _forward, mutates_args=(),
    schema=f"(Tensor student, Tensor teacher, Tensor? teacher_indices, Tensor valid, "
           f"Tensor? labels, str backend, str process_group, "
           f"{_CONFIG}, bool head_stats, bool check_values) "
           "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")


@_forward_op.register_fake
def _forward_fake(student, teacher, teacher_indices, valid, labels, backend, process_group,
                  *fields_and_flags):
    *fields, head_stats, _ = fields_and_flags
    cfg = LossConfig(*fields)
    n = student.shape[0]
    dtype = loss_dtype(student, teacher)
    new = lambda *shape, dtype=dtype: student.new_empty(shape, dtype=dtype)  # noqa: E731
    heads = n if head_stats and cfg.needs_head_split else 0
    n_stats = N_TOPK_STATS if cfg.sparse else N_ROW_STATS
    shifted = n if process_group and cfg.with_ce else 0
    return (new(n), new(n, n_stats), new(n if cfg.with_ce else 0, 2), new(heads, 4),
            new(heads, dtype=torch.int64), new(shifted, dtype=torch.int64))


def _grad(student, teacher, teacher_indices, valid, row_stats, grad_rows, labels, backend,
          *fields):
    coef = torch.where(valid, grad_rows, torch.zeros_like(grad_rows))  # ignored rows: exactly 0
    cfg = LossConfig(*fields)
    if cfg.sparse:
        return get_backend(backend).topk_backward(student, teacher_indices, teacher, row_stats,
                                                  coef, cfg, labels=labels)
    return get_backend(backend).backward(student, teacher, row_stats, coef, cfg, labels=labels)


_grad_op = torch.library.custom_op(
    "akl_kernels::divergence_grad", _grad, mutates_args=(),
    schema=f"(Tensor student, Tensor teacher, Tensor? teacher_indices, Tensor valid, "
           f"Tensor row_stats, Tensor grad_rows, Tensor? labels, str backend, {_CONFIG}) "
           "-> Tensor")


@_grad_op.register_fake
def _grad_fake(student, *_):
    return torch.empty_like(student, memory_format=torch.contiguous_format)


def refuse_double_backward(ctx, *grads):
    raise RuntimeError(
        "akl_kernels losses have no second derivative: double backward (create_graph=True "
        "followed by a backward through the gradient) is not supported")


_grad_op.register_autograd(refuse_double_backward)


def _setup_context(ctx, inputs, output):
    student, teacher, teacher_indices, valid, labels, backend, process_group, *rest = inputs
    fields = rest[:-2]  # without head_stats and check_values
    if process_group and LossConfig(*fields).with_ce:
        labels = output[5]  # the backward pass is this slice's: its labels are shifted into it
    ctx.save_for_backward(student, teacher, teacher_indices, valid, output[1], labels)
    ctx.options = (backend, *fields)
    ctx.n_inputs = len(inputs)
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_rows, *_):
    student, teacher, teacher_indices, valid, row_stats, labels = ctx.saved_tensors
    grad = _grad_op(student, teacher, teacher_indices, valid, row_stats,
                    grad_rows.to(row_stats.dtype), labels, *ctx.options)
    return grad, *([None] * (ctx.n_inputs - 1))


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def divergence_rows(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor,
                    cfg: LossConfig, *, backend: str, labels: torch.Tensor | None = None,
                    head_stats: bool = False, check_values: bool = True,
                    teacher_indices: torch.Tensor | None = None,
                    process_group: str = "") -> RowResult:
    """Each row's loss (differentiable in ``student``, 0 at rows where ``valid`` is False),
    statistics, AKL split (``head_stats``) and (divergence, cross-entropy) parts (``cfg.with_ce``)
    for rows ``student``, ``teacher`` [N, V] and ``labels`` [N] int64 or None. A sparse teacher
    (``cfg.sparse``) comes as ``teacher`` its [N, k] log-probabilities and ``teacher_indices``
    [N, k] int64. With ``process_group`` (a group's name, vocab_shards.group_name) the rows are
    this rank's slice of the vocabulary's columns and the results the whole vocabulary's."""
    loss, row_stats, parts, head, head_count, _ = _forward_op(
        student, teacher, teacher_indices, valid, labels, backend, process_group,
        *cfg.fields(), head_stats, check_values)
    split = None
    if head_stats and cfg.needs_head_split:
        split = HeadTailStats(head[:, 0], head[:, 1], head[:, 2], head_count, head[:, 3])
    return RowResult(loss, row_stats, split, parts if cfg.with_ce else None)
