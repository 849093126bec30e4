"""Losses straight from the last hidden states: ``hidden @ weight.T + bias`` is never stored whole.

The autograd Function behind every ``fused_linear_*`` loss (the design, with the bytes and the
matmuls each pass costs, is docs/fused_linear.md):

- Forward sweeps chunks of valid rows. Each chunk's student (and teacher) logits are computed in
  float32, keeping a bf16 GEMM's float32 accumulator rather than rounding it to bf16 first
  (Liger-Kernel issue #1432), and handed to the backend's forward, whose per-row statistics
  (autograd.py) are all that is kept.
- Backward sweeps blocks of the vocabulary. Each block's logits are recomputed for the valid
  rows; the backend's backward, elementwise once the row statistics are known, turns them into
  d loss / d logits, and two GEMMs give that block's share of the hidden states' gradient
  (a float32 [rows, H] accumulator) and its rows of the weight's gradient (a float32
  [block, H] accumulator over row chunks, rounded once to the weight's dtype).

So nothing of size N x V and no float32 copy of the weight or its gradient ever exists, at the
price of computing the logits twice. Ignored rows are dropped before any GEMM (one host sync
counts them).
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch

from akl_kernels.autograd import reduce_rows, row_grad_coef

DEFAULT_BUDGET_MB = 256
# Float32 [rows, V] tiles live at once: forward, the student's and the teacher's logits (the
# backend's own temporaries have their own bound); backward, those two and the gradient.
_FORWARD_TILES, _BACKWARD_TILES = 2, 3
_VOCAB_ALIGN = 128  # vocabulary blocks are multiples of this (GEMM-friendly widths)
_MIN_VOCAB_BLOCK = 1024  # backward keeps at least this wide a block before it splits rows
_WIDEN_COLUMNS = 4096  # weight rows widened at a time where no wide-output GEMM exists


def budget_bytes() -> int:
    """The working set of the logits tiles; ``AKL_FUSED_LINEAR_BUDGET_MB`` overrides it."""
    return int(float(os.environ.get("AKL_FUSED_LINEAR_BUDGET_MB", DEFAULT_BUDGET_MB)) * 2**20)


class Tiling(NamedTuple):
    forward_rows: int  # rows per forward chunk (full vocabulary)
    backward_rows: int  # rows per backward tile
    vocab_block: int  # vocabulary entries per backward tile


def plan_tiles(n_rows: int, vocab: int, itemsize: int, chunk_size: int | None) -> Tiling:
    """Tile sizes from the budget; ``chunk_size`` fixes the rows of both sweeps.

    Backward prefers all rows in one tile, so that each block of the weight's gradient is one
    GEMM over every row, and narrows the vocabulary block down to _MIN_VOCAB_BLOCK first.
    """
    budget, n_rows = budget_bytes(), max(n_rows, 1)
    forward_rows = chunk_size or max(1, budget // (vocab * itemsize * _FORWARD_TILES))
    per_row = itemsize * _BACKWARD_TILES
    block = min(vocab, _MIN_VOCAB_BLOCK)
    backward_rows = chunk_size or max(1, min(n_rows, budget // (per_row * block)))
    vocab_block = budget // (per_row * min(backward_rows, n_rows))
    vocab_block = max(_VOCAB_ALIGN, vocab_block // _VOCAB_ALIGN * _VOCAB_ALIGN)
    return Tiling(min(forward_rows, n_rows), min(backward_rows, n_rows), min(vocab_block, vocab))


class LinearHead(NamedTuple):
    """``logits = hidden @ weight.T + bias``; ``hidden`` holds the valid rows only."""

    hidden: torch.Tensor  # [n, H]
    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None  # [V]

    @property
    def dtype(self) -> torch.dtype:
        return self.hidden.dtype

    def logits(self, rows: slice, vocab: slice, dtype: torch.dtype) -> torch.Tensor:
        out = matmul_wide(self.hidden[rows], self.weight[vocab].T, dtype)
        if self.bias is not None:
            out += self.bias[vocab]
        return out


class GivenLogits(NamedTuple):
    """A teacher given as logits [N, V]; ``rows`` indexes the valid rows (None: all)."""

    all_logits: torch.Tensor
    rows: torch.Tensor | None

    @property
    def dtype(self) -> torch.dtype:
        return self.all_logits.dtype

    def logits(self, rows: slice, vocab: slice, dtype: torch.dtype) -> torch.Tensor:
        block = self.all_logits[:, vocab]  # the backends read any dtype and row stride
        if self.rows is None:
            return block[rows]
        return block.index_select(0, self.rows[rows])  # gathers this block's entries only


@functools.cache
def _wide_output_gemm(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` runs for ``dtype`` inputs here
    (CUDA in torch >= 2.8; not on CPU)."""
    try:
        one = torch.ones(1, 1, dtype=dtype, device=device)
        return torch.mm(one, one, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def matmul_wide(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``a @ b`` in ``dtype`` (float32 or float64) without rounding to the inputs' precision."""
    if a.dtype == b.dtype == dtype:
        return a @ b
    if a.dtype == b.dtype and dtype == torch.float32 and _wide_output_gemm(a.dtype, a.device):
        # The low-precision GEMM's float32 accumulator, stored as is (exact products, fast).
        return torch.mm(a, b, out_dtype=torch.float32)
    # No bf16/fp16 GEMM with a float32 output (CPU): widen b a block of columns at a time, so
    # no wide copy of a whole weight exists.
    out = torch.empty(a.shape[0], b.shape[1], dtype=dtype, device=a.device)
    wide_a = a.to(dtype)
    for columns in _spans(b.shape[1], _WIDEN_COLUMNS):
        out[:, columns] = wide_a @ b[:, columns].to(dtype)
    return out


@functools.cache
def _wide_accumulating_gemm(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)`` adds a ``dtype``
    product into a float32 ``acc`` in place here (the GEMM's epilogue reads and writes acc once,
    instead of a temporary product and a separate add)."""
    if not _wide_output_gemm(dtype, device):
        return False
    try:
        a = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=dtype, device=device)
        acc = torch.ones(2, 2, device=device)
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        return bool(torch.equal(acc.cpu(), torch.tensor([[8.0, 11.0], [16.0, 23.0]])))
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def _add_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, accumulated in acc's dtype (a is the logits' gradient, already in the
    GEMM dtype chosen by ``_gemm_dtype``)."""
    if a.dtype == b.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.dtype != b.dtype:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))
    elif _wide_accumulating_gemm(a.dtype, a.device) and acc.is_contiguous():
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc += torch.mm(a, b, out_dtype=acc.dtype)


