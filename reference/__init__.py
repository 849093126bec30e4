"""The truth the library is tested against (docs/contract.md §5).

``definition`` is a readable, sort-based, float64 restatement of docs/contract.md §2;
``sparse`` defines the losses against a top-k teacher (§6) the same way;
``official`` restates the algorithm of the AKL paper's published code (float32,
unstable sort) so its agreement with ``definition`` on tie-free inputs can be shown.
Neither is fast or memory-lean; that is the point of the package.
"""

from reference.definition import (
    reference_akl,
    reference_distillation_loss,
    reference_fkl,
    reference_head_mask,
    reference_head_tail_stats,
    reference_loss,
    reference_rkl,
)
from reference.official import official_akl, official_fkl, official_rkl
from reference.sparse import (
    reference_sparse_distillation_loss,
    reference_sparse_head_mask,
    reference_sparse_head_tail_stats,
    reference_sparse_loss,
)

__all__ = [
    "official_akl",
    "official_fkl",
    "official_rkl",
    "reference_akl",
    "reference_distillation_loss",
    "reference_fkl",
    "reference_head_mask",
    "reference_head_tail_stats",
    "reference_loss",
    "reference_rkl",
    "reference_sparse_distillation_loss",
    "reference_sparse_head_mask",
    "reference_sparse_head_tail_stats",
    "reference_sparse_loss",
]
