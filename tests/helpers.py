"""Input builders and comparisons shared by the tests."""

from __future__ import annotations

import torch

import reference
from akl_kernels import TopKTeacher
from reference.sparse import category_log_probs
from tests.conftest import DEVICE


def logits(gen, shape, dtype=torch.float32, scale=2.0, device=DEVICE):
    """Standard-normal logits times ``scale`` drawn on the CPU from ``gen``, then moved."""
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * scale
    return x.to(dtype).to(device)


def peaked_teacher(gen, shape, dtype=torch.float32, device=DEVICE):
    """Logits whose top token carries most of the mass, like a trained LLM's."""
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2.0
    top = torch.randint(0, shape[-1], shape[:-1], generator=gen)
    x.scatter_(-1, top[..., None], 12.0)
    return x.to(dtype).to(device)


def student_near(teacher, gen, noise=1.0):
    """A student whose logits are the teacher's plus noise (a realistic, non-trivial gap)."""
    shape, dtype = teacher.shape, teacher.dtype
    noise_t = torch.randn(shape, generator=gen, dtype=torch.float64) * noise
    return (teacher.double().cpu() + noise_t).to(dtype).to(teacher.device)


def rel_err(x, ref):
    x, ref = x.double().cpu(), ref.double().cpu()
    return ((x - ref).norm() / ref.norm().clamp(min=1e-30)).item()


def grad_tol(dtype):
    return 1e-4 if dtype in (torch.float32, torch.float64) else 1e-2


def ambiguous_rows(teacher, *, mu, temperature=1.0, margin=1e-6):
    """Rows where some normalised cumulative mass lies within ``margin`` of mu
    (docs/contract.md §2).

    On those rows a backend summing in another order may legitimately pick another head.
    With mu = 1 every token is head by definition (c_k <= 1 always): nothing is ambiguous.
    """
    if mu >= 1.0:
        return torch.zeros(teacher.shape[:-1], dtype=torch.bool)
    p = torch.softmax(teacher.double().cpu() / temperature, dim=-1)
    c = torch.sort(p, dim=-1, descending=True, stable=True).values.cumsum(-1)
    c = c / c[..., -1:]
    return ((c - mu).abs() < margin).any(-1)


def tvd_kink_rows(student, teacher, *, temperature=1.0, margin=1e-5):
    """Rows where some contributing token (or sparse category) has |log p - log q| < margin.

    TVD's |p - q| has a kink at p = q: there a float32 backend may round to either side, and its
    gradient differs from the float64 reference's by up to ~q_j (docs/contract.md §5). A float32
    log-probability is off by ~1e-6 (an ulp of a log-sum-exp near 10), so 1e-5 is the margin.
    """
    if isinstance(teacher, TopKTeacher):
        log_p, log_q, _, _ = category_log_probs(student.detach().double().cpu(),
                                                teacher.to("cpu"), temperature)
    else:
        log_q = torch.log_softmax(student.detach().double().cpu() / temperature, dim=-1)
        log_p = torch.log_softmax(teacher.detach().double().cpu() / temperature, dim=-1)
    contributing = (log_p != -torch.inf) & (log_q != -torch.inf)
    return (contributing & ((log_p - log_q).abs() < margin)).any(-1)


def without_tvd_kinks(labels, student, teacher, *, temperature=1.0, ignore_index=-100):
    """``labels`` with the rows on TVD's kink (``tvd_kink_rows``) ignored: for gradients that
    mix rows (a fused linear loss's weight), which cannot be compared row by row."""
    labels = labels.clone()
    labels[tvd_kink_rows(student, teacher, temperature=temperature).to(labels.device)] = \
        ignore_index
    return labels


def zero_rows(rows, *tensors):
    """CPU copies of ``tensors`` with ``rows`` (a mask over the leading dims; None: none) zeroed:
    gradients compared only away from those rows."""
    if rows is None or not rows.any():
        return tensors
    copies = tuple(x.cpu().clone() for x in tensors)
    for x in copies:
        x[rows.cpu()] = 0
    return copies


def reference_grad(kind, student, teacher, labels=None, **kwargs):
    s = student.detach().double().cpu().requires_grad_(True)
    t = teacher.detach().double().cpu()
    lab = None if labels is None else labels.cpu()
    loss = reference.reference_loss(kind, s, t, lab, **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), s)
    return loss.detach(), grad


def backend_grad(fn, student, teacher, labels=None, **kwargs):
    s = student.detach().clone().requires_grad_(True)
    loss = fn(s, teacher, labels, **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), s)
    return loss.detach(), grad


def assert_matches_reference(loss, grad, ref_loss, ref_grad, student, value_tol=1e-4,
                             kinks=None):
    """A backend's per-row loss (float32) and gradient against the float64 reference's; the
    gradient away from ``kinks`` (rows, e.g. ``tvd_kink_rows``), where it may take either side."""
    assert loss.dtype == torch.float32
    assert grad.dtype == student.dtype and grad.shape == student.shape
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    # float32 math: relative error ~1e-6, plus ~1e-7 absolute per row from log-domain rounding
    rows = max(1, student.numel() // student.shape[-1])
    err = (loss.double().cpu() - ref_loss).abs()
    assert (err <= value_tol * ref_loss.abs() + 1e-6 * rows).all(), (loss, ref_loss)
    grad, ref_grad = zero_rows(kinks, grad, ref_grad)
    if ref_grad.norm() > 0:
        assert rel_err(grad, ref_grad) < grad_tol(student.dtype)
    else:
        assert grad.abs().max() == 0
