"""Sort-free, exact AKL head/tail split for the chunked PyTorch backend.

The head of a row is every token with ``p > u*`` plus the lowest-index tokens with ``p == u*``,
where ``u*`` is the value of the token whose cumulative mass first exceeds ``mu``
(docs/contract.md §2). A
full sort finds it in O(V log V) per row; here one weighted histogram over the distance to the
row maximum finds the bin holding ``u*``, and only that bin's candidates (a few dozen tokens
for real distributions) are sorted. Masses are summed in float64.

Why the range of the histogram is enough: with ``S`` the row's mass and ``e*`` the crossing
token's probability, every token below ``u*`` weighs less than ``e*``, so
``(1 - mu) S <= V e*``; with ``p_max <= S`` that gives ``log p_max - log e* <= log(V / (1 - mu))``.
Tokens farther below the top logit than that can never hold the crossing.
"""

from __future__ import annotations

import math

import torch

from akl_kernels.backends.torch.reductions import row_sum

HISTOGRAM_BINS = 2048


def _crossing_value(zt, p, thr, mu):
    """Per row: the crossing logit u*, the mass strictly above it, and its probability."""
    rows, vocab = zt.shape
    z_max = zt.amax(dim=1, keepdim=True)
    span = math.log(vocab / (1.0 - mu)) + 2.0
    scaled = ((z_max - zt) * (HISTOGRAM_BINS / span)).nan_to_num(nan=HISTOGRAM_BINS - 1)
    bins = scaled.clamp_(0, HISTOGRAM_BINS - 1).long()
    hist = torch.zeros(rows, HISTOGRAM_BINS, dtype=torch.float64, device=zt.device)
    hist.scatter_add_(1, bins, p.to(torch.float64))
    cum = hist.cumsum(dim=1)
    # The crossing bin: the first whose cumulative mass exceeds thr.
    b_star = (cum <= thr[:, None]).sum(dim=1).clamp_(max=HISTOGRAM_BINS - 1)
    mass_above = torch.where(
        b_star > 0, cum.gather(1, (b_star - 1).clamp(min=0)[:, None]).squeeze(1), 0.0
    )
    candidates = bins == b_star[:, None]
    k = max(int(candidates.sum(dim=1).max()), 1)  # the only host sync of this backend
    neg_inf = torch.tensor(float("-inf"), dtype=zt.dtype, device=zt.device)
    values, index = torch.where(candidates, zt, neg_inf).topk(k, dim=1)
    cand_p = torch.where(values > neg_inf, p.gather(1, index), 0).to(torch.float64)
    cum_c = mass_above[:, None] + cand_p.cumsum(dim=1)
    j = (cum_c <= thr[:, None]).sum(dim=1).clamp_(max=k - 1)[:, None]
    u_star = values.gather(1, j).squeeze(1)
    mass_gt = mass_above + row_sum(torch.where(values > u_star[:, None], cand_p, 0.0))
    return u_star, mass_gt, cand_p.gather(1, j).squeeze(1), z_max.squeeze(1)


def head_mask(zt: torch.Tensor, p: torch.Tensor, mu: float, include_crossing: bool):
    """Boolean head mask of ``zt`` ([R, V] scaled teacher logits, ``p`` their softmax)."""
    vocab = zt.shape[1]
    if mu >= 1.0:  # c_k <= 1 for every k: the whole vocabulary is head
        return torch.ones_like(zt, dtype=torch.bool)
    thr = mu * row_sum(p, dtype=torch.float64)
    u_star, mass_gt, p_star, z_max = _crossing_value(zt, p, thr, mu)
    # Tokens tied at u* enter in index order while the cumulative mass stays <= thr.
    n_ties = torch.floor((thr - mass_gt) / p_star).nan_to_num(0.0).clamp_(0, vocab).long()
    n_ties += int(include_crossing)
    n_ties = torch.where(u_star >= z_max, n_ties.clamp(min=1), n_ties)  # top token forced
    ties = zt == u_star[:, None]
    tie_rank = ties.cumsum(dim=1) - 1
    return (zt > u_star[:, None]) | (ties & (tie_rank < n_ties[:, None]))
