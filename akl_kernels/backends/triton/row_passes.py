"""The passes over one row of ``V`` logits that every kernel is built from.

A program owns one row and sweeps it in ``BLOCK``-wide chunks; each helper below is one sweep:

- ``softmax_kl_stats``: online max / sum-exp of both models plus the running FKL and RKL
  numerators (reads s and t once);
- ``head_threshold``: the exact AKL crossing value ``u*`` of the teacher, by a bracketed
  ``PIVOTS``-ary search over the teacher's float values (reads t a data-dependent number of
  times, no sort); radix_split.py has the search in a fixed number of reads;
- ``head_gaps``: ``sum |p - q|`` on the head and the tail (reads s and t once);
- ``pointwise_sums``: ``sum_C f(p, q)`` and ``sum_C q df/dq`` of a pointwise divergence (JSD,
  skew KL, TVD; reads s and t once) with ``pointwise_terms``, the twin of
  ``backends/torch/pointwise.py``, and TVD's masses (``tvd_grad``);
- ``load_scaled``: one chunk of logits as float32 divided by T (-inf past the row's end), and
  ``load_log_probs`` both models' log-probabilities of a chunk once the normalisers are known
  (the gap, pointwise and gradient passes).

See docs/kernels.md for the bytes each pass moves.
"""

import triton
import triton.language as tl

from akl_kernels.backends.triton.radix_split import load_teacher_keys, teacher_mass
from akl_kernels.config import POINTWISE

# The pointwise divergences' kind codes in the kernels: 1 + the index in POINTWISE (0: the KL
# family; akl_kernels.config.LossConfig.pointwise_code).
JSD, SKEW_FKL, SKEW_RKL, TVD = (tl.constexpr(POINTWISE.index(kind) + 1)
                                for kind in ("jsd", "skew_fkl", "skew_rkl", "tvd"))


@triton.jit
def load_scaled(row_ptr, offs, V, inv_t):
    x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
    # "+ 0.0" turns -0.0 into +0.0: equal logits must compare and key as equal.
    return x * inv_t + 0.0


@triton.jit
def load_log_probs(s_row, t_row, offs, V, inv_t, m_s, logz_s, m_t, logz_t):
    """One chunk of both rows once the statistics pass has the normalisers: (log q, log p,
    contributing, zs, zt), the scaled logits being -inf past the row's end."""
    zs = load_scaled(s_row, offs, V, inv_t)
    zt = load_scaled(t_row, offs, V, inv_t)
    contributing = (zs != float("-inf")) & (zt != float("-inf"))
    return (zs - m_s) - logz_s, (zt - m_t) - logz_t, contributing, zs, zt


@triton.jit
def _poisoned(z):
    return (z != z) | (z == float("inf"))  # noqa: PLR0124 (z != z: NaN)


