"""The sweeps behind every ``fused_linear_*`` loss: ``hidden @ weight.T + bias`` is never stored
whole (the design, with the bytes and the matmuls each pass costs, is docs/fused_linear.md).

Every tile's logits are computed in float32, keeping a bf16 GEMM's float32 accumulator rather
than rounding it to bf16 first (a float32 loss cannot recover what that rounding loses), and
handed to the backend, whose per-row statistics (``row_results.RowStat``) are all it keeps.

- ``forward_gradient_sweep`` (the default strategy): chunks of whole rows. Each chunk gives its
  statistics, then its logits' gradient from the same tiles, then that gradient's share of the
  hidden states' gradient and of the weight's (``WeightGradient``: float32-accurate across
  chunks). 4 GEMMs, as many as the unfused path.
- ``forward_sweep`` and ``backward_sweep`` (the recomputing strategy): forward keeps only the
  statistics; backward sweeps blocks of the vocabulary, recomputes each block's logits for the
  valid rows, and turns them into d loss / d logits and two GEMMs (a float32 [rows, H]
  accumulator for the hidden states, a float32 [block, H] one per block of the weight, rounded
  once to the weight's dtype). 6 GEMMs, the least memory.

Either way nothing of size N x V exists. The custom operators that call these sweeps are in
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
# backend's own temporaries have their own bound); backward, and forward when it forms the
# gradients, those two and the logits' gradient.
_FORWARD_TILES, _BACKWARD_TILES = 2, 3
_VOCAB_ALIGN = 128  # vocabulary blocks are multiples of this (GEMM-friendly widths)
_MIN_VOCAB_BLOCK = 1024  # backward keeps at least this wide a block before it splits rows
_WIDEN_COLUMNS = 4096  # weight rows widened at a time where no wide-output GEMM exists


def budget_bytes() -> int:
    """The working set of the logits tiles; ``AKL_FUSED_LINEAR_BUDGET_MB`` overrides it."""
    return int(environment_megabytes("AKL_FUSED_LINEAR_BUDGET_MB", DEFAULT_BUDGET_MB) * 2**20)


class Tiling(NamedTuple):
    forward_rows: int  # rows per forward chunk (full vocabulary)
    gradient_rows: int  # rows per chunk of a forward pass that forms the gradients
    in_place_rows: int  # the same when the gradient is written over the student's tile
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
    gradient_rows = chunk_size or max(1, budget // (vocab * itemsize * _BACKWARD_TILES))
    # Two tiles when the gradient overwrites the student's, sized as 2.5 to leave room for the
    # weight's gradient accumulating beside them (measured: docs/fused_linear.md).
    in_place_rows = chunk_size or max(1, 2 * budget // (vocab * itemsize * 5))
    per_row = itemsize * _BACKWARD_TILES
    block = min(vocab, _MIN_VOCAB_BLOCK)
    backward_rows = chunk_size or max(1, min(n_rows, budget // (per_row * block)))
    vocab_block = budget // (per_row * min(backward_rows, n_rows))
    vocab_block = max(_VOCAB_ALIGN, vocab_block // _VOCAB_ALIGN * _VOCAB_ALIGN)
    return Tiling(min(forward_rows, n_rows), min(gradient_rows, n_rows),
                  min(in_place_rows, n_rows), min(backward_rows, n_rows),
                  min(vocab_block, vocab), dtype)


class LinearHead(NamedTuple):
    """``logits = hidden @ weight.T + bias``; ``hidden`` holds the valid rows only."""

    hidden: torch.Tensor  # [n, H]
    weight: torch.Tensor  # [V, H]
    bias: torch.Tensor | None  # [V]

    def logits(self, rows: slice, vocab: slice, dtype: torch.dtype, out=None) -> torch.Tensor:
        out = matmul_wide(self.hidden[rows], self.weight[vocab].T, dtype, out)
        if self.bias is not None:
            out += self.bias[vocab]
        return out


class GivenLogits(NamedTuple):
    """A teacher given as logits [N, V]; ``rows`` indexes the valid rows (None: all)."""

    all_logits: torch.Tensor
    rows: torch.Tensor | None

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


@functools.cache
def _wide_output_gemm(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether ``torch.mm(a, b, out_dtype=torch.float32)`` runs for ``dtype`` inputs here
    (CUDA in torch >= 2.8; not on CPU)."""
    try:
        one = torch.ones(1, 1, dtype=dtype, device=device)
        return torch.mm(one, one, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError, NotImplementedError):
        return False


