"""Sparse (top-k) teachers on the Triton backend (docs/contract.md §6; docs/topk_teacher.md).

Two sweeps over the student's row, the only ``V``-sized work, are kernels:

- ``_student_side_kernel`` (forward, one program per row): gathers the row's k logits, then
  reads the row once for its max and normaliser and, in the same sweep, the normaliser at
  T = 1 for the fused cross-entropy. The mass outside the k tokens is ``Z - Z_k`` with both
  sums in float64 over *the same* float32 terms: the running max starts at the k tokens' max,
  so unless a token outside them is larger (and then the rest is not small) every term is
  ``exp(z_j - M)`` exactly as the k tokens' are recomputed, and the difference is the rest's
  own sum to float64 rounding, not a cancellation of float32 sums.
- ``_dense_grad_kernel`` (backward, elementwise over (rows, chunks)): the rest category's
  share of the gradient, ``g_rest q_j / Q_rest``, and the cross-entropy's ``q1 - onehot``,
  written for every token; ``_token_grad_kernel`` then overwrites the k tokens' entries with
  their categories' gradient (a second launch, so it lands after the sweep).

Between them the work is on ``[N, k + 1]`` tensors only, done by the torch backend's own
functions (backends/torch/topk.py), so both backends share the categories' algebra.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from akl_kernels.backends.torch import topk as torch_topk
from akl_kernels.backends.torch.chunked import RowOutputs
from akl_kernels.backends.triton import launch
from akl_kernels.backends.triton.row_passes import load_scaled
from akl_kernels.row_results import N_TOPK_STATS, TopKStat, loss_dtype
from akl_kernels.row_results import RowStat as S

# The k tokens are gathered K_BLOCK at a time (a loop): one specialisation to compile for every
# k; the few masked lanes of a small k cost nothing next to the row's sweep.
K_BLOCK = 64
# Columns of the student-side buffer [N, 6] the forward kernel writes.
_M, _LOGZ, _LOGZ_REST, _BAD, _M_1, _LOGZ_1 = (tl.constexpr(k) for k in range(6))
_N_SIDE = tl.constexpr(6)
# Columns of the per-row coefficients [N, 5] the gradient kernels read.
_SHIFT, _C_REST, _CE_COEF, _G_M1, _G_LOGZ1 = (tl.constexpr(k) for k in range(5))
_N_COEF = tl.constexpr(5)


@triton.jit
def _load_indices(idx_row, k0, K, K_BLOCK: tl.constexpr):
    """K_BLOCK of a row's k indices from k0 (-1: padding or past the end)."""
    k_offs = k0 + tl.arange(0, K_BLOCK)
    return tl.load(idx_row + k_offs, mask=k_offs < K, other=-1)


@triton.jit
def _gather_scaled(row_ptr, idx, present, inv_t):
    # As load_scaled computes it, so that exp(z - m) of a token is the same here and in the
    # sweep (the float64 rest mass relies on it).
    x = tl.load(row_ptr + idx, mask=present, other=float("-inf")).to(tl.float32)
    return x * inv_t + 0.0


