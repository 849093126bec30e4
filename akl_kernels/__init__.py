"""Fused, memory-lean distillation losses (FKL, RKL, Adaptive KL and the divergences they are
compared with) for large vocabularies."""

from akl_kernels.losses import (
    DistillationOutput,
    HeadTailStats,
    akl_loss,
    distillation_loss,
    fkl_loss,
    head_tail_stats,
    jsd_loss,
    mixed_kl_loss,
    rkl_loss,
    skew_fkl_loss,
    skew_rkl_loss,
    tvd_loss,
)
from akl_kernels.modules import (
    AKLLoss,
    DistillationLoss,
    FKLLoss,
    JSDLoss,
    MixedKLLoss,
    RKLLoss,
    SkewFKLLoss,
    SkewRKLLoss,
    TVDLoss,
)

__all__ = [
    "AKLLoss",
    "DistillationLoss",
    "DistillationOutput",
    "FKLLoss",
    "HeadTailStats",
    "JSDLoss",
    "MixedKLLoss",
    "RKLLoss",
    "SkewFKLLoss",
    "SkewRKLLoss",
    "TVDLoss",
    "akl_loss",
    "distillation_loss",
    "fkl_loss",
    "head_tail_stats",
    "jsd_loss",
    "mixed_kl_loss",
    "rkl_loss",
    "skew_fkl_loss",
    "skew_rkl_loss",
    "tvd_loss",
]
__version__ = "0.1.0"
