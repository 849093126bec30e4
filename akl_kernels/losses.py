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
):
    """Shared body of ``fkl_loss``, ``rkl_loss`` and ``akl_loss``; ``kind`` names the divergence."""
    if kind not in checks.DIVERGENCES:
        raise ValueError(f"kind must be one of {checks.DIVERGENCES}, got {kind!r}")
    checks.check_logit_pair(student_logits, teacher_logits)
    checks.check_options(mu=mu, include_crossing=include_crossing, temperature=temperature)
    checks.check_reduction(reduction)
    checks.check_labels(labels, student_logits, ignore_index)
    backend_name = checks.resolve_backend(backend, student_logits, teacher_logits)
    cfg = checks.LossConfig(kind, float(mu), include_crossing, float(temperature))
    n_rows = student_logits.numel() // student_logits.shape[-1]
    valid = _valid_rows(labels, ignore_index, n_rows, student_logits.device)
    return DivergenceFunction.apply(
        student_logits, teacher_logits, valid, cfg, _backend_module(backend_name), reduction
    )


def fkl_loss(student_logits, teacher_logits, labels=None, **options):
    """Forward KL(p || q), teacher p, student q. Options as ``akl_loss`` (``mu`` unused)."""
    return divergence_loss("fkl", student_logits, teacher_logits, labels, **options)


def rkl_loss(student_logits, teacher_logits, labels=None, **options):
    """Reverse KL(q || p), teacher p, student q. Options as ``akl_loss`` (``mu`` unused)."""
    return divergence_loss("rkl", student_logits, teacher_logits, labels, **options)


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
