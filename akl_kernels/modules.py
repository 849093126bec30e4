"""Thin ``torch.nn.Module`` wrappers: options fixed at construction, tensors at call."""

from __future__ import annotations

import torch

from akl_kernels import _validation as checks
from akl_kernels.linear_losses import fused_linear_distillation_loss, fused_linear_loss
from akl_kernels.losses import distillation_loss, divergence_loss


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


class _ParametrisedLoss(_DivergenceLoss):
    """A divergence with one parameter in [0, 1] (beta or lam), fixed at construction."""

    param_name: str

    def __init__(self, param, **options):
        checks.check_unit_interval(self.param_name, param)
        super().__init__(**options)
        self.param = float(param)

    def forward(self, student_logits, teacher_logits, labels=None):
        return divergence_loss(self.kind, student_logits, teacher_logits, labels,
                               param=self.param, **self.options)

    def extra_repr(self) -> str:
        return f"{self.param_name}={self.param!r}, " + super().extra_repr()


class FKLLoss(_DivergenceLoss):
    """Forward KL(p || q); see ``akl_kernels.fkl_loss``."""

    kind = "fkl"


class RKLLoss(_DivergenceLoss):
    """Reverse KL(q || p); see ``akl_kernels.rkl_loss``."""

    kind = "rkl"


class AKLLoss(_DivergenceLoss):
    """Adaptive KL; see ``akl_kernels.akl_loss``."""

    kind = "akl"


class JSDLoss(_ParametrisedLoss):
    """Generalised JSD(beta); see ``akl_kernels.jsd_loss``."""

    kind, param_name = "jsd", "beta"

    def __init__(self, beta=0.5, **options):
        super().__init__(beta, **options)


class SkewFKLLoss(_ParametrisedLoss):
    """Skew forward KL; see ``akl_kernels.skew_fkl_loss``."""

    kind, param_name = "skew_fkl", "lam"

    def __init__(self, lam=0.1, **options):
        super().__init__(lam, **options)


class SkewRKLLoss(_ParametrisedLoss):
    """Skew reverse KL; see ``akl_kernels.skew_rkl_loss``."""

    kind, param_name = "skew_rkl", "lam"

    def __init__(self, lam=0.1, **options):
        super().__init__(lam, **options)


class MixedKLLoss(_ParametrisedLoss):
    """``(1 - lam) FKL + lam RKL``; see ``akl_kernels.mixed_kl_loss``."""

    kind, param_name = "mixed_kl", "lam"

    def __init__(self, lam=0.5, **options):
        super().__init__(lam, **options)


class TVDLoss(_DivergenceLoss):
    """Total variation distance; see ``akl_kernels.tvd_loss``."""

    kind = "tvd"


class DistillationLoss(torch.nn.Module):
    """``(1 - kd_ratio) CE + kd_ratio divergence``; see ``akl_kernels.distillation_loss``.

    Called as ``(student_logits, teacher_logits, labels)``; options fixed at construction.
    """

    def __init__(self, divergence="akl", *, kd_ratio=0.5, temperature=1.0, ignore_index=-100,
                 reduction="mean", backend="auto", return_parts=False, **divergence_options):
        super().__init__()
        self.options = dict(divergence=divergence, kd_ratio=kd_ratio, temperature=temperature,
                            ignore_index=ignore_index, reduction=reduction, backend=backend,
                            return_parts=return_parts, **divergence_options)
        # Fail at construction: a tiny call runs every check on the options.
        probe = torch.zeros(1, 2)
        distillation_loss(probe, probe, torch.zeros(1, dtype=torch.long),
                          **(self.options | {"backend": "torch"}))

    def forward(self, student_logits, teacher_logits, labels):
        return distillation_loss(student_logits, teacher_logits, labels, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class FusedLinearLoss(torch.nn.Module):
    """A divergence from hidden states; see ``akl_kernels.fused_linear_loss``.

    Called as ``(student_hidden, student_weight, labels=None, *, teacher_hidden=None,
    teacher_weight=None, teacher_logits=None, student_bias=None, teacher_bias=None)``, e.g.
    with ``student.lm_head.weight``; the options are fixed at construction.
    """

    def __init__(self, divergence="akl", *, temperature=1.0, ignore_index=-100,
                 reduction="mean", chunk_size=None, backend="auto", **divergence_options):
        super().__init__()
        checks.divergence_config(divergence, divergence_options, temperature=temperature)
        checks.check_reduction(reduction)
        checks.check_chunk_size(chunk_size)
        if backend not in checks.BACKENDS:
            raise ValueError(f"backend must be one of {checks.BACKENDS}, got {backend!r}")
        self.options = dict(divergence=divergence, temperature=temperature,
                            ignore_index=ignore_index, reduction=reduction,
                            chunk_size=chunk_size, backend=backend, **divergence_options)

    def forward(self, student_hidden, student_weight, labels=None, **teacher_and_biases):
        return fused_linear_loss(student_hidden, student_weight, labels, **teacher_and_biases,
                                 **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class FusedLinearAKLLoss(FusedLinearLoss):
    """Adaptive KL from hidden states; see ``akl_kernels.fused_linear_akl_loss``."""

    def __init__(self, *, mu=0.5, include_crossing=False, **options):
        super().__init__("akl", mu=mu, include_crossing=include_crossing, **options)


class FusedLinearFKLLoss(FusedLinearLoss):
    """Forward KL from hidden states; see ``akl_kernels.fused_linear_fkl_loss``."""

    def __init__(self, **options):
        super().__init__("fkl", **options)


class FusedLinearRKLLoss(FusedLinearLoss):
    """Reverse KL from hidden states; see ``akl_kernels.fused_linear_rkl_loss``."""

    def __init__(self, **options):
        super().__init__("rkl", **options)


class FusedLinearDistillationLoss(FusedLinearLoss):
    """``(1 - kd_ratio) CE + kd_ratio divergence`` from hidden states; see
    ``akl_kernels.fused_linear_distillation_loss``. Called like ``FusedLinearLoss`` with the
    labels required."""

    def __init__(self, divergence="akl", *, kd_ratio=0.5, return_parts=False, **options):
        checks.check_unit_interval("kd_ratio", kd_ratio)
        super().__init__(divergence, **options)
        self.options |= dict(kd_ratio=kd_ratio, return_parts=return_parts)

    def forward(self, student_hidden, student_weight, labels, **teacher_and_biases):
        return fused_linear_distillation_loss(student_hidden, student_weight, labels,
                                              **teacher_and_biases, **self.options)
