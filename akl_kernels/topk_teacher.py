"""Sparse teachers: a teacher given by its top-k log-probabilities per token (docs/contract.md §6).

A ``TopKTeacher`` goes wherever teacher logits go. It holds, per row, ``k`` vocabulary indices
and the teacher's log-probabilities there (of its *full* distribution, at the temperature the
user distils at); a -inf log-probability marks padding (a row with fewer than ``k`` tokens), and
its index is ignored. ``tail`` says what happens to the mass outside the k tokens:

- ``"bucket"``: both models get one more category, "rest", holding their mass outside the k
  tokens (the teacher's ``1 - sum_k p``, clamped at 0; the student's summed outside the k
  tokens by the torch backend, and by the Triton backend as its exponential sum less the k
  tokens' in float64, which keeps the float32 sum's accuracy: backends/triton/topk.py);
- ``"renormalize"``: both distributions are restricted to the k tokens and renormalised there.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

TAILS = ("bucket", "renormalize")
# Log-probabilities may exceed 0 by rounding (a bf16 log_softmax of a one-hot row); the mass
# of the k tokens may exceed 1 by as much (docs/contract.md §6).
LOGPROB_SLACK = 1e-3
MASS_SLACK = 1e-3


class TopKTeacher(NamedTuple):
    """``indices`` [..., k] (int32 or int64, distinct within a row, in [0, V)) and
    ``logprobs`` [..., k] (any float dtype; -inf marks padding) of a teacher, with the rule
    ``tail`` ("bucket" or "renormalize") for the mass outside the k tokens."""

    indices: torch.Tensor
    logprobs: torch.Tensor
    tail: str = "bucket"

    @property
    def k(self) -> int:
        return self.indices.shape[-1]

    @property
    def shape(self) -> torch.Size:
        """The leading shape (the tokens), as ``teacher_logits.shape[:-1]`` would be."""
        return self.indices.shape[:-1]

    @property
    def device(self) -> torch.device:
        return self.indices.device

    def to(self, device) -> TopKTeacher:
        """Both tensors on ``device`` (the tail rule kept)."""
        return TopKTeacher(self.indices.to(device), self.logprobs.to(device), self.tail)

    def __getitem__(self, item):
        """Indexing selects tokens (``teacher[:, :-1]`` shifts like logits); an int selects a
        field, as for any NamedTuple."""
        if isinstance(item, int):
            return tuple.__getitem__(self, item)
        if not isinstance(item, tuple):
            item = (item,)
        return TopKTeacher(self.indices[(*item, Ellipsis, slice(None))],
                           self.logprobs[(*item, Ellipsis, slice(None))], self.tail)

    def reshape_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """[N, k] int64 indices and [N, k] logprobs (the rows a backend takes)."""
        return (self.indices.reshape(-1, self.k).long(),
                self.logprobs.reshape(-1, self.k))


@torch.no_grad()
def topk_teacher(teacher_logits: torch.Tensor, k: int, temperature: float = 1.0,
                 tail: str = "bucket", *, rows_per_chunk: int | None = None) -> TopKTeacher:
    """The ``k`` most probable tokens of ``softmax(teacher_logits / temperature)`` per row,
    with their log-probabilities (float32; float64 for float64 logits), most probable first;
    among equal logits the lower vocabulary index is taken and listed first.

    Rows are done in chunks (``rows_per_chunk``; by default about 64 MiB of float32 work), so
    that a large batch needs no ``N x V`` float32 temporary."""
    from akl_kernels import validation as checks

    checks.check_float_tensor("teacher_logits", teacher_logits)
    checks.check_temperature(temperature)
    checks.check_tail(tail)
    vocab = teacher_logits.shape[-1]
    checks.check_positive_int("k", k)
    if k > vocab:
        raise ValueError(f"k must be an int in [1, V = {vocab}], got {k!r}")
    checks.check_positive_int("rows_per_chunk", rows_per_chunk, optional=True)
    rows = teacher_logits.reshape(-1, vocab)
    dtype = torch.float64 if rows.dtype == torch.float64 else torch.float32
    if rows_per_chunk is None:
        rows_per_chunk = max(1, (64 << 20) // (vocab * 16))
    indices = torch.empty(rows.shape[0], k, dtype=torch.int64, device=rows.device)
    logprobs = torch.empty(rows.shape[0], k, dtype=dtype, device=rows.device)
    for r0 in range(0, rows.shape[0], rows_per_chunk):
        z = rows[r0:r0 + rows_per_chunk].to(dtype) / temperature
        log_p = torch.log_softmax(z, dim=-1)
        # Stable descending order: equal values keep their index order.
        order = torch.sort(log_p, dim=-1, descending=True, stable=True).indices[:, :k]
        indices[r0:r0 + rows_per_chunk] = order
        logprobs[r0:r0 + rows_per_chunk] = log_p.gather(1, order)
    lead = teacher_logits.shape[:-1]
    return TopKTeacher(indices.reshape(*lead, k), logprobs.reshape(*lead, k), tail)
