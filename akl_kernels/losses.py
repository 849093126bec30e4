"""Public loss functions (SPEC section 3): validate, pick a backend, run the autograd Function."""

from __future__ import annotations

from typing import NamedTuple

import torch

from akl_kernels import _validation as checks
from akl_kernels.autograd import DivergenceFunction, as_rows, loss_dtype


class HeadTailStats(NamedTuple):
    """AKL split statistics, each of the logits' leading shape (SPEC 3)."""

    head_gap: torch.Tensor  # sum over the head of |p - q|
    tail_gap: torch.Tensor  # sum over the tail of |p - q|
    head_weight: torch.Tensor  # head_gap / (head_gap + tail_gap), 0.5 when both are 0
    head_count: torch.Tensor  # tokens in the head (int64)
    head_mass: torch.Tensor  # teacher mass of the head


def _backend_module(name: str):
    if name == "torch":
        from akl_kernels import chunked

        return chunked
    from akl_kernels import kernels

    return kernels


def _valid_rows(labels, ignore_index, n_rows, device):
    if labels is None:
        return torch.ones(n_rows, dtype=torch.bool, device=device)
    return (labels != ignore_index).reshape(n_rows)


def divergence_loss(
    kind,
    student_logits,
    teacher_logits,
    labels=None,
    *,
    mu=0.5,
    include_crossing=False,
    temperature=1.0,
    ignore_index=-100,
    reduction="mean",
    backend="auto",
    param=0.0,
):
    """Shared body of every divergence loss; ``kind`` names the divergence (one of
    ``akl_kernels._validation.DIVERGENCES``) and ``param`` its parameter (beta or lam)."""
    if kind not in checks.DIVERGENCES:
        raise ValueError(f"kind must be one of {checks.DIVERGENCES}, got {kind!r}")
    checks.check_logit_pair(student_logits, teacher_logits)
    checks.check_options(mu=mu, include_crossing=include_crossing, temperature=temperature)
    checks.check_unit_interval("param", param)
    checks.check_reduction(reduction)
    checks.check_labels(labels, student_logits, ignore_index)
    backend_name = checks.resolve_backend(backend, student_logits, teacher_logits)
    cfg = checks.LossConfig(
        kind, float(mu), include_crossing, float(temperature), float(param)
    ).normalized()
    n_rows = student_logits.numel() // student_logits.shape[-1]
    valid = _valid_rows(labels, ignore_index, n_rows, student_logits.device)
    loss, _, _ = DivergenceFunction.apply(
        student_logits, teacher_logits, valid, cfg, _backend_module(backend_name), reduction, None
    )
    return loss


def fkl_loss(student_logits, teacher_logits, labels=None, **options):
    """Forward KL(p || q), teacher p, student q. Options as ``akl_loss`` (``mu`` unused)."""
    return divergence_loss("fkl", student_logits, teacher_logits, labels, **options)


def rkl_loss(student_logits, teacher_logits, labels=None, **options):
    """Reverse KL(q || p), teacher p, student q. Options as ``akl_loss`` (``mu`` unused)."""
    return divergence_loss("rkl", student_logits, teacher_logits, labels, **options)


def jsd_loss(student_logits, teacher_logits, labels=None, *, beta=0.5, **options):
    """Generalised Jensen-Shannon divergence ``beta KL(p || m) + (1 - beta) KL(q || m)`` with
    ``m = beta p + (1 - beta) q`` (teacher p, student q). ``beta = 0`` is FKL and ``beta = 1``
    is RKL, the convention of TRL's GKD and Liger-Kernel (the formula itself tends to 0 at both
    ends). Options as ``fkl_loss``."""
    checks.check_unit_interval("beta", beta)
    return divergence_loss("jsd", student_logits, teacher_logits, labels, param=beta, **options)


def skew_fkl_loss(student_logits, teacher_logits, labels=None, *, lam=0.1, **options):
    """DistiLLM's skew forward KL: ``KL(p || lam p + (1 - lam) q)``; ``lam = 0`` is FKL."""
    checks.check_unit_interval("lam", lam)
    return divergence_loss("skew_fkl", student_logits, teacher_logits, labels, param=lam,
                           **options)


def skew_rkl_loss(student_logits, teacher_logits, labels=None, *, lam=0.1, **options):
    """DistiLLM's skew reverse KL: ``KL(q || (1 - lam) p + lam q)``; ``lam = 0`` is RKL."""
    checks.check_unit_interval("lam", lam)
    return divergence_loss("skew_rkl", student_logits, teacher_logits, labels, param=lam,
                           **options)


def tvd_loss(student_logits, teacher_logits, labels=None, **options):
    """Total variation distance ``0.5 * sum |p - q|`` (its gradient is a subgradient: 0 where
    p = q). Options as ``fkl_loss``."""
    return divergence_loss("tvd", student_logits, teacher_logits, labels, **options)


