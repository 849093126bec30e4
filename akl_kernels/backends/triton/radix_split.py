"""The exact AKL head split by radix select (akl_kernels/radix_split.py): the digit passes of one
row, in the same digits, masses and tie rule as backends/torch/head_split.py.

Each pass reads the teacher row once and builds the histogram of integer teacher mass over one
digit of the value key. A weighted histogram of ``2**width`` bins is formed per chunk as one
small matrix product: with the digit split into a high half ``h`` and a low half ``l``,
``hist[h, l] = sum_j w_j [h_j = h] [l_j = l]`` is ``A @ B`` for ``A[h, j] = w_j [h_j = h]``
and the one-hot ``B[j, l] = [l_j = l]``. The masses (up to 41 bits) go in as four 11-bit limbs
in float16, exact as are their per-chunk sums in the float32 accumulator (at most
``BLOCK * 2047 < 2**24``), so the histogram is exact integer arithmetic done on the tensor
cores, about ``4 * 2**ceil(width/2) + 2**floor(width/2)`` selects per entry instead of one per
bin.
"""

import triton
import triton.language as tl

from akl_kernels.radix_split import MASS_BITS, digit_plan

_LIMB_BITS = tl.constexpr(11)
_LIMBS = tl.constexpr(-(-(MASS_BITS + 1) // 11))
_MASS_SCALE = tl.constexpr(float(2**MASS_BITS))

# The digit plans of 16- and 32-bit keys (shift, width), as the kernels' constexprs.
_P16 = digit_plan(16)
_P32 = digit_plan(32)
K16_SHIFT_0, K16_WIDTH_0 = (tl.constexpr(x) for x in _P16[0])
K16_SHIFT_1, K16_WIDTH_1 = (tl.constexpr(x) for x in _P16[1])
K32_SHIFT_0, K32_WIDTH_0 = (tl.constexpr(x) for x in _P32[0])
K32_SHIFT_1, K32_WIDTH_1 = (tl.constexpr(x) for x in _P32[1])
K32_SHIFT_2, K32_WIDTH_2 = (tl.constexpr(x) for x in _P32[2])


@triton.jit
def load_teacher_keys(t_row, offs, V, inv_t):
    """One chunk of the teacher: (key, zt) with ``key`` the signed order key of the logit in
    its own dtype (-0.0 keyed as +0.0), the same integers as the torch backend's, and
    zt = logit / T in float32 (-inf past the row)."""
    x = tl.load(t_row + offs, mask=offs < V, other=float("-inf"))
    # As backends/torch/head_split.py: flip a negative float's bits but the sign, and add 1 so
    # that -0.0 keys as +0.0 (negative is -1 for negative floats, else 0).
    if x.dtype.primitive_bitwidth == 16:
        bits = x.to(tl.int16, bitcast=True).to(tl.int32)  # sign-extended
        negative = bits >> 31
        key = (bits ^ (negative & 0x7FFF)) - negative
    else:
        bits = x.to(tl.int32, bitcast=True)
        negative = bits >> 31
        key = (bits ^ (negative & 0x7FFFFFFF)) - negative
    # "+ 0.0" turns -0.0 into +0.0, as load_scaled does.
    return key, x.to(tl.float32) * inv_t + 0.0


@triton.jit
def teacher_mass(zt, m_t, logz_t):
    """floor(p * 2**MASS_BITS) as int64, p formed as the torch backend forms it."""
    return (tl.exp((zt - m_t) - logz_t) * _MASS_SCALE).to(tl.int64)


@triton.jit
def _digit_pass(t_row, V, inv_t, m_t, logz_t, mu, thr, above, chosen, SHIFT: tl.constexpr,
                WIDTH: tl.constexpr, FIRST: tl.constexpr, BLOCK: tl.constexpr):
    """One read of the row: the histogram of one digit, and the digit that holds the crossing.
    Returns (chosen, above, thr) extended by this digit; the first pass sets
    thr = floor(mu * the row's total mass), below the total (its histogram sums it)."""
    LO_BITS: tl.constexpr = WIDTH // 2
    N_HI: tl.constexpr = 2 ** (WIDTH - LO_BITS)
    N_LO: tl.constexpr = 2 ** LO_BITS
    BINS: tl.constexpr = 2 ** WIDTH
    hi_bins = tl.arange(0, N_HI)
    lo_bins = tl.arange(0, N_LO)
    hist = tl.zeros([N_HI, N_LO], tl.int64)
    for start in range(0, V, BLOCK):
        key, zt = load_teacher_keys(t_row, start + tl.arange(0, BLOCK), V, inv_t)
        w = teacher_mass(zt, m_t, logz_t)
        shifted = key >> SHIFT
        if FIRST:  # the top digit carries the sign: offset it into [0, BINS)
            digit = shifted + BINS // 2
        else:
            digit = shifted & (BINS - 1)
            w = tl.where((shifted >> WIDTH) == chosen, w, 0)
        one_hot_lo = tl.where((digit & (N_LO - 1))[:, None] == lo_bins[None, :], 1.0, 0.0)
        one_hot_lo = one_hot_lo.to(tl.float16)
        in_hi = (digit >> LO_BITS)[None, :] == hi_bins[:, None]
        for k in tl.static_range(_LIMBS):
            limb = ((w >> (k * _LIMB_BITS)) & (2 ** _LIMB_BITS - 1)).to(tl.float32)
            a = tl.where(in_hi, limb[None, :], 0.0).to(tl.float16)
            part = tl.dot(a, one_hot_lo, out_dtype=tl.float32)
            hist += part.to(tl.int64) << (k * _LIMB_BITS)
    hist = tl.reshape(hist, [BINS])  # bin h * N_LO + l is the digit's value
    if FIRST:
        total = tl.sum(hist)
        thr = tl.minimum((total.to(tl.float64) * mu).to(tl.int64), total - 1)
    # mass at or above each digit; the crossing digit is the last one where it exceeds thr
    at_or_above = tl.sum(hist) - tl.cumsum(hist, 0) + hist
    digit = tl.sum((above + at_or_above > thr).to(tl.int32)) - 1
    digit = tl.maximum(digit, 0)  # only a row without mass (a broken one) gets here with -1
    bins = tl.arange(0, BINS)
    above += tl.sum(tl.where(bins == digit, at_or_above - hist, 0))
    if FIRST:
        chosen = digit - BINS // 2
    else:
        chosen = (chosen << WIDTH) | digit
    return chosen, above, thr


@triton.jit
def radix_threshold(t_row, V, inv_t, m_t, logz_t, mu, KEY_BITS: tl.constexpr,
                    BLOCK: tl.constexpr):
    """(key*, the mass above it, thr, the number of reads of the row it made): 2 for a 16-bit
    teacher, 3 for a float32 one."""
    chosen = tl.zeros([], tl.int32)
    above = tl.zeros([], tl.int64)
    thr = tl.zeros([], tl.int64)
    if KEY_BITS == 16:
        chosen, above, thr = _digit_pass(t_row, V, inv_t, m_t, logz_t, mu, thr, above,
                                         chosen, K16_SHIFT_0, K16_WIDTH_0, True, BLOCK)
        chosen, above, thr = _digit_pass(t_row, V, inv_t, m_t, logz_t, mu, thr, above,
                                         chosen, K16_SHIFT_1, K16_WIDTH_1, False, BLOCK)
        reads = tl.full([], 2, tl.int32)
    else:  # 4x the bins of a 16-bit digit: half the chunk keeps the operands in registers
        chosen, above, thr = _digit_pass(t_row, V, inv_t, m_t, logz_t, mu, thr, above,
                                         chosen, K32_SHIFT_0, K32_WIDTH_0, True, BLOCK // 2)
        chosen, above, thr = _digit_pass(t_row, V, inv_t, m_t, logz_t, mu, thr, above,
                                         chosen, K32_SHIFT_1, K32_WIDTH_1, False, BLOCK // 2)
        chosen, above, thr = _digit_pass(t_row, V, inv_t, m_t, logz_t, mu, thr, above,
                                         chosen, K32_SHIFT_2, K32_WIDTH_2, False, BLOCK // 2)
        reads = tl.full([], 3, tl.int32)
    return chosen, above, thr, reads
