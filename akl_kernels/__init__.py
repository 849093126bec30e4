"""Fused, memory-lean distillation losses (FKL, RKL, Adaptive KL) for large vocabularies."""

from akl_kernels.losses import HeadTailStats, akl_loss, fkl_loss, head_tail_stats, rkl_loss
from akl_kernels.modules import AKLLoss, FKLLoss, RKLLoss

__all__ = [
    "AKLLoss",
    "FKLLoss",
    "HeadTailStats",
    "RKLLoss",
    "akl_loss",
    "fkl_loss",
    "head_tail_stats",
    "rkl_loss",
]
__version__ = "0.1.0"