@triton.jit
def softmax_kl_stats(s_row, t_row, V, inv_t, t_scale, WITH_T1: tl.constexpr,
                     BLOCK: tl.constexpr):
    """Returns (m_s, sum_s, m_t, sum_t, fkl, rkl, p_c, q_c, bad, sum_1) for one row.

    With ``WITH_T1``, sum_1 = sum exp((zs - m_s) * t_scale), the student's normaliser at
    T = 1 when t_scale = T (the fused cross-entropy of distillation_loss; the maximum of the
    unscaled logits is m_s * T, so no extra reduction). Else sum_1 = 0.

    With d = (zt - m_t) - (zs - m_s) on the contributing set C (both logits > -inf):
    FKL = sum_C e_t d / sum_t + log(sum_s / sum_t) P_C and
    RKL = -sum_C e_s d / sum_s + log(sum_t / sum_s) Q_C. Keeping d relative to the running
    maxima (and shifting the sums when a maximum moves) avoids cancelling two large terms.
    Each lane keeps its own partial sums (rescaled by the chunk-uniform maxima), so a chunk
    costs two cross-warp max reductions; the sums are reduced once at the end.
    P_C is formed as 1 - (mass outside C) / sum_t, exactly 1 when every position contributes.
    """
    neg_inf = float("-inf")
    m_s = tl.full([], neg_inf, tl.float32)
    m_t = tl.full([], neg_inf, tl.float32)
    sum_s = tl.zeros([BLOCK], tl.float32)
    sum_t = tl.zeros([BLOCK], tl.float32)
    a_fkl = tl.zeros([BLOCK], tl.float32)  # sum_C e_t d
    b_rkl = tl.zeros([BLOCK], tl.float32)  # -sum_C e_s d
    p_out = tl.zeros([BLOCK], tl.float32)  # e_t outside C
    q_out = tl.zeros([BLOCK], tl.float32)  # e_s outside C
    bad = tl.zeros([BLOCK], tl.int32)
    sum_1 = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        zs = load_scaled(s_row, offs, V, inv_t)
        zt = load_scaled(t_row, offs, V, inv_t)
        bad |= (_poisoned(zs) | _poisoned(zt)).to(tl.int32)
        new_ms = tl.maximum(m_s, tl.max(zs))
        new_mt = tl.maximum(m_t, tl.max(zt))
        # An all -inf prefix has max -inf; exponents are taken against 0 then (sums stay 0).
        ref_s = tl.where(new_ms == neg_inf, 0.0, new_ms)
        ref_t = tl.where(new_mt == neg_inf, 0.0, new_mt)
        alpha_s = tl.exp(m_s - ref_s)
        alpha_t = tl.exp(m_t - ref_t)
        both_seen = (m_s != neg_inf) & (m_t != neg_inf)
        shift = tl.where(both_seen, (ref_t - m_t) - (ref_s - m_s), 0.0)
        e_s = tl.exp(zs - ref_s)
        e_t = tl.exp(zt - ref_t)
        contributing = (zs != neg_inf) & (zt != neg_inf)
        d = tl.where(contributing, (zt - ref_t) - (zs - ref_s), 0.0)
        a_fkl = alpha_t * (a_fkl - shift * (sum_t - p_out)) + e_t * d
        b_rkl = alpha_s * (b_rkl + shift * (sum_s - q_out)) - e_s * d
        p_out = alpha_t * p_out + tl.where(contributing, 0.0, e_t)
        q_out = alpha_s * q_out + tl.where(contributing, 0.0, e_s)
        if WITH_T1:
            sum_1 = tl.exp((m_s - ref_s) * t_scale) * sum_1 + tl.exp((zs - ref_s) * t_scale)
        sum_s = alpha_s * sum_s + e_s
        sum_t = alpha_t * sum_t + e_t
        m_s = new_ms
        m_t = new_mt
    total_s = tl.sum(sum_s)
    total_t = tl.sum(sum_t)
    log_ratio = tl.log(total_s) - tl.log(total_t)
    p_c = 1.0 - tl.sum(p_out) / total_t
    q_c = 1.0 - tl.sum(q_out) / total_s
    fkl = tl.sum(a_fkl) / total_t + log_ratio * p_c
    rkl = tl.sum(b_rkl) / total_s - log_ratio * q_c
    return m_s, total_s, m_t, total_t, fkl, rkl, p_c, q_c, tl.max(bad), tl.sum(sum_1)


