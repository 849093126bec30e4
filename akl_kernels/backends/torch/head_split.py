"""Exact AKL head/tail split for the chunked PyTorch backend: radix select over the teacher's
value keys in a fixed number of passes (the plan and its arithmetic: akl_kernels/radix_split.py;
the definition: docs/contract.md §2.4).

Each pass is one ``bincount`` of the integer masses (held exactly in float64) into
``2**width`` bins per row, over the tokens still in the running: the whole row for the first
digit, then only those whose higher digits match, so the work is linear in V whatever the
data. The per-pass histogram is the only thing a row needs from all of its tokens, which is
what lets a vocabulary shard add its histogram to the others' (one all-reduce per pass) and a
sparse teacher run the same passes over its k entries.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from akl_kernels.radix_split import MASS_BITS, digit_plan, key_bits

_INT_OF_WIDTH = {16: torch.int16, 32: torch.int32, 64: torch.int64}


def order_keys(teacher: torch.Tensor) -> torch.Tensor:
    """Signed integer keys of the teacher's bit width whose order is the order of its values
    (equal values, -0.0 and +0.0 included, get equal keys)."""
    bits = key_bits(teacher.dtype)
    raw = teacher.view(_INT_OF_WIDTH[bits])
    # A negative float's magnitude grows with its bits: flip them (all but the sign) so that
    # its key falls instead, and add 1 so that -0.0 (the sign bit alone) keys as +0.0 does.
    # (raw >> bits-1) is -1 for negative floats and 0 for the others.
    negative = raw >> (bits - 1)
    return (raw ^ (negative & torch.iinfo(raw.dtype).max)) - negative


def digit_histogram(rows, keys, masses, shift, width, n_rows):
    """[n_rows, 2**width] float64: the mass of each value of the digit ``keys >> shift`` of
    ``width`` bits, per row, over the tokens given as 1-D ``rows``, ``keys`` (int64) and
    ``masses``. The masses are integers below 2**53 in total, so the sums are exact in any
    order."""
    bins = 1 << width
    flat = rows * bins + ((keys >> shift) & (bins - 1))
    return torch.bincount(flat, weights=masses, minlength=n_rows * bins).view(n_rows, bins)


def top_digit_histogram(keys, masses, shift, width):
    """digit_histogram of a whole [R, K] block for its top digit (which carries the sign)."""
    bins = 1 << width
    digit = ((keys >> shift) + bins // 2).long()
    hist = torch.zeros(keys.shape[0], bins, dtype=torch.float64, device=keys.device)
    return hist.scatter_add_(1, digit, masses)


def crossing_digit(hist, above, thr):
    """The digit whose cumulative mass (from the top) first exceeds thr, and the new above."""
    at_or_above = hist.flip(1).cumsum(dim=1).flip(1)  # mass of the digits >= d
    digit = ((above[:, None] + at_or_above) > thr[:, None]).sum(dim=1).sub_(1).clamp_(min=0)
    at = digit[:, None]
    return digit, above + (at_or_above.gather(1, at) - hist.gather(1, at))[:, 0]


def chosen_prefix(chosen, digit, width):
    """The value of ``key* >> shift`` once a pass has chosen ``digit`` (``chosen`` the value
    before it, None at the top digit, which carries the sign: its bins start at the most
    negative value)."""
    if chosen is None:
        return digit - (1 << width) // 2
    return (chosen << width) | digit


class Passes(NamedTuple):
    key: torch.Tensor  # [R] the key v* of the crossing token (int64)
    above: torch.Tensor  # [R] the mass of the keys above v*
    thr: torch.Tensor  # [R] the mass threshold
    hist: torch.Tensor  # the last pass's histogram [R, 2**width]
    digit: torch.Tensor  # and the digit it chose (v*'s lowest): hist[digit] is the mass at v*


def radix_passes(plan, histogram, threshold) -> Passes:
    """The passes of the radix select, whoever holds the tokens. ``histogram(shift, width,
    chosen)`` returns one pass's [R, 2**width] float64 histogram of the digit ``key >> shift``
    over the tokens still in the running: those with ``key >> (shift + width) == chosen``, every
    token when ``chosen`` is None (the top digit). ``threshold(hist)`` gives the rows' mass
    threshold from the first histogram, which holds every token's mass. One block of rows
    (``threshold_key``) and the vocabulary shards, whose histograms are all-reduced
    (``backends/torch/vocab_parallel.py``), run these same passes."""
    chosen = thr = above = None
    for shift, width in plan:
        hist = histogram(shift, width, chosen)
        if thr is None:
            thr = threshold(hist)
            above = torch.zeros_like(thr)
        digit, above = crossing_digit(hist, above, thr)
        chosen = chosen_prefix(chosen, digit, width)
    return Passes(chosen, above, thr, hist, digit)


class Threshold(NamedTuple):
    key: torch.Tensor  # [R] the key v* of the crossing token (int64)
    above: torch.Tensor  # [R] the mass of the keys above v*
    rows: torch.Tensor  # the tokens keyed v*, as (row, column) in row-major order
    columns: torch.Tensor
    masses: torch.Tensor  # and their masses


class RunningTokens(NamedTuple):
    """Tokens of a block still in the running, 1-D: row, column, int64 key and mass (what a
    pass after the top digit histograms)."""

    rows: torch.Tensor
    columns: torch.Tensor
    keys: torch.Tensor
    masses: torch.Tensor

    @classmethod
    def of_block(cls, keys, masses, chosen, shift):
        """The tokens of [R, K] ``keys`` with ``keys >> shift == chosen`` (per row)."""
        flat = ((keys >> shift) == chosen.to(keys.dtype)[:, None]).view(-1).nonzero()[:, 0]
        return cls(flat // keys.shape[1], flat % keys.shape[1],
                   keys.view(-1).index_select(0, flat).long(),
                   masses.view(-1).index_select(0, flat))

    def narrowed(self, chosen, shift):
        keep = ((self.keys >> shift) == chosen[self.rows]).nonzero()[:, 0]
        return RunningTokens(*(column[keep] for column in self))


def threshold_key(keys, masses, thr, plan) -> Threshold:
    """Per row of [R, K] ``keys`` and float64 integer ``masses``: the key ``v*`` of the token
    whose cumulative mass (from the largest values down) first exceeds ``thr``, the mass of
    the keys above it, and where the tokens keyed v* are.

    The first digit's pass reads the whole block; each later one only the tokens still in the
    running (those whose higher digits equal the ones chosen): the same histograms for less
    work.
    """
    n_rows = keys.shape[0]
    running = None

    def narrow(chosen, shift):  # to the tokens with key >> shift == chosen
        nonlocal running
        running = (RunningTokens.of_block(keys, masses, chosen, shift) if running is None
                   else running.narrowed(chosen, shift))
        return running

    def histogram(shift, width, chosen):
        if chosen is None:
            return top_digit_histogram(keys, masses, shift, width)
        live = narrow(chosen, shift + width)
        return digit_histogram(live.rows, live.keys, live.masses, shift, width, n_rows)

    found = radix_passes(plan, histogram, lambda hist: thr)
    at = narrow(found.key, 0)  # the tokens keyed v* itself
    return Threshold(found.key, found.above, at.rows, at.columns, at.masses)


def integer_masses(p: torch.Tensor) -> torch.Tensor:
    """floor(p * 2**MASS_BITS) as float64 integers (p <= 1, so at most 2**MASS_BITS). Exact in
    p's own dtype already: scaling by a power of two is exact, and so is the floor."""
    return (p * 2.0**MASS_BITS).floor_().to(torch.float64)


