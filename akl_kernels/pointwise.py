"""The pointwise divergences in PyTorch: JSD(beta), skew FKL, skew RKL, TVD.

Each is ``D = sum_{i in C} f(p_i, q_i)`` over the contributing positions C (both logits
> -inf, as for FKL and RKL). With ``h_i = q_i * df/dq_i`` the gradient w.r.t. the student's
scaled logits is ``g_j = [j in C] h_j - q_j * sum_{i in C} h_i`` (differentiate through the
softmax), so a forward pass keeps ``S = sum_C h`` per row and the backward pass is elementwise.

Everything is formed from log-probabilities, with the mixture's log by ``logaddexp``: a token
where both models have log-probability below -104 (float32 p and q round to 0) contributes
exactly 0, never ``0 * log 0``. The Triton twin is ``kernels/row_passes.py:pointwise_terms``.
"""

from __future__ import annotations

import math

import torch


def _log_weight(weight: float) -> float:
    return math.log(weight) if weight > 0 else float("-inf")


def log_mixture(log_p, log_q, weight_p: float):
    """log(weight_p * p + (1 - weight_p) * q)."""
    return torch.logaddexp(log_p + _log_weight(weight_p), log_q + _log_weight(1.0 - weight_p))


def terms(kind: str, log_p, log_q, param: float):
    """(f_i, h_i) per position for ``kind`` in akl_kernels._validation.POINTWISE."""
    q = log_q.exp()
    if kind == "jsd":  # beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q
        log_m = log_mixture(log_p, log_q, param)
        q_part = q * (log_q - log_m)
        return param * log_p.exp() * (log_p - log_m) + (1.0 - param) * q_part, \
            (1.0 - param) * q_part
    if kind == "skew_fkl":  # KL(p || m), m = lam p + (1 - lam) q
        log_m = log_mixture(log_p, log_q, param)
        return log_p.exp() * (log_p - log_m), -(1.0 - param) * torch.exp(log_p + log_q - log_m)
    if kind == "skew_rkl":  # KL(q || m), m = (1 - lam) p + lam q
        log_m = log_mixture(log_p, log_q, 1.0 - param)
        f = q * (log_q - log_m)
        return f, f + q - param * torch.exp(2.0 * log_q - log_m)
    if kind == "tvd":  # 0.5 sum |p - q|
        diff = q - log_p.exp()
        return 0.5 * diff.abs(), 0.5 * q * torch.sign(diff)
    raise ValueError(f"not a pointwise divergence: {kind!r}")
