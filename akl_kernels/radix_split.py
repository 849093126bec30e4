"""The plan of the exact AKL head split that every backend follows (docs/contract.md §2.4, §4.4).

The head of a row is every token whose teacher value is above a threshold value ``v*`` plus the
lowest-index tokens equal to it. ``v*`` is found by radix select over an order-preserving
integer *key* of the teacher's value, most significant digit first: one pass per digit builds
the histogram of teacher mass over that digit among the tokens whose higher digits equal the
ones already chosen, and keeps the digit where the cumulative mass, summed from the largest
values down, first exceeds ``mu`` times the row's mass. The number of passes is the number of
digits, fixed by the teacher's dtype and independent of the data: 2 for bf16/fp16 (16-bit
keys, 8-bit digits), 3 for float32, 6 for float64.

Masses are integers: ``w = floor(p * 2**MASS_BITS)`` with ``p`` the teacher probability in
the backend's compute dtype (int64 in the Triton kernel, float64 holding integers in the torch
backend: a row's total stays below 2**53). Integer sums are exact in any order, so the passes
agree with each other to the last unit, every backend and every vocabulary shard adds up the
same numbers, and ties at ``v*`` are resolved exactly: with ``above`` the mass of the keys
above ``v*`` and ``w*`` the mass of one token at ``v*``, the first ``floor((thr - above) / w*)``
of them in index order are head. Each token loses less than ``2**-MASS_BITS`` of its
probability, so a row's cumulative masses move by less than ``V * 2**-40`` (2.4e-7 at
V = 262144): within the rounding the contract allows (docs/contract.md §2.4, "Exactness").

The key is taken from the teacher's logits in their own dtype, so that a bf16 teacher needs
only 16 bits; dividing by the temperature is monotone, so it orders the tokens as their
probabilities do, and equal logits stay equal.
"""

from __future__ import annotations

import torch

MASS_BITS = 40
MAX_DIGIT_BITS = 11  # at most 2048 bins per pass

_KEY_BITS = {torch.bfloat16: 16, torch.float16: 16, torch.float32: 32, torch.float64: 64}


def key_bits(dtype: torch.dtype) -> int:
    """Bits of the order key of a teacher of this dtype."""
    return _KEY_BITS[dtype]


def digit_plan(bits: int) -> tuple[tuple[int, int], ...]:
    """(shift, width) of each digit of a ``bits``-wide key, most significant first, in the
    fewest passes of at most MAX_DIGIT_BITS bits, the wider digits first (16 -> 8, 8;
    32 -> 11, 11, 10; 64 -> 11, 11, 11, 11, 10, 10)."""
    passes = -(-bits // MAX_DIGIT_BITS)
    widths = [bits // passes + (1 if k < bits % passes else 0) for k in range(passes)]
    plan, shift = [], bits
    for width in widths:
        shift -= width
        plan.append((shift, width))
    return tuple(plan)


def search_passes(dtype: torch.dtype) -> int:
    """Reads of the teacher row the threshold search makes, whatever the data."""
    return len(digit_plan(key_bits(dtype)))
