"""The custom operators behind every loss from hidden states.

``akl_kernels::fused_linear_rows`` runs the forward sweep of fused_linear_sweeps.py (each row's
loss and statistics, the logits never stored whole) and ``akl_kernels::fused_linear_grad`` the
backward sweep (the gradients of the student's hidden states, weight and bias); with fake
implementations and ``register_autograd``, a fused linear loss traces as one graph under
``torch.compile(fullgraph=True)`` (docs/contract.md §8).

Ignored rows are dropped before any GEMM: finding them costs one host synchronisation per call,
inside the operator. The teacher comes as ``teacher_hidden`` and ``teacher_weight`` (with an
optional ``teacher_bias``), as ``teacher_logits``, or not at all (the cross-entropy alone, at
``kd_ratio = 0``: the student's own logits stand in for the teacher's, whose term is 0).
"""

from __future__ import annotations

import torch

from akl_kernels import validation as checks
from akl_kernels.backends import get_backend
from akl_kernels.backends.torch import vocab_parallel
from akl_kernels.config import LossConfig, schema_arguments
from akl_kernels.divergence_op import refuse_double_backward
from akl_kernels.fused_linear_sweeps import (
    GivenLogits,
    GivenTopK,
    LinearHead,
    backward_sweep,
    forward_gradient_sweep,
    forward_sweep,
    plan_tiles,
)
from akl_kernels.row_results import N_ROW_STATS, N_TOPK_STATS, as_rows, loss_dtype
from akl_kernels.vocab_shards import resolve_group, slice_layout

_TENSORS = ("Tensor hidden, Tensor weight, Tensor? bias, Tensor? teacher_hidden, "
            "Tensor? teacher_weight, Tensor? teacher_bias, Tensor? teacher_logits, "
            "Tensor? teacher_indices, Tensor valid")
_N_TENSORS = _TENSORS.count("Tensor")
_OPTIONS = f"int chunk_size, str backend, str process_group, {schema_arguments()}"


def _pick(x, rows):
    """The valid rows of x (``rows``: their indices, None for all); None stays None."""
    return x if x is None or rows is None else x[rows]


def _heads(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
           teacher_indices, rows):
    """The student's and the teacher's head over the valid rows."""
    student = LinearHead(_pick(hidden, rows), weight, bias)
    if teacher_indices is not None:
        return student, GivenTopK(_pick(teacher_indices, rows), _pick(teacher_logits, rows))
    if teacher_logits is not None:  # the backends take any row stride: no copy
        return student, GivenLogits(as_rows(teacher_logits), rows)
    if teacher_hidden is not None:
        return student, LinearHead(_pick(teacher_hidden, rows), teacher_weight, teacher_bias)
    return student, None


def _valid_indices(valid):
    """The valid rows' indices, or None when every row is (one host sync: nonzero)."""
    rows = valid.nonzero()[:, 0]
    return None if rows.numel() == valid.numel() else rows


def _stats_width(cfg, teacher_indices):
    """Per-row statistics kept between the sweeps; a sparse teacher's include its categories'
    unit gradient (fused_linear_sweeps.forward_sweep)."""
    if teacher_indices is None:
        return N_ROW_STATS
    return N_TOPK_STATS + teacher_indices.shape[1] + (cfg.tail == "bucket")


def _tiles(hidden, weight, teacher_hidden, teacher_logits, n_valid, chunk_size, vocab=None):
    """The sweeps' tiles; ``vocab`` (default the weight's rows) sizes them: over vocabulary
    slices the widest slice's, so that every rank sweeps as many row chunks (each chunk's
    forward makes the same collectives on every rank)."""
    teacher = teacher_logits if teacher_logits is not None else teacher_hidden
    wide = loss_dtype(hidden, *(() if teacher is None else (teacher,)))
    return plan_tiles(n_valid, vocab or weight.shape[0], wide, chunk_size or None)


def _sliced(backend, process_group, weight):
    """(the backend, the layout of this rank's slice or None) for a call over vocabulary
    slices (``process_group`` a group's name) or not ("")."""
    if not process_group:
        return get_backend(backend), None
    group = resolve_group(process_group)
    layout = slice_layout(weight.shape[0], group, weight.device)
    return vocab_parallel.SlicedBackend(get_backend(backend), group), layout


