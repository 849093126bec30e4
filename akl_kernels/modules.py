"""Thin ``torch.nn.Module`` wrappers: options fixed at construction, tensors at call."""

from __future__ import annotations

import torch

from akl_kernels import _validation as checks
from akl_kernels.losses import divergence_loss


class _DivergenceLoss(torch.nn.Module):
    kind: str

    def __init__(
        self,
        *,
        mu=0.5,
        include_crossing=False,
        temperature=1.0,
        ignore_index=-100,
        reduction="mean",
        backend="auto",
    ):
        super().__init__()
        # Fail at construction rather than at the first training step.
        checks.check_options(mu=mu, include_crossing=include_crossing, temperature=temperature)
        checks.check_reduction(reduction)
        if backend not in checks.BACKENDS:
            raise ValueError(f"backend must be one of {checks.BACKENDS}, got {backend!r}")
        self.options = dict(
            mu=mu,
            include_crossing=include_crossing,
            temperature=temperature,
            ignore_index=ignore_index,
            reduction=reduction,
            backend=backend,
        )

    def forward(self, student_logits, teacher_logits, labels=None):
        return divergence_loss(self.kind, student_logits, teacher_logits, labels, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class FKLLoss(_DivergenceLoss):
    """Forward KL(p || q); see ``akl_kernels.fkl_loss``."""

    kind = "fkl"


class RKLLoss(_DivergenceLoss):
    """Reverse KL(q || p); see ``akl_kernels.rkl_loss``."""

    kind = "rkl"


class AKLLoss(_DivergenceLoss):
    """Adaptive KL; see ``akl_kernels.akl_loss``."""

    kind = "akl"
