"""Backward kernel: the gradient w.r.t. the student logits from the forward's row statistics.

Elementwise once the row statistics are known, so the grid is (rows, vocabulary chunks):
one read of s and t, one write of the gradient, the floor of SPEC section 4.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from akl_kernels.autograd import N_ROW_STATS
from akl_kernels.kernels import heuristics
from akl_kernels.kernels.forward import pointwise_args
from akl_kernels.kernels.row_passes import load_scaled, pointwise_terms


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
    t_scale,  # T
    kd_scale,  # kd_ratio / T: the divergence's weight times d zs / d s
    ce_weight,  # 1 - kd_ratio
    POINTWISE: tl.constexpr,  # the pointwise family's formula (else the KL family's)
    WITH_CE: tl.constexpr,  # distillation_loss's cross-entropy
    BLOCK: tl.constexpr,
    N_STATS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    coef = tl.load(coef_ptr + row)
    stats_row = stats_ptr + row * N_STATS
    m_s = tl.load(stats_row + 0)  # column order of akl_kernels.autograd
    logz_s = tl.load(stats_row + 1)
    m_t = tl.load(stats_row + 2)
    logz_t = tl.load(stats_row + 3)
    rkl = tl.load(stats_row + 4)
    p_c = tl.load(stats_row + 5)
    q_c = tl.load(stats_row + 6)
    w_f = tl.load(stats_row + 7)
    w_r = tl.load(stats_row + 8)
    zs = load_scaled(s_ptr + row * stride_s, offs, V, inv_t)
    zt = load_scaled(t_ptr + row * stride_t, offs, V, inv_t)
    log_q = (zs - m_s) - logz_s
    log_p = (zt - m_t) - logz_t
    q = tl.exp(log_q)
    p = tl.exp(log_p)
    contributing = (zs != float("-inf")) & (zt != float("-inf"))
    if not POINTWISE:
        # SPEC 2: dFKL = q P_C - p [C];  dRKL = [C] q (log q - log p + 1) - q (RKL + Q_C)
        d_fkl = q * p_c - tl.where(contributing, p, 0.0)
        d_rkl = tl.where(contributing, q * (log_q - log_p + 1.0), 0.0) - q * (rkl + q_c)
        d_loss = w_f * d_fkl + w_r * d_rkl
    else:  # [C] h - q sum_C h (akl_kernels/pointwise.py)
        _, h = pointwise_terms(pointwise, log_p, log_q, param, log_wp, log_wq)
        d_loss = tl.where(contributing, h, 0.0) - q * tl.load(stats_row + 9)
    d_loss = kd_scale * d_loss
    if WITH_CE:  # d CE / d s = softmax(s) - onehot(label), at T = 1
        q_1 = tl.exp((zs - m_s) * t_scale - tl.load(stats_row + 11))
        hit = offs == tl.load(labels_ptr + row)
        d_loss += ce_weight * (q_1 - tl.where(hit, 1.0, 0.0))
    grad = tl.where(coef != 0.0, coef * d_loss, 0.0)
    tl.store(grad_ptr + row * V + offs, grad.to(grad_ptr.dtype.element_ty), mask=offs < V)


def backward(s2d, t2d, row_stats, coef, cfg, labels=None, grad_dtype=None):
    n_rows, vocab = s2d.shape
    grad = torch.empty((n_rows, vocab), dtype=grad_dtype or s2d.dtype, device=s2d.device)
    if n_rows > 0:
        launch = heuristics.backward_launch(vocab)
        grid = (n_rows, triton.cdiv(vocab, launch["BLOCK"]))
        _divergence_grad_kernel[grid](
            s2d,
            t2d,
            row_stats,
            coef.to(torch.float32),
            grad,
            labels if labels is not None else torch.zeros(1, dtype=torch.int64, device=grad.device),
            vocab,
            s2d.stride(0),
            t2d.stride(0),
            1.0 / cfg.temperature,
            *pointwise_args(cfg),
            cfg.temperature,
            cfg.kd_ratio / cfg.temperature,
            1.0 - cfg.kd_ratio,
            POINTWISE=cfg.pointwise_code != 0,
            WITH_CE=cfg.with_ce,
            N_STATS=N_ROW_STATS,
            **launch,
        )
    return grad