def _scatter_rows(values, rows, n_rows):
    """Values of the valid rows placed into all n_rows rows (zeros at ignored rows)."""
    if rows is None:
        return values
    out = values.new_zeros((n_rows, *values.shape[1:]))
    out[rows] = values
    return out


def _forward(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
             teacher_indices, valid, labels, chunk_size, backend, process_group,
             *fields_and_flags):
    *fields, check_values, need_hidden, need_weight, need_bias = fields_and_flags
    cfg = LossConfig(*fields)
    in_forward = need_hidden or need_weight or need_bias  # the gradients formed here
    chosen, layout = _sliced(backend, process_group, weight)
    if cfg.with_ce and check_values:
        checks.check_class_labels(labels, valid, weight.shape[0] if layout is None
                                  else layout.vocab)
    if teacher_indices is not None and check_values:
        checks.check_topk_values(teacher_indices, teacher_logits, weight.shape[0])
    n_rows = hidden.shape[0]
    rows = _valid_indices(valid)
    n_valid = n_rows if rows is None else rows.numel()
    tiles = _tiles(hidden, weight, teacher_hidden, teacher_logits, n_valid, chunk_size,
                   None if layout is None else layout.widest)
    loss = hidden.new_zeros(n_rows, dtype=tiles.dtype)
    row_stats = hidden.new_zeros(n_rows, _stats_width(cfg, teacher_indices), dtype=tiles.dtype)
    parts = hidden.new_zeros(n_rows if cfg.with_ce else 0, 2, dtype=tiles.dtype)
    grads = _no_gradients(hidden, weight, bias, tiles.dtype, need_hidden, need_weight,
                          need_bias)
    # Where this slice's columns start in the vocabulary (0 without a group): the recomputing
    # backward shifts the labels by it, so it needs no collective of its own.
    offset = torch.full((1,), 0 if layout is None else layout.offset, dtype=torch.int64,
                        device=hidden.device)
    if n_valid == 0:
        return loss, row_stats, parts, *grads, offset
    # Under torch.autocast the GEMMs would return bf16/fp16 logits: the float32 logits this
    # layer promises are computed with autocast off, in the inputs' own dtypes.
    with torch.autocast(hidden.device.type, enabled=False):
        student, teacher = _heads(hidden, weight, bias, teacher_hidden, teacher_weight,
                                  teacher_bias, teacher_logits, teacher_indices, rows)
        if in_forward:
            row_loss, stats, row_parts, formed = forward_gradient_sweep(
                student, teacher, _pick(labels, rows), cfg, chosen, tiles,
                need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias,
                label_offset=0 if layout is None else layout.offset)
            grads = _gradient_outputs(formed, hidden, bias, rows, grads)
        else:
            row_loss, stats, row_parts = forward_sweep(student, teacher, _pick(labels, rows),
                                                       cfg, chosen, tiles)
    loss = _scatter_rows(row_loss, rows, n_rows)
    row_stats = _scatter_rows(stats, rows, n_rows)
    if cfg.with_ce:
        parts = _scatter_rows(row_parts, rows, n_rows)
    return loss, row_stats, parts, *grads, offset


def _no_gradients(hidden, weight, bias, wide, need_hidden, need_weight, need_bias):
    """The gradients a call forms in forward before any row is swept: zeros where asked for
    (no valid row), else empty tensors of their own."""
    def zeros_or_empty(needed, like, dtype=None):
        if needed:
            return torch.zeros_like(like, dtype=dtype)
        return hidden.new_empty(0)

    return (zeros_or_empty(need_hidden, hidden), zeros_or_empty(need_weight, weight),
            zeros_or_empty(need_bias and bias is not None, bias if bias is not None else hidden))