def matmul_wide(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` in ``dtype`` (float32 or float64) without rounding to the inputs' precision,
    into ``out`` if given (contiguous, of that shape and dtype)."""
    if a.dtype == b.dtype == dtype:
        return torch.mm(a, b, out=out)
    if a.dtype == b.dtype and dtype == torch.float32 and _wide_output_gemm(a.dtype, a.device):
        # The low-precision GEMM's float32 accumulator, stored as is (exact products, fast).
        if out is None:
            return torch.mm(a, b, out_dtype=torch.float32)
        return torch.mm(a, b, out_dtype=torch.float32, out=out)
    # No bf16/fp16 GEMM with a float32 output (CPU): widen b a block of columns at a time, so
    # no wide copy of a whole weight exists.
    if out is None:
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


def _balanced_spans(total: int, most: int):
    """As few spans of at most ``most`` as cover ``total``, of sizes differing by one at most
    (no small last chunk: the weight's gradient takes one GEMM per chunk)."""
    count = -(-total // max(most, 1))
    for k in range(count):
        yield slice(k * total // count, (k + 1) * total // count)


class TileBuffers:
    """The wide (float32; float64 for float64 inputs) tiles of one sweep, one reused buffer per
    role ("student", "teacher", "gradient"), each tile a contiguous view of its buffer's front.
    On CPU a fresh tile of tens of MiB is a fresh mapping (glibc maps every block over 32 MiB
    anew), page-faulted in again by the GEMM that fills it: 1 GiB per call at the CPU
    benchmark's shape. (CUDA's caching allocator reuses the memory anyway.) A buffer is sized
    for ``most_rows`` rows at its first tile, the widest (a sweep's first vocabulary block is),
    so it is never replaced by a larger one while both are alive."""

    def __init__(self, dtype: torch.dtype, device: torch.device, most_rows: int):
        self.dtype, self.device, self.most_rows = dtype, device, most_rows
        self._buffers: dict[str, torch.Tensor] = {}

    def __call__(self, role: str, rows: int, columns: int) -> torch.Tensor:
        size = rows * columns
        buffer = self._buffers.get(role)
        if buffer is None or buffer.numel() < size:
            self._buffers.pop(role, None)  # this reference to the old one dropped first
            buffer = self._buffers[role] = torch.empty(
                max(size, self.most_rows * columns), dtype=self.dtype, device=self.device)
        return buffer[:size].view(rows, columns)


def _tile_logits(student: LinearHead, teacher, rows: slice, vocab: slice, tiles: TileBuffers):
    """(student logits, teacher logits) of a tile, in ``tiles``; the teacher's are None for a
    sparse teacher, and the student's own for none (the cross-entropy alone)."""
    n_rows = len(range(*rows.indices(student.hidden.shape[0])))
    width = len(range(*vocab.indices(student.weight.shape[0])))
    s = student.logits(rows, vocab, tiles.dtype, tiles("student", n_rows, width))
    if isinstance(teacher, GivenTopK):
        return s, None
    if teacher is None:
        return s, s
    if isinstance(teacher, LinearHead):
        return s, teacher.logits(rows, vocab, tiles.dtype, tiles("teacher", n_rows, width))
    return s, teacher.logits(rows, vocab, tiles.dtype)  # given logits: a view or a gather


def _chunk_forward(s, t, teacher, span, labels, cfg, backend):
    """A chunk of whole rows: (row losses, row statistics, parts or None). A sparse teacher's
    statistics carry its categories' unit gradient (``GivenTopK``)."""
    ones = torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    span_labels = None if labels is None else labels[span]
    if isinstance(teacher, GivenTopK):
        idx, lp = teacher.indices[span], teacher.logprobs[span]
        result = backend.topk_forward(s, idx, lp, ones, cfg, labels=span_labels)
        unit = torch_topk.unit_category_gradient(s, idx, lp, result.row_stats, cfg)
        return result.loss, torch.cat([result.row_stats, unit], dim=1), result.parts
    result = backend.forward(s, t, ones, cfg, labels=span_labels)
    return result.loss, result.row_stats, result.parts


def _logits_gradient(s, t, teacher, row_stats, coef, labels, cfg, backend, span: slice,
                     block: slice, gemm_dtype, out=None):
    """d loss / d logits of the tile (rows ``span``, vocabulary ``block``) whose logits are
    ``s`` and ``t``, for ``coef`` per row, in ``gemm_dtype``: elementwise given the rows'
    statistics (``row_stats`` of these rows); into ``out`` if given (a dense teacher's; it may
    be ``s`` itself)."""
    shifted = None if labels is None else labels[span] - block.start
    if isinstance(teacher, GivenTopK):
        return backend.topk_backward(
            s, teacher.indices[span], teacher.logprobs[span], row_stats[:, :N_TOPK_STATS],
            coef, cfg, labels=shifted, grad_dtype=gemm_dtype,
            category_grad=row_stats[:, N_TOPK_STATS:], column_offset=block.start)
    return backend.backward(s, t, row_stats, coef, cfg, labels=shifted, grad_dtype=gemm_dtype,
                            out=out)


def forward_sweep(student: LinearHead, teacher, labels, cfg, backend, tiles: Tiling):
    """Each valid row's loss, statistics and parts (None without the cross-entropy), from
    row chunks of both models' float32 logits. ``teacher`` is a ``LinearHead``,
    ``GivenLogits``, ``GivenTopK`` or None (the student's own logits stand in: the
    cross-entropy alone)."""
    n_valid = student.hidden.shape[0]
    buffers = TileBuffers(tiles.dtype, student.hidden.device, tiles.forward_rows)
    losses, stats, parts = [], [], []
    for span in _spans(n_valid, tiles.forward_rows):
        s, t = _tile_logits(student, teacher, span, slice(None), buffers)
        loss, row_stats, part = _chunk_forward(s, t, teacher, span, labels, cfg, backend)
        # A gathered teacher tile is not a buffer's: freed before the next chunk's exists.
        del s, t
        losses.append(loss)
        stats.append(row_stats)
        parts.append(part)
    return torch.cat(losses), torch.cat(stats), torch.cat(parts) if cfg.with_ce else None


class Gradients(NamedTuple):
    """The student's gradients, each None where not asked for: hidden states [n, H] and bias
    [V] in float32, the weight [V, H] in its own dtype."""

    hidden: torch.Tensor | None
    weight: torch.Tensor | None
    bias: torch.Tensor | None


def _empty_gradients(student: LinearHead, wide, *, need_hidden, need_bias):
    """The hidden states' and the bias's float32 accumulators (the weight's is the caller's)."""
    device = student.hidden.device
    return Gradients(
        torch.zeros(student.hidden.shape, dtype=wide, device=device) if need_hidden else None,
        None,
        torch.zeros(student.weight.shape[0], dtype=wide, device=device) if need_bias else None)


def _add_tile(grads: Gradients, g, student: LinearHead, span, block, weight_grad):
    """A tile's logits gradient ``g`` [rows, block] into the gradients; the weight's goes
    into ``weight_grad`` (a float32 accumulator of the block's rows), if any."""
    if grads.bias is not None:
        grads.bias[block] += g.sum(dim=0, dtype=grads.bias.dtype)
    if grads.hidden is not None:
        _add_product(grads.hidden[span], g, student.weight[block])
    if isinstance(weight_grad, WeightGradient):
        weight_grad.add_product(g, student.hidden[span])
    elif weight_grad is not None:
        _add_product(weight_grad, g.T, student.hidden[span])


def backward_sweep(student: LinearHead, teacher, row_stats, coef, labels, cfg, backend,
                   tiles: Tiling, *, need_hidden: bool, need_weight: bool,
                   need_bias: bool) -> Gradients:
    """The recomputing backward pass: vocabulary blocks outside, row tiles inside, each tile's
    logits computed again from the hidden states; a block's weight gradient is float32-
    accumulated over every row, then rounded once to the weight's dtype."""
    n_valid, vocab = student.hidden.shape[0], student.weight.shape[0]
    wide, device = tiles.dtype, student.hidden.device
    grads = _empty_gradients(student, wide, need_hidden=need_hidden, need_bias=need_bias)
    weight = torch.zeros_like(student.weight) if need_weight else None
    gemm_dtype = _gemm_dtype(student.weight, wide)
    buffers = TileBuffers(wide, device, tiles.backward_rows)
    # A dense teacher's logits gradient in its own reused tile where it has the tiles' dtype.
    own_tile = gemm_dtype == wide and not isinstance(teacher, GivenTopK)
    for block in _spans(vocab, tiles.vocab_block) if n_valid else ():
        block_grad = (torch.zeros(student.weight[block].shape, dtype=wide, device=device)
                      if need_weight else None)
        for span in _spans(n_valid, tiles.backward_rows):
            s, t = _tile_logits(student, teacher, span, block, buffers)
            out = buffers("gradient", *s.shape) if own_tile else None
            g = _logits_gradient(s, t, teacher, row_stats[span], coef[span], labels, cfg,
                                 backend, span, block, gemm_dtype, out)
            _add_tile(grads, g, student, span, block, block_grad)
            del s, t, g  # a gathered teacher's tile, a backend's gradient: not buffers'
        if need_weight:
            weight[block] = block_grad
    return grads._replace(weight=weight)


_COMPENSATED_BLOCK = 4096  # weight rows per float32 product in a compensated accumulation


class WeightGradient:
    """The weight's gradient accumulated across row chunks to float32 accuracy.

    A float32 weight's is a float32 sum: the gradient itself. A bf16/fp16 weight's is a
    compensated pair in the weight's dtype, ``hi + lo`` (each chunk's float32 product added to
    it in float32, then split again: ``hi`` the rounded sum, ``lo`` what the rounding dropped),
    so the accumulation holds two buffers in the weight's dtype (the bytes of one float32
    buffer) and no float32 copy is rounded into a third at the end. The pair carries about
    twice the dtype's significand: what it drops per chunk (about ``2**-16`` of the sum for
    bf16) is far below the final rounding to the weight's dtype (``2**-8``);
    ``tests/test_fused_linear.py`` measures the result against float64."""

    def __init__(self, weight: torch.Tensor, wide: torch.dtype):
        plain = weight.dtype == wide
        # A plain sum starts as its first product (no zeros written and read back first).
        self.hi = (torch.empty if plain else torch.zeros)(weight.shape, dtype=weight.dtype,
                                                           device=weight.device)
        self.lo = None if plain else torch.zeros_like(self.hi)
        self.wide, self.empty = wide, plain

    def add_product(self, g: torch.Tensor, hidden: torch.Tensor) -> None:
        """+= g.T @ hidden (g [rows, V], hidden [rows, H])."""
        if self.lo is None:
            if self.empty and g.dtype == hidden.dtype == self.hi.dtype:
                torch.mm(g.T, hidden, out=self.hi)
            else:
                if self.empty:
                    self.hi.zero_()
                _add_product(self.hi, g.T, hidden)
            self.empty = False
            return
        for block in _spans(self.hi.shape[0], _COMPENSATED_BLOCK):
            total = matmul_wide(g[:, block].T, hidden, self.wide)
            total += self.lo[block]
            total += self.hi[block]
            self.hi[block] = total  # rounded to the weight's dtype
            self.lo[block] = total.sub_(self.hi[block])  # what that rounding dropped

    def result(self) -> torch.Tensor:
        if self.empty:  # no row was added
            self.hi.zero_()
        if self.lo is not None:
            self.hi += self.lo
            self.lo = None
        return self.hi


def forward_gradient_sweep(student: LinearHead, teacher, labels, cfg, backend, tiles: Tiling,
                           *, need_hidden: bool, need_weight: bool, need_bias: bool,
                           label_offset: int = 0):
    """The forward pass that also forms the gradients for a unit coefficient per row (the
    caller scales them by the incoming gradient: one number for a "mean" or "sum" loss). Each
    chunk of whole rows gives its statistics, then its logits' gradient from the same tiles, so
    no logits are computed twice: 4 GEMMs, where the recomputing backward makes 6. The weight's
    gradient is accumulated across chunks in float32 (in the gradient itself for a float32
    weight). ``label_offset``: where the weight's rows start in the vocabulary that
    ``labels`` index (a vocabulary slice's). (row losses, statistics, parts or None,
    Gradients)."""
    n_valid = student.hidden.shape[0]
    wide = tiles.dtype
    grads = _empty_gradients(student, wide, need_hidden=need_hidden, need_bias=need_bias)
    weight_grad = WeightGradient(student.weight, wide) if need_weight else None
    gemm_dtype = _gemm_dtype(student.weight, wide)
    every_vocab = slice(0, student.weight.shape[0])
    gradient_labels = labels if labels is None or not label_offset else labels - label_offset
    # The logits' gradient over the student's tile when it has the GEMM's dtype (float32
    # GEMMs; a dense teacher, so that the tile is not the teacher's too): two tiles per row
    # then, not three, so the same budget holds wider chunks.
    in_place = (gemm_dtype == wide and isinstance(teacher, (LinearHead, GivenLogits)))
    rows = tiles.in_place_rows if in_place else tiles.gradient_rows
    spans = list(_balanced_spans(n_valid, rows))
    buffers = TileBuffers(wide, student.hidden.device,
                          max((span.stop - span.start for span in spans), default=0))
    losses, stats, parts = [], [], []
    for span in spans:
        s, t = _tile_logits(student, teacher, span, every_vocab, buffers)
        loss, row_stats, part = _chunk_forward(s, t, teacher, span, labels, cfg, backend)
        unit = torch.ones_like(loss)
        g = _logits_gradient(s, t, teacher, row_stats, unit, gradient_labels, cfg, backend,
                             span, every_vocab, gemm_dtype, s if in_place else None)
        _add_tile(grads, g, student, span, every_vocab, weight_grad)
        del s, t, g  # a gathered teacher's tile, a backend's gradient: not buffers'
        losses.append(loss)
        stats.append(row_stats)
        parts.append(part)
    if need_weight:
        grads = grads._replace(weight=weight_grad.result())
    return (torch.cat(losses), torch.cat(stats), torch.cat(parts) if cfg.with_ce else None,
            grads)