@triton.jit
def float_key(x):
    """float32 -> int32 whose signed order is the float order (-inf smallest)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def key_float(key):
    """Inverse of ``float_key``."""
    key = key.to(tl.int32)
    bits = tl.where(key >= 0, key, key ^ 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _search_pivots(ka, kb, PIVOTS: tl.constexpr):
    """PIVOTS increasing int64 keys in [ka, kb), the first equal to ka.

    Pivots are spread evenly in *value* between the bracket's ends (fast on real logits), then
    clamped so that each bucket loses at least one key (progress even when values collide).
    """
    j = tl.arange(0, PIVOTS)
    a_val = key_float(ka)
    b_val = key_float(kb - 1)
    frac = j.to(tl.float32) / PIVOTS
    k_val = float_key(a_val + (b_val - a_val) * frac).to(tl.int64)
    j64 = j.to(tl.int64)
    wide = (kb - ka) >= PIVOTS
    clamped = tl.minimum(tl.maximum(k_val, ka + j64), kb - PIVOTS + j64)
    return tl.where(wide, clamped, tl.minimum(ka + j64, kb))


@triton.jit
def head_threshold(t_row, V, inv_t, m_t, mu, span, BLOCK: tl.constexpr, PIVOTS: tl.constexpr):
    """The crossing value u* of the AKL split, the mass strictly above it, thr, and the
    number of sweeps (reads of the row) it took.

    Masses are of e = exp(zt - m_t); thr = mu * sum(e), summed in the first sweep exactly as
    the pivot masses are (so the comparisons below are consistent). u* is the largest teacher
    value with mass(zt >= u*) > thr. Invariant: u* lies in the key bracket [ka, kb) and
    ``above`` is the mass of keys >= kb. Each sweep sums the mass at or above PIVOTS pivots
    (per lane, one reduction per sweep), keeps the bucket that holds u*, and shrinks it to the
    present values seen in the old bracket; the search ends when one key is left. ``span``
    bounds m_t - u* (forward.search_span).
    """
    j = tl.arange(0, PIVOTS)
    ka = float_key(m_t - span).to(tl.int64)
    kb = float_key(m_t).to(tl.int64) + 1
    above = tl.zeros([], tl.float64)
    thr = tl.zeros([], tl.float64)
    first = tl.full([], 1, tl.int32)
    done = tl.zeros([], tl.int32)
    sweeps = tl.zeros([], tl.int32)
    while done == 0:
        sweeps += 1
        pivot_keys = _search_pivots(ka, kb, PIVOTS)
        pivots = key_float(pivot_keys)
        lo_val = key_float(ka)
        hi_val = key_float(kb - 1)
        lane_mass = tl.zeros([BLOCK, PIVOTS], tl.float32)
        lane_total = tl.zeros([BLOCK], tl.float32)
        lane_min = tl.full([BLOCK], float("inf"), tl.float32)
        lane_max = tl.full([BLOCK], float("-inf"), tl.float32)
        for start in range(0, V, BLOCK):
            zt = load_scaled(t_row, start + tl.arange(0, BLOCK), V, inv_t)
            e = tl.exp(zt - m_t)
            lane_total += e
            lane_mass += tl.where(zt[:, None] >= pivots[None, :], e[:, None], 0.0)
            inside = (zt >= lo_val) & (zt <= hi_val)
            lane_min = tl.minimum(lane_min, tl.where(inside, zt, float("inf")))
            lane_max = tl.maximum(lane_max, tl.where(inside, zt, float("-inf")))
        mass_ge = tl.sum(lane_mass.to(tl.float64), axis=0)
        thr = tl.where(first == 1, tl.sum(lane_total.to(tl.float64)) * mu, thr)
        first = tl.zeros([], tl.int32)
        present_min = tl.min(lane_min)
        present_max = tl.max(lane_max)
        # The bucket holding u*: the last pivot whose mass at-or-above still exceeds thr.
        pick = tl.maximum(tl.sum((mass_ge > thr).to(tl.int32)) - 1, 0)
        last = pick == PIVOTS - 1
        new_ka = tl.sum(tl.where(j == pick, pivot_keys, 0))
        new_kb = tl.where(last, kb, tl.sum(tl.where(j == pick + 1, pivot_keys, 0)))
        above = tl.where(last, above, tl.sum(tl.where(j == pick + 1, mass_ge, 0.0)))
        # No value of the old bracket lies outside [present_min, present_max].
        new_ka = tl.maximum(new_ka, float_key(present_min).to(tl.int64))
        new_kb = tl.minimum(new_kb, float_key(present_max).to(tl.int64) + 1)
        ka = new_ka
        kb = tl.maximum(new_kb, new_ka + 1)  # only inconsistent rounding could cross them
        done = (kb - ka <= 1).to(tl.int32)
    return key_float(ka), above, thr, sweeps


@triton.jit
def head_gaps(
    s_row, t_row, V, inv_t, m_s, logz_s, m_t, logz_t, key_star, n_ties, above, thr,
    include_crossing, RADIX: tl.constexpr, BLOCK: tl.constexpr,
):
    """(head_gap, tail_gap, head_count, head_mass) of the split at key* (one read of s and t).

    The head is every token keyed above key* plus ties at key* in index order: the first
    ``n_ties`` of them after the pivot search (keys of the scaled logits), or, after the radix
    search (keys of the logits as given, radix_split.py), each tie whose cumulative integer
    mass ``above + rank * w`` stays <= thr (one more with include_crossing; the top token
    always)."""
    head_gap = tl.zeros([BLOCK], tl.float32)
    tail_gap = tl.zeros([BLOCK], tl.float32)
    head_mass = tl.zeros([BLOCK], tl.float32)
    head_count = tl.zeros([BLOCK], tl.int32)
    ties_before = tl.zeros([], tl.int32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        in_row = offs < V
        zs = load_scaled(s_row, offs, V, inv_t)
        if RADIX:
            key, zt = load_teacher_keys(t_row, offs, V, inv_t)
        else:
            zt = load_scaled(t_row, offs, V, inv_t)
            key = float_key(zt)
        log_p = (zt - m_t) - logz_t
        p = tl.exp(log_p)
        err = tl.abs(p - tl.exp((zs - m_s) - logz_s))
        tie = (key == key_star) & in_row
        tie_i = tie.to(tl.int32)
        block_ties = tl.sum(tie_i)
        head = (key > key_star) & in_row
        if block_ties > 0:  # ranks (a scan) only where key* occurs: ties enter in index order
            tie_rank = ties_before + tl.cumsum(tie_i, axis=0) - 1
            if RADIX:
                w = teacher_mass(zt, m_t, logz_t)
                fits = above + (tie_rank + 1 - include_crossing).to(tl.int64) * w <= thr
                head = head | (tie & (fits | ((above == 0) & (tie_rank == 0))))
            else:
                head = head | (tie & (tie_rank < n_ties))
        ties_before += block_ties
        head_gap += tl.where(head, err, 0.0)
        tail_gap += tl.where(head, 0.0, err)
        head_mass += tl.where(head, p, 0.0)
        head_count += head.to(tl.int32)
    return tl.sum(head_gap), tl.sum(tail_gap), tl.sum(head_count), tl.sum(head_mass)


@triton.jit
def _log_add_exp(a, b):
    top = tl.maximum(a, b)
    top = tl.where(top == float("-inf"), 0.0, top)  # both -inf: log(0) = -inf below
    return top + tl.log(tl.exp(a - top) + tl.exp(b - top))


@triton.jit
def _log1p(u):
    """log(1 + u) for u >= 0, exact to rounding where u is tiny (Goldberg's correction)."""
    w = 1.0 + u
    return tl.where(w == 1.0, u, tl.log(w) * (u / (w - 1.0)))


@triton.jit
def _softplus(y):
    return tl.maximum(y, 0.0) + _log1p(tl.exp(-tl.abs(y)))


@triton.jit
def _sigmoid(y):
    e = tl.exp(-tl.abs(y))
    return tl.where(y >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def pointwise_terms(kind, log_p, log_q, param, log_wp, log_wq):
    """(f, h = q (df/dq - a0)) per position of pointwise divergence ``kind`` (1 + its index in
    akl_kernels.config.POINTWISE), from log-probabilities only: where both are below -104
    the terms are exactly 0. The mixture m = w_p p + w_q q comes in as log w_p, log w_q (-inf
    for a zero weight); a0 is df/dq where p = 0. Formulas: backends/torch/pointwise.py."""
    q = tl.exp(log_q)
    f = tl.zeros_like(q)
    h = tl.zeros_like(q)
    if kind == JSD:  # JSD(beta): beta KL(p || m) + (1 - beta) KL(q || m)
        log_m = _log_add_exp(log_p + log_wp, log_q + log_wq)
        f = param * tl.exp(log_p) * (log_p - log_m) + (1.0 - param) * q * (log_q - log_m)
        h = -(1.0 - param) * q * _softplus(log_p - log_q + (log_wp - log_wq))
    elif kind == SKEW_FKL:  # skew FKL: KL(p || lam p + (1 - lam) q), a0 = 0
        log_m = _log_add_exp(log_p + log_wp, log_q + log_wq)
        f = tl.exp(log_p) * (log_p - log_m)
        h = -(1.0 - param) * tl.exp(log_p + log_q - log_m)
    elif kind == SKEW_RKL:  # skew RKL: KL(q || (1 - lam) p + lam q)
        log_m = _log_add_exp(log_p + log_wp, log_q + log_wq)
        f = q * (log_q - log_m)
        ratio = log_p - log_q + (log_wp - log_wq)
        h = q * (_sigmoid(ratio) - _softplus(ratio))
    else:  # TVD: 0.5 |p - q| (its gradient: tvd_grad)
        f = 0.5 * tl.abs(q - tl.exp(log_p))
        h = tl.where(log_q > log_p, 0.5 * q, tl.where(log_q < log_p, -0.5 * q, 0.0))
    return f, h


@triton.jit
def tvd_grad(log_p, log_q, contributing, q_above, q_below, q_rest):
    """d TVD / d zs = 0.5 q ([C] sign - Q_above + Q_below) with the bracket formed from masses
    summed apart, so that it does not cancel (backends/torch/pointwise.py: tvd_grad)."""
    above = (log_q > log_p) & contributing
    below = (log_q < log_p) & contributing
    bracket = tl.where(above, 2.0 * q_below + q_rest,
                       tl.where(below, -(2.0 * q_above + q_rest), q_below - q_above))
    return 0.5 * tl.exp(log_q) * bracket


@triton.jit
def mix_terms(divergence, cross_entropy, kd_ratio):
    """kd_ratio * divergence + (1 - kd_ratio) * cross_entropy, a term of weight exactly 0 not
    evaluated (its NaN or inf never reaches the result)."""
    mixed = kd_ratio * divergence + (1.0 - kd_ratio) * cross_entropy
    return tl.where(kd_ratio == 1.0, divergence, tl.where(kd_ratio == 0.0, cross_entropy, mixed))


@triton.jit
def pointwise_sums(
    s_row, t_row, V, inv_t, m_s, logz_s, m_t, logz_t, kind, param, log_wp, log_wq, a0,
    BLOCK: tl.constexpr,
):
    """(sum_C f, H_SUM, Q_above, Q_below, Q_rest) of pointwise divergence ``kind`` over one
    row: H_SUM sums h on C and -a0 q outside it, the gradient's bracket; the
    last three are the student's masses where q > p, where q < p (both inside C) and
    elsewhere, for TVD's gradient."""
    f_sum = tl.zeros([BLOCK], tl.float32)
    h_sum = tl.zeros([BLOCK], tl.float32)
    q_above = tl.zeros([BLOCK], tl.float32)
    q_below = tl.zeros([BLOCK], tl.float32)
    q_rest = tl.zeros([BLOCK], tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        log_q, log_p, contributing, _, _ = load_log_probs(s_row, t_row, offs, V, inv_t, m_s,
                                                          logz_s, m_t, logz_t)
        f, h = pointwise_terms(kind, log_p, log_q, param, log_wp, log_wq)
        q = tl.exp(log_q)
        f_sum += tl.where(contributing, f, 0.0)
        h_sum += tl.where(contributing, h, -a0 * q)
        above = (log_q > log_p) & contributing
        below = (log_q < log_p) & contributing
        q_above += tl.where(above, q, 0.0)
        q_below += tl.where(below, q, 0.0)
        q_rest += tl.where(above | below, 0.0, q)
    return tl.sum(f_sum), tl.sum(h_sum), tl.sum(q_above), tl.sum(q_below), tl.sum(q_rest)
