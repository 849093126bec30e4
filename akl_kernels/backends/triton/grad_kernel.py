"""Backward kernel: the gradient w.r.t. the student logits from the forward's row statistics.

Elementwise once the row statistics are known, so the grid is (rows, vocabulary chunks):
one read of s and t, one write of the gradient, the floor of docs/contract.md §4.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from akl_kernels.backends.triton import launch
from akl_kernels.backends.triton import stat_columns as stat
from akl_kernels.backends.triton.forward_kernel import pointwise_args
from akl_kernels.backends.triton.row_passes import TVD, load_log_probs, pointwise_terms, tvd_grad


@triton.jit
def _divergence_grad_kernel(
    s_ptr,
    t_ptr,
    stats_ptr,
    coef_ptr,
    grad_ptr,
    labels_ptr,
    V,
    stride_s,
    stride_t,
    inv_t,
    pointwise,  # 0: the KL family; else the pointwise divergence's code (pointwise_terms)
    param,
    log_wp,
    log_wq,
    a0,  # the pointwise gradient's reference value (backends/torch/pointwise.py)
    t_scale,  # T
    kd_scale,  # the divergence's weight times d zs / d s = 1/T; 0: not evaluated
    ce_weight,  # the cross-entropy's weight (1 - kd_ratio); 0: not evaluated
    POINTWISE: tl.constexpr,  # the pointwise family's formula (else the KL family's)
    WITH_CE: tl.constexpr,  # distillation_loss's cross-entropy
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    coef = tl.load(coef_ptr + row)
    stats_row = stats_ptr + row * stat.N_STATS
    m_s = tl.load(stats_row + stat.M_S)
    logz_s = tl.load(stats_row + stat.LOGZ_S)
    m_t = tl.load(stats_row + stat.M_T)
    logz_t = tl.load(stats_row + stat.LOGZ_T)
    log_q, log_p, contributing, zs, _ = load_log_probs(
        s_ptr + row * stride_s, t_ptr + row * stride_t, offs, V, inv_t, m_s, logz_s, m_t, logz_t)
    q = tl.exp(log_q)
    p = tl.exp(log_p)
    if not POINTWISE:
        # docs/contract.md §2: dFKL = q P_C - p [C];
        # dRKL = [C] q (log q - log p + 1) - q (RKL + Q_C)
        d_fkl = q * tl.load(stats_row + stat.P_C) - tl.where(contributing, p, 0.0)
        d_rkl = (tl.where(contributing, q * (log_q - log_p + 1.0), 0.0)
                 - q * (tl.load(stats_row + stat.RKL) + tl.load(stats_row + stat.Q_C)))
        w_f = tl.load(stats_row + stat.W_F)
        d_divergence = w_f * d_fkl + tl.load(stats_row + stat.W_R) * d_rkl
    elif pointwise == TVD:
        d_divergence = tvd_grad(log_p, log_q, contributing,
                                tl.load(stats_row + stat.Q_ABOVE),
                                tl.load(stats_row + stat.Q_BELOW),
                                tl.load(stats_row + stat.Q_REST))
    else:  # e - q H_SUM, e = h on C and -a0 q outside (backends/torch/pointwise.py)
        _, h = pointwise_terms(pointwise, log_p, log_q, param, log_wp, log_wq)
        h_sum = tl.load(stats_row + stat.H_SUM)
        d_divergence = tl.where(contributing, h, -a0 * q) - q * h_sum
    d_loss = tl.where(kd_scale != 0.0, kd_scale * d_divergence, 0.0)
    if WITH_CE:  # d CE / d s = softmax(s) - onehot(label), at T = 1 (s = zs T)
        # As the forward pass summed it: M_1 = m_s T, so (zs - m_s) T = s - M_1.
        q_1 = tl.exp((zs - m_s) * t_scale - tl.load(stats_row + stat.LOGZ_1))
        hit = offs == tl.load(labels_ptr + row)
        d_ce = q_1 - tl.where(hit, 1.0, 0.0)
        d_loss += tl.where(ce_weight != 0.0, ce_weight * d_ce, 0.0)
    grad = tl.where(coef != 0.0, coef * d_loss, 0.0)
    tl.store(grad_ptr + row * V + offs, grad.to(grad_ptr.dtype.element_ty), mask=offs < V)


def backward(s2d, t2d, row_stats, coef, cfg, *, labels=None, grad_dtype=None, out=None):
    n_rows, vocab = s2d.shape
    # ``out`` may be s2d itself (contiguous): each program reads its block before writing it.
    grad = out if out is not None else torch.empty(
        (n_rows, vocab), dtype=grad_dtype or s2d.dtype, device=s2d.device)
    if n_rows > 0:
        settings = launch.backward_launch(vocab)
        grid = (n_rows, triton.cdiv(vocab, settings["BLOCK"]))
        _divergence_grad_kernel[grid](
            s2d,
            t2d,
            row_stats,
            coef.to(torch.float32),
            grad,
            launch.labels_or_dummy(labels, grad.device),
            vocab,
            s2d.stride(0),
            t2d.stride(0),
            1.0 / cfg.temperature,
            *pointwise_args(cfg),
            cfg.temperature,
            cfg.divergence_weight / cfg.temperature,
            cfg.cross_entropy_weight,
            POINTWISE=cfg.pointwise_code != 0,
            WITH_CE=cfg.with_ce,
            **settings,
        )
    return grad