def mass_threshold(total: torch.Tensor, mu: float) -> torch.Tensor:
    """floor(mu * total), below total (so the crossing token always exists)."""
    return torch.minimum((total * mu).floor(), total - 1)


def head_threshold(masses, mu, total):
    """(thr, everything) per row of float64 integer ``masses``: the head's mass threshold,
    below the row's mass so that a crossing token exists, and the rows that are head entirely
    (``total``, the whole mass where ``masses`` holds only part of it: a sparse teacher's k
    tokens, whose rest is always tail, with no more than ``mu`` of it)."""
    held = masses.sum(dim=1)
    if total is None:
        return mass_threshold(held, mu), torch.zeros_like(held, dtype=torch.bool)
    thr = (total * mu).floor()
    return torch.minimum(thr, held - 1), held <= thr


def tied_head_size(thr, above, tied_mass, ties, include_crossing):
    """How many of a row's ``ties`` tokens at v* (``tied_mass`` their mass together) are head,
    the first in index order: every token at v* has the same mass w*, and the i-th (from 1)
    is head while above + i w* <= thr (i - 1 with include_crossing), the top token always."""
    unit = (tied_mass / ties.clamp(min=1)).clamp(min=1.0)  # exact: ties copies of one integer
    fit = ((thr - above) / unit).floor().clamp(min=0.0) + int(include_crossing)
    return torch.where(above == 0, fit.clamp(min=1.0), fit)


