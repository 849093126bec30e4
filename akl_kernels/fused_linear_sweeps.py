"""The sweeps behind every ``fused_linear_*`` loss: ``hidden @ weight.T + bias`` is never stored
whole (the design, with the bytes and the matmuls each pass costs, is docs/fused_linear.md).

- Forward sweeps chunks of valid rows. Each chunk's student (and teacher) logits are computed in
  float32, keeping a bf16 GEMM's float32 accumulator rather than rounding it to bf16 first
  (rounding the logits to bf16 before the loss loses accuracy a float32 loss then cannot
  recover), and handed to the backend's forward, whose per-row statistics
  (``row_results.RowStat``) are all that is kept.
- Backward sweeps blocks of the vocabulary. Each block's logits are recomputed for the valid
  rows; the backend's backward, elementwise once the row statistics are known, turns them into
  d loss / d logits, and two GEMMs give that block's share of the hidden states' gradient
  (a float32 [rows, H] accumulator) and its rows of the weight's gradient (a float32
  [block, H] accumulator over row chunks, rounded once to the weight's dtype).

So nothing of size N x V and no float32 copy of the weight or its gradient ever exists, at the
price of computing the logits twice. The custom operators that call these sweeps are in
fused_linear_op.py.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

from akl_kernels.backends.torch import topk as torch_topk
from akl_kernels.row_results import N_TOPK_STATS
from akl_kernels.validation import environment_megabytes

DEFAULT_BUDGET_MB = 256
# Float32 [rows, V] tiles live at once: forward, the student's and the teacher's logits (the
# backend's own temporaries have their own bound); backward, those two and the gradient.
_FORWARD_TILES, _BACKWARD_TILES = 2, 3
_VOCAB_ALIGN = 128  # vocabulary blocks are multiples of this (GEMM-friendly widths)
_MIN_VOCAB_BLOCK = 1024  # backward keeps at least this wide a block before it splits rows
_WIDEN_COLUMNS = 4096  # weight rows widened at a time where no wide-output GEMM exists


def budget_bytes() -> int:
    """The working set of the logits tiles; ``AKL_FUSED_LINEAR_BUDGET_MB`` overrides it."""
    return int(environment_megabytes("AKL_FUSED_LINEAR_BUDGET_MB", DEFAULT_BUDGET_MB) * 2**20)


class Tiling(NamedTuple):
    forward_rows: int  # rows per forward chunk (full vocabulary)
    backward_rows: int  # rows per backward tile
    vocab_block: int  # vocabulary entries per backward tile
    dtype: torch.dtype  # of the logits tiles: float32 (float64 for float64 inputs)


def plan_tiles(n_rows: int, vocab: int, dtype: torch.dtype, chunk_size: int | None) -> Tiling:
    """Tile sizes from the budget; ``chunk_size`` fixes the rows of both sweeps.

    Backward prefers all rows in one tile, so that each block of the weight's gradient is one
    GEMM over every row, and narrows the vocabulary block down to _MIN_VOCAB_BLOCK first.
    """
    budget, n_rows, itemsize = budget_bytes(), max(n_rows, 1), dtype.itemsize
    forward_rows = chunk_size or max(1, budget // (vocab * itemsize * _FORWARD_TILES))
    per_row = itemsize * _BACKWARD_TILES
    block = min(vocab, _MIN_VOCAB_BLOCK)
    backward_rows = chunk_size or max(1, min(n_rows, budget // (per_row * block)))
    vocab_block = budget // (per_row * min(backward_rows, n_rows))
    vocab_block = max(_VOCAB_ALIGN, vocab_block // _VOCAB_ALIGN * _VOCAB_ALIGN)
    return Tiling(min(forward_rows, n_rows), min(backward_rows, n_rows), min(vocab_block, vocab),
                  dtype)


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


class GivenTopK(NamedTuple):
    """A sparse teacher (docs/contract.md §6): [n, k] indices and log-probabilities of the
    valid rows. Nothing of size N x V: its forward keeps, per row, the categories' gradient
    for a unit coefficient (the k tokens' logits are only at hand in the forward sweep), and
    its backward is elementwise per vocabulary block given that."""

    indices: torch.Tensor
    logprobs: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.logprobs.dtype


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


def forward_sweep(student: LinearHead, teacher, labels, cfg, backend, tiles: Tiling):
    """Each valid row's loss, statistics and parts (None without the cross-entropy), from
    row chunks of both models' float32 logits. ``teacher`` is a ``LinearHead``,
    ``GivenLogits``, ``GivenTopK`` or None (the student's own logits stand in: the
    cross-entropy alone)."""
    n_valid = student.hidden.shape[0]
    every_vocab = slice(None)
    losses, stats, parts = [], [], []
    for span in _spans(n_valid, tiles.forward_rows):
        s = student.logits(span, every_vocab, tiles.dtype)
        ones = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
        span_labels = None if labels is None else labels[span]
        if isinstance(teacher, GivenTopK):
            idx, lp = teacher.indices[span], teacher.logprobs[span]
            result = backend.topk_forward(s, idx, lp, ones, cfg, labels=span_labels)
            unit = torch_topk.unit_category_gradient(s, idx, lp, result.row_stats, cfg)
            row_stats = torch.cat([result.row_stats, unit], dim=1)
            del s
        else:
            t = s if teacher is None else teacher.logits(span, every_vocab, tiles.dtype)
            result = backend.forward(s, t, ones, cfg, labels=span_labels)
            row_stats = result.row_stats
            del s, t  # before the next chunk's tiles exist (else three are alive at once)
        losses.append(result.loss)
        stats.append(row_stats)
        parts.append(result.parts)
    return torch.cat(losses), torch.cat(stats), torch.cat(parts) if cfg.with_ce else None


def backward_sweep(student: LinearHead, teacher, row_stats, coef, labels, cfg, backend,
                   tiles: Tiling, *, need_hidden: bool, need_weight: bool, need_bias: bool):
    """(grad_hidden [n, H] float32, grad_weight [V, H] in the weight's dtype, grad_bias [V]
    float32), each None where not needed: vocabulary blocks outside, row tiles inside."""
    n_valid, vocab = student.hidden.shape[0], student.weight.shape[0]
    wide, device = tiles.dtype, student.hidden.device
    grad_hidden = (torch.zeros(n_valid, student.hidden.shape[1], dtype=wide, device=device)
                   if need_hidden else None)
    grad_weight = torch.zeros_like(student.weight) if need_weight else None
    grad_bias = torch.zeros(vocab, dtype=wide, device=device) if need_bias else None
    gemm_dtype = _gemm_dtype(student.weight, wide)
    for block in _spans(vocab, tiles.vocab_block) if n_valid else ():
        weight_block = student.weight[block]
        block_grad = (torch.zeros(weight_block.shape, dtype=wide, device=device)
                      if need_weight else None)
        for span in _spans(n_valid, tiles.backward_rows):
            s = student.logits(span, block, wide)
            shifted = None if labels is None else labels[span] - block.start
            if isinstance(teacher, GivenTopK):
                st = row_stats[span]
                g = backend.topk_backward(
                    s, teacher.indices[span], teacher.logprobs[span], st[:, :N_TOPK_STATS],
                    coef[span], cfg, labels=shifted, grad_dtype=gemm_dtype,
                    category_grad=st[:, N_TOPK_STATS:], column_offset=block.start)
                del s
            else:
                t = s if teacher is None else teacher.logits(span, block, wide)
                g = backend.backward(s, t, row_stats[span], coef[span], cfg, labels=shifted,
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
    return grad_hidden, grad_weight, grad_bias
