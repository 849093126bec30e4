"""Thin ``torch.nn.Module`` wrappers: options fixed and checked at construction, tensors at call."""

from __future__ import annotations

import torch

from akl_kernels import validation as checks
from akl_kernels.config import make_config
from akl_kernels.fused_linear_losses import fused_linear_distillation_loss, fused_linear_loss
from akl_kernels.losses import distillation_loss, divergence_loss
from akl_kernels.vocab_shards import group_name


def _check_call_options(*, ignore_index, reduction, backend, check_values):
    """What every loss Module checks at construction besides the divergence's own options."""
    checks.check_ignore_index(ignore_index)
    checks.check_reduction(reduction)
    checks.check_backend_name(backend)
    checks.check_bool("check_values", check_values)


class _OptionsRepr(torch.nn.Module):
    options: dict

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


class DivergenceLoss(_OptionsRepr):
    """Any divergence by name, called as ``(student_logits, teacher_logits, labels=None)``; see
    ``akl_kernels.divergence_loss``. The named Modules below fix the divergence."""

    def __init__(self, divergence="akl", *, temperature=1.0, ignore_index=-100,
                 reduction="mean", backend="auto", check_values=True, process_group=None,
                 **divergence_options):
        super().__init__()
        make_config(divergence, divergence_options, temperature=temperature)
        _check_call_options(ignore_index=ignore_index, reduction=reduction, backend=backend,
                            check_values=check_values)
        group_name(process_group)
        self.process_group = process_group  # not an option: a group has no useful repr
        self.options = dict(divergence=divergence, temperature=temperature,
                            ignore_index=ignore_index, reduction=reduction, backend=backend,
                            check_values=check_values, **divergence_options)

    def forward(self, student_logits, teacher_logits, labels=None):
        return divergence_loss(student_logits, teacher_logits, labels,
                               process_group=self.process_group, **self.options)


class FKLLoss(DivergenceLoss):
    """Forward KL(p || q); see ``akl_kernels.fkl_loss``."""

    def __init__(self, **options):
        super().__init__("fkl", **options)


class RKLLoss(DivergenceLoss):
    """Reverse KL(q || p); see ``akl_kernels.rkl_loss``."""

    def __init__(self, **options):
        super().__init__("rkl", **options)


class AKLLoss(DivergenceLoss):
    """Adaptive KL; see ``akl_kernels.akl_loss``."""

    def __init__(self, *, mu=0.5, include_crossing=False, **options):
        super().__init__("akl", mu=mu, include_crossing=include_crossing, **options)


class JSDLoss(DivergenceLoss):
    """Generalised JSD(beta); see ``akl_kernels.jsd_loss``."""

    def __init__(self, beta=0.5, **options):
        super().__init__("jsd", beta=beta, **options)


class SkewFKLLoss(DivergenceLoss):
    """Skew forward KL; see ``akl_kernels.skew_fkl_loss``."""

    def __init__(self, lam=0.1, **options):
        super().__init__("skew_fkl", lam=lam, **options)


class SkewRKLLoss(DivergenceLoss):
    """Skew reverse KL; see ``akl_kernels.skew_rkl_loss``."""

    def __init__(self, lam=0.1, **options):
        super().__init__("skew_rkl", lam=lam, **options)


class MixedKLLoss(DivergenceLoss):
    """``(1 - lam) FKL + lam RKL``; see ``akl_kernels.mixed_kl_loss``."""

    def __init__(self, lam=0.5, **options):
        super().__init__("mixed_kl", lam=lam, **options)


class TVDLoss(DivergenceLoss):
    """Total variation distance; see ``akl_kernels.tvd_loss``."""

    def __init__(self, **options):
        super().__init__("tvd", **options)


class DistillationLoss(_OptionsRepr):
    """``(1 - kd_ratio) CE + kd_ratio divergence``; see ``akl_kernels.distillation_loss``.

    Called as ``(student_logits, teacher_logits, labels)``; options fixed at construction.
    """

    def __init__(self, divergence="akl", *, kd_ratio=0.5, temperature=1.0, ignore_index=-100,
                 reduction="mean", backend="auto", return_parts=False, check_values=True,
                 process_group=None, **divergence_options):
        super().__init__()
        make_config(divergence, divergence_options, temperature=temperature, kd_ratio=kd_ratio)
        _check_call_options(ignore_index=ignore_index, reduction=reduction, backend=backend,
                            check_values=check_values)
        checks.check_bool("return_parts", return_parts)
        group_name(process_group)
        self.process_group = process_group
        self.options = dict(divergence=divergence, kd_ratio=kd_ratio, temperature=temperature,
                            ignore_index=ignore_index, reduction=reduction, backend=backend,
                            return_parts=return_parts, check_values=check_values,
                            **divergence_options)

    def forward(self, student_logits, teacher_logits, labels):
        return distillation_loss(student_logits, teacher_logits, labels,
                                 process_group=self.process_group, **self.options)


class FusedLinearLoss(_OptionsRepr):
    """A divergence from hidden states; see ``akl_kernels.fused_linear_loss``.

    Called as ``(student_hidden, student_weight, labels=None, *, teacher_hidden=None,
    teacher_weight=None, teacher_logits=None, student_bias=None, teacher_bias=None)``, e.g.
    with ``student.lm_head.weight``; the options are fixed at construction.
    """

    _fused_loss = staticmethod(fused_linear_loss)

    def __init__(self, divergence="akl", *, temperature=1.0, ignore_index=-100,
                 reduction="mean", chunk_size=None, backend="auto", check_values=True,
                 process_group=None, strategy="auto", **divergence_options):
        super().__init__()
        make_config(divergence, divergence_options, temperature=temperature)
        _check_call_options(ignore_index=ignore_index, reduction=reduction, backend=backend,
                            check_values=check_values)
        checks.check_chunk_size(chunk_size)
        checks.check_strategy(strategy)
        group_name(process_group)
        self.process_group = process_group
        self.options = dict(divergence=divergence, temperature=temperature,
                            ignore_index=ignore_index, reduction=reduction,
                            chunk_size=chunk_size, backend=backend, check_values=check_values,
                            strategy=strategy, **divergence_options)

    def forward(self, student_hidden, student_weight, labels=None, **teacher_and_biases):
        return self._fused_loss(student_hidden, student_weight, labels, **teacher_and_biases,
                                process_group=self.process_group, **self.options)


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

    _fused_loss = staticmethod(fused_linear_distillation_loss)

    def __init__(self, divergence="akl", *, kd_ratio=0.5, return_parts=False, **options):
        super().__init__(divergence, **options)  # checks everything but these two
        checks.check_unit_interval("kd_ratio", kd_ratio)
        checks.check_bool("return_parts", return_parts)
        self.options |= dict(kd_ratio=kd_ratio, return_parts=return_parts)

    def forward(self, student_hidden, student_weight, labels, **teacher_and_biases):
        return super().forward(student_hidden, student_weight, labels, **teacher_and_biases)