def head_mask(teacher: torch.Tensor, p: torch.Tensor, mu: float, include_crossing: bool,
              total: torch.Tensor | None = None):
    """Boolean head mask of a block of rows: ``teacher`` the logits in their own dtype,
    ``p`` their probabilities at the loss's temperature; ``total`` as for ``head_threshold``
    (the sparse teachers' split is ``head_mask_by_sort``; tests check the two agree)."""
    if mu >= 1.0:  # c_k <= 1 for every k: the whole vocabulary is head
        return torch.ones_like(p, dtype=torch.bool)
    keys = order_keys(teacher)
    masses = integer_masses(p)
    thr, everything = head_threshold(masses, mu, total)
    star = threshold_key(keys, masses, thr, digit_plan(key_bits(teacher.dtype)))
    head = keys > star.key.to(keys.dtype)[:, None]
    n_rows = keys.shape[0]
    ties = torch.bincount(star.rows, minlength=n_rows)
    unit = torch.bincount(star.rows, weights=star.masses, minlength=n_rows)
    fit = tied_head_size(thr, star.above, unit, ties, include_crossing)
    first = ties.cumsum(dim=0) - ties  # the tokens at v* come row by row, by index
    rank = torch.arange(len(star.rows), device=keys.device) - first[star.rows] + 1
    tied_in = rank <= fit[star.rows]
    head[star.rows[tied_in], star.columns[tied_in]] = True
    return head | everything[:, None]


def head_mask_by_sort(teacher: torch.Tensor, p: torch.Tensor, mu: float,
                      include_crossing: bool, total: torch.Tensor | None = None):
    """``head_mask`` by a stable sort of the keys and a cumulative sum of the same integer
    masses instead of the radix passes: the same head bit for bit (the masses are exact
    integers, so the cumulative sums are exact in any order, and the sort is stable by index
    among equal keys, the tie rule). For a sparse teacher's few entries per row, where the
    radix histograms would be far wider than the rows."""
    if mu >= 1.0:
        return torch.ones_like(p, dtype=torch.bool)
    keys = order_keys(teacher)
    masses = integer_masses(p)
    thr, everything = head_threshold(masses, mu, total)
    order = torch.sort(keys, dim=1, descending=True, stable=True).indices
    cumulative = masses.gather(1, order).cumsum(dim=1)
    if include_crossing:
        cumulative = cumulative - masses.gather(1, order)  # the mass before each token
    head_sorted = cumulative <= thr[:, None]
    head_sorted[:, 0] = True  # the top token always
    head = torch.zeros_like(head_sorted).scatter_(1, order, head_sorted)
    return head | everything[:, None]
