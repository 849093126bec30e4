"""The pointwise divergences in PyTorch: JSD(beta), skew FKL, skew RKL, TVD.

Each is ``D = sum_{i in C} f(p_i, q_i)`` over the contributing positions C (both logits
> -inf, as for FKL and RKL). With ``h_i = q_i * df/dq_i`` the gradient w.r.t. the student's
scaled logits is ``g_j = [j in C] h_j - q_j * sum_{i in C} h_i`` (differentiate through the
softmax), so a forward pass keeps ``S = sum_C h`` per row and the backward pass is elementwise.
Where nearly all of the student's mass lies where the teacher has almost none, that bracket
cancels: ``h`` is taken relative to its value there (``zero_mass_slope``), and TVD's gradient is
formed from masses summed apart (``tvd_grad``: its bracket ``sign_j - sum_i sign_i q_i`` would
cancel when almost all of the student's mass lies on one side of the teacher's).

Everything is formed from log-probabilities, with the mixture's log by ``log_mixture``: a token
where both models have log-probability below -104 (float32 p and q round to 0) contributes
exactly 0, never ``0 * log 0``. The Triton twin is ``backends/triton/row_passes.py``.
"""

from __future__ import annotations

import math

import torch

from akl_kernels.backends.torch.reductions import row_sum


def log_weight(weight: float) -> float:
    """log of a mixture weight, -inf for a zero one."""
    return math.log(weight) if weight > 0 else float("-inf")


def mixture_weight(kind: str, param: float) -> float:
    """The teacher's weight w_p in the mixture m = w_p p + (1 - w_p) q of ``kind`` (0.5 for
    a divergence without one: the kernels' arguments need a value)."""
    return {"jsd": param, "skew_fkl": param, "skew_rkl": 1.0 - param}.get(kind, 0.5)


def log_mixture(log_p, log_q, weight_p: float):
    """log(weight_p * p + (1 - weight_p) * q), as the Triton twin forms it.

    Not ``torch.logaddexp``: on CPU its vector loop hands the tail of a buffer to a scalar loop
    that rounds differently, so a row's bits would depend on the rows around it; exp and log
    (and exact arithmetic) round the same in every lane."""
    a = log_p + log_weight(weight_p)
    b = log_q + log_weight(1.0 - weight_p)
    top = torch.maximum(a, b)
    top = torch.where(top == float("-inf"), 0.0, top)  # both -inf: log(0) = -inf below
    return top + torch.log(torch.exp(a - top) + torch.exp(b - top))


def _softplus(y):
    """log(1 + exp(y)) without overflow, accurate where it is tiny."""
    return torch.clamp(y, min=0.0) + torch.log1p(torch.exp(-y.abs()))


def _sigmoid(y):
    e = torch.exp(-y.abs())
    return torch.where(y >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


def zero_mass_slope(kind: str, param: float) -> float:
    """``a0``: the value of ``a = df/dq`` where the teacher has no mass (p = 0).

    The gradient ``g_j = q_j (a_j - sum_i q_i a_i)`` is unchanged when the same constant is
    taken from every ``a_i`` (the q sum to 1). Taking ``a0`` keeps the bracket from cancelling
    when nearly all of the student's mass lies where the teacher has almost none (there every
    ``a_i`` is close to ``a0``), so ``terms`` returns ``h = q (a - a0)``, each in a form that
    does not cancel either."""
    if kind == "jsd":  # a = (1 - beta) log(q / m) -> -(1 - beta) log(1 - beta)
        return -(1.0 - param) * math.log(1.0 - param)
    if kind == "skew_rkl":  # a = log(q / m) + (1 - lam) p / m -> -log(lam)
        return -math.log(param)
    return 0.0  # skew FKL: a = -(1 - lam) p / m -> 0


def terms(kind: str, log_p, log_q, param: float):
    """(f_i, h_i = q_i (df/dq_i - a0)) per position for ``kind`` in akl_kernels.config.POINTWISE
    (``zero_mass_slope`` gives a0; TVD's gradient is ``tvd_grad``)."""
    q = log_q.exp()
    weight_p = mixture_weight(kind, param)
    if kind == "jsd":  # beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q
        log_m = log_mixture(log_p, log_q, weight_p)
        f = param * log_p.exp() * (log_p - log_m) + (1.0 - param) * q * (log_q - log_m)
        # a - a0 = -(1 - beta) log(1 + beta p / ((1 - beta) q))
        ratio = log_p - log_q + (log_weight(param) - log_weight(1.0 - param))
        return f, -(1.0 - param) * q * _softplus(ratio)
    if kind == "skew_fkl":  # KL(p || m), m = lam p + (1 - lam) q
        log_m = log_mixture(log_p, log_q, weight_p)
        return log_p.exp() * (log_p - log_m), -(1.0 - param) * torch.exp(log_p + log_q - log_m)
    if kind == "skew_rkl":  # KL(q || m), m = (1 - lam) p + lam q
        log_m = log_mixture(log_p, log_q, weight_p)
        # With x = (1 - lam) p / (lam q): a - a0 = x / (1 + x) - log(1 + x) (0 at lam = 1).
        ratio = log_p - log_q + (log_weight(1.0 - param) - log_weight(param))
        return q * (log_q - log_m), q * (_sigmoid(ratio) - _softplus(ratio))
    if kind == "tvd":  # 0.5 sum |p - q|
        diff = q - log_p.exp()
        return 0.5 * diff.abs(), 0.5 * q * torch.sign(diff)
    raise ValueError(f"not a pointwise divergence: {kind!r}")


def row_terms(kind: str, log_p, log_q, param: float, contributing):
    """(f, e) per position: f on C (0 elsewhere), and e = h on C, -a0 q outside C, so that a
    row's D = sum f, its H_SUM = sum e and its gradient ``e - q H_SUM`` (``contributing`` None:
    every position contributes)."""
    f, h = terms(kind, log_p, log_q, param)
    if contributing is None:
        return f, h
    a0 = zero_mass_slope(kind, param)
    return torch.where(contributing, f, 0.0), torch.where(contributing, h, -a0 * log_q.exp())


def _sides(log_p, log_q, contributing):
    """Where q > p and where q < p, inside C."""
    above, below = log_q > log_p, log_q < log_p
    if contributing is not None:
        above, below = above & contributing, below & contributing
    return above, below


def tvd_masses(log_p, log_q, contributing):
    """Per row, the student's mass where q > p, where q < p, and everywhere else (ties and
    positions outside C), each a sum of non-negative terms."""
    q = log_q.exp()
    above, below = _sides(log_p, log_q, contributing)
    rest = ~(above | below)
    return tuple(row_sum(torch.where(side, q, 0.0)) for side in (above, below, rest))


def tvd_grad(log_p, log_q, contributing, q_above, q_below, q_rest):
    """d TVD / d zs_j = 0.5 q_j ([C] sign_j - Q_above + Q_below), with the bracket formed
    without cancellation from the row's masses (``tvd_masses``; they sum to 1):
    2 Q_below + Q_rest where q > p, -(2 Q_above + Q_rest) where q < p, Q_below - Q_above else."""
    above, below = _sides(log_p, log_q, contributing)
    bracket = torch.where(above, 2.0 * q_below + q_rest,
                          torch.where(below, -(2.0 * q_above + q_rest), q_below - q_above))
    return 0.5 * log_q.exp() * bracket