def _gemm_dtype(weight: torch.Tensor, wide: torch.dtype) -> torch.dtype:
    """The dtype the logits' gradient enters the gradient GEMMs in: the weight's where a
    bf16/fp16 GEMM with a float32 output exists (CUDA: tensor cores, float32 accumulation; as
    in the unfused path, whose logits' gradient has the logits' dtype), else the wide dtype."""
    low = weight.dtype in (torch.float16, torch.bfloat16) and wide == torch.float32
    return weight.dtype if low and _wide_output_gemm(weight.dtype, weight.device) else wide


def _spans(total: int, step: int):
    for start in range(0, total, step):
        yield slice(start, min(start + step, total))


class FusedLinearFunction(torch.autograd.Function):
    """(student_hidden [N, H], student_weight [V, H], student_bias, teacher) -> (loss,
    divergence part, cross-entropy part), reduced like ``DivergenceFunction``'s. ``teacher`` is
    a ``LinearHead`` over the valid rows or ``GivenLogits``; ``rows`` indexes the valid rows
    (None when all are valid). Only the student's tensors are differentiated."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, teacher, valid, rows, labels, cfg, backend,
                reduction, chunk_size, lead_shape):
        # Under torch.autocast the GEMMs would return bf16/fp16 logits: the float32 logits
        # this layer promises are computed with autocast off, in the inputs' own dtypes.
        with torch.autocast(hidden.device.type, enabled=False):
            return FusedLinearFunction._forward(ctx, hidden, weight, bias, teacher, valid, rows,
                                                labels, cfg, backend, reduction, chunk_size,
                                                lead_shape)

    @staticmethod
    def _forward(ctx, hidden, weight, bias, teacher, valid, rows, labels, cfg, backend,
                 reduction, chunk_size, lead_shape):
        n_rows = hidden.shape[0]
        student = LinearHead(hidden if rows is None else hidden[rows], weight, bias)
        n_valid = student.hidden.shape[0]
        wide = torch.float64 if torch.float64 in (hidden.dtype, teacher.dtype) else torch.float32
        tiles = plan_tiles(n_valid, weight.shape[0], wide.itemsize, chunk_size)
        valid_labels = None if labels is None else (labels if rows is None else labels[rows])
        every_vocab = slice(None)
        row_loss = torch.zeros(n_valid, dtype=wide, device=hidden.device)
        stats, parts = [], []
        for span in _spans(n_valid, tiles.forward_rows):
            s = student.logits(span, every_vocab, wide)
            t = teacher.logits(span, every_vocab, wide)
            ones = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
            chunk_labels = None if valid_labels is None else valid_labels[span]
            result = backend.forward(s, t, ones, cfg, False, chunk_labels)
            del s, t  # before the next chunk's tiles exist (else three are alive at once)
            row_loss[span] = result.loss
            stats.append(result.row_stats)
            parts.append(result.parts)
        row_stats = torch.cat(stats) if stats else None
        # Every tensor goes through save_for_backward (the teacher's too), so that autograd
        # frees them after backward even while the loss is still referenced.
        ctx.save_for_backward(student.hidden, weight, bias, valid, row_stats, valid_labels, rows,
                              *teacher)
        ctx.teacher_form, ctx.cfg, ctx.backend = type(teacher), cfg, backend
        ctx.reduction, ctx.tiles, ctx.n_rows = reduction, tiles, n_rows

        loss = reduce_rows(_scatter_rows(row_loss, rows, n_rows), valid, reduction, lead_shape)
        if not cfg.with_ce:
            return loss, None, None
        row_parts = torch.cat(parts) if parts else torch.zeros(0, 2, dtype=wide,
                                                               device=hidden.device)
        divergence, cross_entropy = (
            reduce_rows(_scatter_rows(row_parts[:, k], rows, n_rows), valid, reduction,
                        lead_shape)
            for k in (0, 1)
        )
        ctx.mark_non_differentiable(divergence, cross_entropy)
        return loss, divergence, cross_entropy

    @staticmethod
    def backward(ctx, grad_output, _grad_divergence, _grad_cross_entropy):
        hidden, weight, bias, valid, row_stats, labels, rows, *teacher = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        with torch.autocast(hidden.device.type, enabled=False):
            grads = _linear_grads(LinearHead(hidden, weight, bias), ctx.teacher_form(*teacher),
                                  row_stats, grad_output, valid, rows, labels, ctx, need_hidden,
                                  need_weight, need_bias)
        grad_hidden, grad_weight, grad_bias = grads
        if grad_hidden is not None:
            grad_hidden = _scatter_rows(grad_hidden, rows, ctx.n_rows)
        return grad_hidden, grad_weight, grad_bias, *([None] * 9)


def _scatter_rows(values, rows, n_rows):
    """Values of the valid rows placed into all n_rows rows (zeros at ignored rows)."""
    if rows is None:
        return values
    out = values.new_zeros((n_rows, *values.shape[1:]))
    out[rows] = values
    return out


def _linear_grads(student, teacher, row_stats, grad_output, valid, rows, labels, ctx,
                  need_hidden, need_weight, need_bias):
    """The backward sweep: vocabulary blocks outside, row tiles inside."""
    n_valid, vocab = student.hidden.shape[0], student.weight.shape[0]
    wide = row_stats.dtype if row_stats is not None else torch.float32
    device = student.hidden.device
    grad_hidden = (torch.zeros(n_valid, student.hidden.shape[1], dtype=wide, device=device)
                   if need_hidden else None)
    grad_weight = torch.zeros_like(student.weight) if need_weight else None
    grad_bias = torch.zeros(vocab, dtype=wide, device=device) if need_bias else None
    if n_valid > 0:
        coef = row_grad_coef(grad_output, valid, ctx.reduction, wide)
        coef = coef if rows is None else coef[rows]
        gemm_dtype = _gemm_dtype(student.weight, wide)
        tiles = ctx.tiles
        for block in _spans(vocab, tiles.vocab_block):
            weight_block = student.weight[block]
            block_grad = (torch.zeros(weight_block.shape, dtype=wide, device=device)
                          if need_weight else None)
            for span in _spans(n_valid, tiles.backward_rows):
                s = student.logits(span, block, wide)
                t = teacher.logits(span, block, wide)
                shifted = None if labels is None else labels[span] - block.start
                g = ctx.backend.backward(s, t, row_stats[span], coef[span], ctx.cfg, shifted,
                                         grad_dtype=gemm_dtype)
                del s, t
                if need_bias:
                    grad_bias[block] += g.sum(dim=0, dtype=wide)
                if need_hidden:
                    _add_product(grad_hidden[span], g, weight_block)
                if need_weight:
                    _add_product(block_grad, g.T, student.hidden[span])
                del g  # before the next tile's logits exist
            if need_weight:
                grad_weight[block] = block_grad
    to = lambda x, like: None if x is None else x.to(like.dtype)  # noqa: E731
    bias_like = student.bias if student.bias is not None else student.weight
    return to(grad_hidden, student.hidden), grad_weight, to(grad_bias, bias_like)