def mixed_kl_loss(student_logits, teacher_logits, labels=None, *, lam=0.5, **options):
    """``(1 - lam) * FKL + lam * RKL`` with fixed weights (the AKL paper's FKL+RKL baseline)."""
    checks.check_unit_interval("lam", lam)
    return divergence_loss("mixed_kl", student_logits, teacher_logits, labels, param=lam,
                           **options)


def akl_loss(
    student_logits,
    teacher_logits,
    labels=None,
    *,
    mu=0.5,
    include_crossing=False,
    temperature=1.0,
    ignore_index=-100,
    reduction="mean",
    backend="auto",
):
    """Adaptive KL (Wu et al., COLING 2025): ``w_head * FKL + w_tail * RKL`` per token.

    The teacher's head is its smallest set of top tokens with cumulative mass ``<= mu`` (the top
    token always; ``include_crossing=True`` adds the token that crosses ``mu``); the weights are
    the student's share of ``sum |p - q|`` on the head and on the tail, held constant for
    differentiation. Logits are divided by ``temperature``; no ``T**2`` factor is applied.
    Returns float32 (float64 for float64 inputs); ``reduction`` is "mean" over rows whose label
    differs from ``ignore_index``, "sum", or "none" (leading shape, 0 at ignored rows).
    """
    return divergence_loss(
        "akl",
        student_logits,
        teacher_logits,
        labels,
        mu=mu,
        include_crossing=include_crossing,
        temperature=temperature,
        ignore_index=ignore_index,
        reduction=reduction,
        backend=backend,
    )


class DistillationOutput(NamedTuple):
    """``distillation_loss(..., return_parts=True)``: the loss and its two parts, each reduced
    like the loss; the parts carry no gradient (they are for logging)."""

    loss: torch.Tensor
    cross_entropy: torch.Tensor
    divergence: torch.Tensor


def distillation_loss(
    student_logits,
    teacher_logits,
    labels,
    *,
    divergence="akl",
    kd_ratio=0.5,
    temperature=1.0,
    ignore_index=-100,
    reduction="mean",
    backend="auto",
    return_parts=False,
    **divergence_options,
):
    """The MiniLLM / AKL-paper objective: ``(1 - kd_ratio) * CE(student, labels) +
    kd_ratio * divergence(student, teacher)`` per token, reduced over the rows whose label is
    not ``ignore_index``.

    The hard-label cross-entropy is taken on the unscaled student logits (T = 1) and fused into
    the divergence's passes: the logits are not read again for it. ``divergence`` is any of
    "akl", "fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd", "mixed_kl", with its options by
    keyword (``mu``, ``include_crossing`` for AKL; ``beta`` for JSD; ``lam`` for the skew and
    mixed KLs). ``return_parts=True`` returns ``DistillationOutput(loss, cross_entropy,
    divergence)``. No ``T**2`` factor is applied.
    """
    checks.check_unit_interval("kd_ratio", kd_ratio)
    cfg = checks.divergence_config(divergence, divergence_options, temperature=temperature,
                                   with_ce=True, kd_ratio=kd_ratio)
    checks.check_logit_pair(student_logits, teacher_logits)
    checks.check_reduction(reduction)
    if labels is None:
        raise ValueError("labels are required: they are the cross-entropy's targets")
    checks.check_labels(labels, student_logits, ignore_index)
    backend_name = checks.resolve_backend(backend, student_logits, teacher_logits)
    n_rows = student_logits.numel() // student_logits.shape[-1]
    valid = _valid_rows(labels, ignore_index, n_rows, student_logits.device)
    checks.check_class_labels(labels, valid, student_logits.shape[-1])
    loss, divergence_part, ce_part = DivergenceFunction.apply(
        student_logits, teacher_logits, valid, cfg, _backend_module(backend_name), reduction,
        labels.reshape(-1).to(torch.int64),
    )
    if return_parts:
        return DistillationOutput(loss, ce_part, divergence_part)
    return loss


@torch.no_grad()
def head_tail_stats(
    student_logits,
    teacher_logits,
    *,
    mu=0.5,
    include_crossing=False,
    temperature=1.0,
    backend="auto",
) -> HeadTailStats:
    """The AKL split of every row (no gradient): gaps, head weight, head size and mass."""
    checks.check_logit_pair(student_logits, teacher_logits)
    checks.check_options(mu=mu, include_crossing=include_crossing, temperature=temperature)
    backend_name = checks.resolve_backend(backend, student_logits, teacher_logits)
    cfg = checks.LossConfig("akl", float(mu), include_crossing, float(temperature))
    s2d, t2d = as_rows(student_logits), as_rows(teacher_logits)
    valid = torch.ones(s2d.shape[0], dtype=torch.bool, device=s2d.device)
    rows = _backend_module(backend_name).forward(s2d, t2d, valid, cfg, True).head
    lead = student_logits.shape[:-1]
    dtype = loss_dtype(student_logits, teacher_logits)
    return HeadTailStats(
        *(
            column.reshape(lead) if column.dtype == torch.int64 else column.to(dtype).reshape(lead)
            for column in rows
        )
    )