@triton.jit
def _student_side_kernel(
    s_ptr,
    idx_ptr,  # [N, K] int64, -1 at padding
    side_ptr,  # [N, 6] float32 out
    V,
    K,
    stride_s,
    inv_t,
    t_scale,  # T: the cross-entropy's logits are zs * T
    WITH_CE: tl.constexpr,
    BLOCK: tl.constexpr,
    K_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * stride_s
    idx_row = idx_ptr + row * K
    # The running max starts at the k tokens' (-inf when none is present).
    m = float("-inf")
    for k0 in range(0, K, K_BLOCK):
        idx = _load_indices(idx_row, k0, K, K_BLOCK)
        m = tl.maximum(m, tl.max(_gather_scaled(s_row, idx, idx >= 0, inv_t), axis=0))
    acc = tl.zeros([BLOCK], dtype=tl.float64)
    acc_1 = tl.zeros([BLOCK], dtype=tl.float32)
    bad = tl.zeros([BLOCK], dtype=tl.int1)
    for start in range(0, V, BLOCK):
        zs = load_scaled(s_row, start + tl.arange(0, BLOCK), V, inv_t)
        bad = bad | (zs != zs) | (zs == float("inf"))  # noqa: PLR0124 (NaN)
        m_new = tl.maximum(m, tl.max(zs, axis=0))
        # Shifts by a finite stand-in while nothing finite is seen (no -inf - -inf).
        old = tl.where(m > float("-inf"), m, 0.0)
        new = tl.where(m_new > float("-inf"), m_new, 0.0)
        acc = acc * tl.exp(old - new).to(tl.float64) + tl.exp(zs - new).to(tl.float64)
        if WITH_CE:
            acc_1 = acc_1 * tl.exp((old - new) * t_scale) + tl.exp((zs - new) * t_scale)
        m = m_new
    m_use = tl.where(m > float("-inf"), m, 0.0)
    z = tl.sum(acc, axis=0)
    acc_k = tl.zeros([K_BLOCK], dtype=tl.float64)
    for k0 in range(0, K, K_BLOCK):
        idx = _load_indices(idx_row, k0, K, K_BLOCK)
        zs_k = _gather_scaled(s_row, idx, idx >= 0, inv_t)
        acc_k += tl.where(idx >= 0, tl.exp(zs_k - m_use), 0.0).to(tl.float64)
    z_rest = tl.maximum(z - tl.sum(acc_k, axis=0), 0.0)
    out = side_ptr + row * _N_SIDE
    tl.store(out + _M, m_use)
    tl.store(out + _LOGZ, tl.log(z.to(tl.float32)))
    tl.store(out + _LOGZ_REST, tl.log(z_rest.to(tl.float32)))
    tl.store(out + _BAD, tl.max(bad.to(tl.float32), axis=0))
    if WITH_CE:
        tl.store(out + _M_1, m_use * t_scale)
        tl.store(out + _LOGZ_1, tl.log(tl.sum(acc_1, axis=0)))


@triton.jit
def _ce_grad(x, offs, label, m_1, logz_1, ce_coef):
    """ce_coef * (softmax(s) - onehot(label)) at T = 1, s = x (unscaled logits)."""
    q_1 = tl.exp((x - m_1) - logz_1)
    return ce_coef * (q_1 - tl.where(offs == label, 1.0, 0.0))


@triton.jit
def _dense_grad_kernel(
    s_ptr,
    coef_ptr,  # [N, 5] float32 (_SHIFT ...)
    live_ptr,  # [N] int8: 0 writes exact zeros (ignored rows)
    labels_ptr,
    grad_ptr,
    V,
    stride_s,
    inv_t,
    WITH_CE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    coefs = coef_ptr + row * _N_COEF
    x = tl.load(s_ptr + row * stride_s + offs, mask=offs < V, other=float("-inf"))
    x = x.to(tl.float32)
    # q_j / Q_rest = exp(zs_j - M - log Z_rest) <= 1 outside the k tokens; the k tokens'
    # entries are overwritten by _token_grad_kernel.
    g = tl.load(coefs + _C_REST) * tl.exp((x * inv_t + 0.0) - tl.load(coefs + _SHIFT))
    if WITH_CE:
        g += _ce_grad(x, offs, tl.load(labels_ptr + row), tl.load(coefs + _G_M1),
                      tl.load(coefs + _G_LOGZ1), tl.load(coefs + _CE_COEF))
    g = tl.where(tl.load(live_ptr + row) != 0, g, 0.0)
    tl.store(grad_ptr + row * V + offs, g.to(grad_ptr.dtype.element_ty), mask=offs < V)


@triton.jit
def _token_grad_kernel(
    s_ptr,
    idx_ptr,  # [N, K] int64, -1 at padding
    g_cat_ptr,  # [N, K] float32: the k categories' gradient (coefficients applied)
    coef_ptr,
    live_ptr,
    labels_ptr,
    grad_ptr,
    V,
    K,
    stride_s,
    WITH_CE: tl.constexpr,
    K_BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    live = tl.load(live_ptr + row) != 0
    coefs = coef_ptr + row * _N_COEF
    for k0 in range(0, K, K_BLOCK):
        idx = _load_indices(idx_ptr + row * K, k0, K, K_BLOCK)
        present = idx >= 0
        g = tl.load(g_cat_ptr + row * K + k0 + tl.arange(0, K_BLOCK), mask=present, other=0.0)
        if WITH_CE:
            x = tl.load(s_ptr + row * stride_s + idx, mask=present, other=0.0).to(tl.float32)
            g += _ce_grad(x, idx, tl.load(labels_ptr + row), tl.load(coefs + _G_M1),
                          tl.load(coefs + _G_LOGZ1), tl.load(coefs + _CE_COEF))
        g = tl.where(live, g, 0.0)
        tl.store(grad_ptr + row * V + idx, g.to(grad_ptr.dtype.element_ty), mask=present)


def _kernel_indices(indices, present):
    return torch.where(present, indices, -1).contiguous()


def forward(s2d, indices, logprobs, valid, cfg, *, labels=None, head_stats=False):
    n_rows, vocab = s2d.shape
    dtype = loss_dtype(s2d, logprobs)
    indices, present, logprobs = torch_topk.prepare(indices, logprobs, cfg)
    outputs = RowOutputs.empty(n_rows, N_TOPK_STATS, dtype, s2d.device, cfg, head_stats)
    if n_rows == 0:
        return outputs.result()
    side = torch.empty(n_rows, _N_SIDE.value, dtype=torch.float32, device=s2d.device)
    k = indices.shape[1]
    settings = launch.topk_launch(vocab)
    _student_side_kernel[(n_rows,)](
        s2d, _kernel_indices(indices, present), side, vocab, k, s2d.stride(0),
        1.0 / cfg.temperature, cfg.temperature, WITH_CE=cfg.with_ce, K_BLOCK=K_BLOCK,
        **settings)
    zs_k = torch_topk.gathered_scaled(s2d, indices, torch.float32, 1.0 / cfg.temperature)
    column = lambda c: side[:, c.value]  # noqa: E731
    student = torch_topk.StudentSide(zs_k, column(_M), column(_LOGZ), column(_LOGZ_REST),
                                     column(_BAD) != 0)
    ce = None
    if cfg.with_ce:
        m_1, logz_1 = column(_M_1), column(_LOGZ_1)
        target = s2d.gather(1, labels.clamp(0, vocab - 1)[:, None])[:, 0].to(torch.float32)
        ce = ((m_1 - target) + logz_1, m_1, logz_1)
    torch_topk.store_rows(outputs, torch.arange(n_rows, device=s2d.device), student, logprobs,
                          present, valid, cfg, ce)
    return outputs.result()


def backward(s2d, indices, logprobs, row_stats, coef, cfg, *, labels=None, grad_dtype=None,
             category_grad=None, column_offset=0):
    """As the torch backend's ``topk.backward`` (``category_grad`` and ``column_offset``: a
    block of the vocabulary's columns, for the fused linear losses)."""
    n_rows, vocab = s2d.shape
    grad = torch.empty((n_rows, vocab), dtype=grad_dtype or s2d.dtype, device=s2d.device)
    if n_rows == 0:
        return grad
    indices, present, logprobs = torch_topk.prepare(indices, logprobs, cfg)
    k = indices.shape[1]
    inv_t = 1.0 / cfg.temperature
    st = row_stats
    broken = torch.isnan(st[:, TopKStat.M_FULL])
    if cfg.divergence_weight == 0:
        g_cat = torch.zeros(n_rows, k + 1, dtype=torch.float32, device=s2d.device)
    elif category_grad is not None:
        g_cat = category_grad * coef[:, None]
    else:
        zs_k = torch_topk.gathered_scaled(s2d, indices, torch.float32, inv_t)
        g_cat = torch_topk.category_gradient(zs_k, logprobs, present, st,
                                             coef * (cfg.divergence_weight * inv_t), cfg)
    g_cat = torch.where(broken[:, None], float("nan"), g_cat)
    logz_rest = st[:, TopKStat.LOGZ_REST]
    shift = st[:, TopKStat.M_FULL]
    c_rest = torch.zeros_like(shift)
    if cfg.tail == "bucket":
        shift = shift + torch.where(torch.isfinite(logz_rest), logz_rest, 0.0)
        c_rest = g_cat[:, k]
    elif cfg.divergence_weight != 0:
        c_rest = torch.where(broken, float("nan"), c_rest)
    coefs = torch.stack([shift, c_rest, coef * cfg.cross_entropy_weight, st[:, S.M_1],
                         st[:, S.LOGZ_1]], 1).to(torch.float32).contiguous()
    live = (coef != 0).to(torch.int8)
    labels = launch.labels_or_dummy(labels, s2d.device)
    settings = launch.backward_launch(vocab)
    _dense_grad_kernel[(n_rows, triton.cdiv(vocab, settings["BLOCK"]))](
        s2d, coefs, live, labels, grad, vocab, s2d.stride(0), inv_t, WITH_CE=cfg.with_ce,
        **settings)
    block_indices, here = torch_topk.block_tokens(indices, present, column_offset, vocab)
    _token_grad_kernel[(n_rows,)](
        s2d, _kernel_indices(block_indices, here), g_cat[:, :k].to(torch.float32).contiguous(),
        coefs, live, labels, grad, vocab, k, s2d.stride(0), WITH_CE=cfg.with_ce,
        K_BLOCK=K_BLOCK, num_warps=1)
    return grad