def _gradient_outputs(formed, hidden, bias, rows, empty):
    """The forward-formed Gradients as operator outputs: the hidden states' in their dtype at
    every row (0 at ignored rows), the bias's in its dtype; absent ones stay ``empty``'s."""
    hidden_grad, weight_grad, bias_grad = empty
    if formed.hidden is not None:
        hidden_grad = _scatter_rows(formed.hidden.to(hidden.dtype), rows, hidden.shape[0])
    if formed.weight is not None:
        weight_grad = formed.weight
    if formed.bias is not None:
        bias_grad = formed.bias.to(bias.dtype)
    return hidden_grad, weight_grad, bias_grad


_forward_op = torch.library.custom_op(
    "akl_kernels::fused_linear_rows", _forward, mutates_args=(),
    schema=f"({_TENSORS}, Tensor? labels, {_OPTIONS}, bool check_values, bool need_hidden, "
           "bool need_weight, bool need_bias) "
           "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)")


@_forward_op.register_fake
def _forward_fake(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias,
                  teacher_logits, teacher_indices, valid, labels, chunk_size, backend,
                  process_group, *fields_and_flags):
    *fields, _, need_hidden, need_weight, need_bias = fields_and_flags
    cfg = LossConfig(*fields)
    n = hidden.shape[0]
    teacher = teacher_logits if teacher_logits is not None else teacher_hidden
    dtype = loss_dtype(hidden, *(() if teacher is None else (teacher,)))
    width = _stats_width(cfg, teacher_indices)
    grads = tuple(torch.empty_like(x) if needed and x is not None else hidden.new_empty(0)
                  for needed, x in ((need_hidden, hidden), (need_weight, weight),
                                    (need_bias, bias)))
    return (hidden.new_empty(n, dtype=dtype), hidden.new_empty(n, width, dtype=dtype),
            hidden.new_empty(n if cfg.with_ce else 0, 2, dtype=dtype), *grads,
            hidden.new_empty(1, dtype=torch.int64))


def _grad(hidden, weight, bias, teacher_hidden, teacher_weight, teacher_bias, teacher_logits,
          teacher_indices, valid, row_stats, grad_rows, labels, chunk_size, backend, process_group,
          *fields_and_flags):
    *fields, need_hidden, need_weight, need_bias = fields_and_flags
    cfg = LossConfig(*fields)
    # Elementwise given the rows' statistics: over a vocabulary slice (process_group) too,
    # the backend's own backward, the labels already shifted into the slice (_backward).
    del process_group
    chosen = get_backend(backend)
    rows = _valid_indices(valid)
    n_valid = hidden.shape[0] if rows is None else rows.numel()
    tiles = _tiles(hidden, weight, teacher_hidden, teacher_logits, n_valid, chunk_size)
    with torch.autocast(hidden.device.type, enabled=False):
        student, teacher = _heads(hidden, weight, bias, teacher_hidden, teacher_weight,
                                  teacher_bias, teacher_logits, teacher_indices, rows)
        grad_hidden, grad_weight, grad_bias = backward_sweep(
            student, teacher, _pick(row_stats, rows), _pick(grad_rows.to(tiles.dtype), rows),
            _pick(labels, rows), cfg, chosen, tiles, need_hidden=need_hidden,
            need_weight=need_weight, need_bias=need_bias)
    # Not needed: an empty tensor of its own (an operator returns tensors, not None, and its
    # outputs must not alias one another).
    def nothing():
        return hidden.new_empty(0)

    grad_hidden = (nothing() if grad_hidden is None
                   else _scatter_rows(grad_hidden.to(hidden.dtype), rows, hidden.shape[0]))
    grad_bias = nothing() if grad_bias is None else grad_bias.to(bias.dtype)
    return grad_hidden, nothing() if grad_weight is None else grad_weight, grad_bias


_grad_op = torch.library.custom_op(
    "akl_kernels::fused_linear_grad", _grad, mutates_args=(),
    schema=f"({_TENSORS}, Tensor row_stats, Tensor grad_rows, Tensor? labels, {_OPTIONS}, "
           "bool need_hidden, bool need_weight, bool need_bias) -> (Tensor, Tensor, Tensor)")


@_grad_op.register_fake
def _grad_fake(hidden, weight, bias, *args):
    need_hidden, need_weight, need_bias = args[-3:]
    return (torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight else hidden.new_empty(0),
            torch.empty_like(bias) if need_bias else hidden.new_empty(0))


_grad_op.register_autograd(refuse_double_backward)


def _setup_context(ctx, inputs, output):
    *tensors, labels, chunk_size, backend = inputs[:_N_TENSORS + 3]
    ctx.formed = tuple(inputs[-3:])  # which gradients the forward pass formed
    ctx.save_for_backward(*tensors, output[1], labels, *output[3:6], output[6])
    # The recomputing backward's options: without check_values and the three flags.
    ctx.options = (chunk_size, backend, *inputs[_N_TENSORS + 3:-4])
    ctx.n_inputs = len(inputs)
    ctx.mark_non_differentiable(*output[1:])


def _backward(ctx, grad_rows, *_):
    *tensors, row_stats, labels, formed_hidden, formed_weight, formed_bias, offset = \
        ctx.saved_tensors
    needed = ctx.needs_input_grad[:3]
    # With create_graph (grad mode on here) the recomputing operator runs instead: it refuses
    # a double backward by name, where a scaled product would fail obscurely.
    formed_all = all(formed or not need for formed, need in zip(ctx.formed, needed, strict=True))
    if formed_all and not torch.is_grad_enabled():
        # Formed in forward for a unit coefficient per row: the incoming gradient of a "mean"
        # or "sum" loss is one number for every row (reduce_rows), so the gradients scale by
        # it. (An empty grad_rows: no rows, zero gradients.)
        scale = grad_rows.amax() if grad_rows.numel() else grad_rows.new_zeros(())
        grads = tuple(None if not need else (g * scale.to(g.dtype))
                      for g, need in zip((formed_hidden, formed_weight, formed_bias), needed,
                                         strict=True))
        return *grads, *([None] * (ctx.n_inputs - 3))
    valid = tensors[-1]
    coef = torch.where(valid, grad_rows, torch.zeros_like(grad_rows))  # ignored rows: exactly 0
    need_hidden, need_weight, need_bias = needed
    if labels is not None:
        labels = labels - offset  # into this slice's columns (offset 0 without a group)
    grads = _grad_op(*tensors, row_stats, coef, labels, *ctx.options, need_hidden, need_weight,
                     need_bias)
    grads = tuple(g if need else None for g, need in zip(grads, needed, strict=True))
    return *grads, *([None] * (ctx.n_inputs - 3))


_forward_op.register_autograd(_backward, setup_context=_setup_context)


def fused_linear_rows(hidden, weight, bias, teacher, valid, cfg: LossConfig, *, backend: str,
                      labels=None, chunk_size=None, check_values=True, process_group="",
                      gradient_in_forward=False):
    """(loss [N], parts [N, 2] or None) of rows ``hidden`` [N, H] through ``weight`` [V, H]
    and ``bias`` against ``teacher``: a dict with ``teacher_hidden``, ``teacher_weight``,
    ``teacher_bias``, ``teacher_logits`` and ``teacher_indices`` entries (absent ones None; a
    sparse teacher is its [N, k] log-probabilities as ``teacher_logits`` with its
    ``teacher_indices``); differentiable in
    ``hidden``, ``weight`` and ``bias``. With ``process_group`` (a group's name) ``weight``,
    ``bias`` and the teacher's weight, bias or logits are this rank's vocabulary slice, and the
    hidden states' gradient is this slice's partial sum.

    ``gradient_in_forward``: the forward pass also forms the gradients of the inputs that
    require one (the "forward_gradient" strategy: no logits computed twice), for the caller
    that reduces the rows by "mean" or "sum", whose incoming gradient is the same for every
    row; without grad mode or a differentiable input it forms none."""
    needs = [gradient_in_forward and torch.is_grad_enabled() and x is not None
             and x.requires_grad for x in (hidden, weight, bias)]
    loss, _, parts, *_ = _forward_op(
        hidden, weight, bias, teacher.get("teacher_hidden"), teacher.get("teacher_weight"),
        teacher.get("teacher_bias"), teacher.get("teacher_logits"),
        teacher.get("teacher_indices"), valid, labels, chunk_size or 0, backend, process_group,
        *cfg.fields(), check_values, *needs)
    return loss, parts if cfg.with_ce else None
