"""Ties, -inf, NaN, identical models, extreme logits, strided views, gradcheck, chunking."""

import pytest
import torch

import akl_kernels
import reference
from akl_kernels.row_results import as_rows
from tests.conftest import BACKENDS, DEVICE
from tests.helpers import (
    ambiguous_rows,
    backend_grad,
    grad_tol,
    logits,
    reference_grad,
    rel_err,
    student_near,
)

LOSSES = {"fkl": akl_kernels.fkl_loss, "rkl": akl_kernels.rkl_loss, "akl": akl_kernels.akl_loss}


def _tie_straddling_teacher(gen, rows, vocab):
    """bf16 logits: one top token, a 60-way tie group that mu = 0.5 cuts through, noise."""
    x = torch.randn(rows, vocab, generator=gen, dtype=torch.float64) * 0.5 - 2.0
    for r in range(rows):
        perm = torch.randperm(vocab, generator=gen)
        x[r, perm[0]] = 4.0
        x[r, perm[1:61]] = 2.0
    return x.to(torch.bfloat16).to(DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("include_crossing", [False, True])
@pytest.mark.parametrize("mu", [0.3, 0.5, 0.7])
def test_ties_straddling_the_boundary(rng, backend, include_crossing, mu):
    teacher = _tie_straddling_teacher(rng, 6, 1000)
    student = logits(rng, (6, 1000), torch.bfloat16)
    opts = dict(mu=mu, include_crossing=include_crossing)
    stats = akl_kernels.head_tail_stats(student, teacher, backend=backend, **opts)
    ref = reference.reference_head_tail_stats(student.cpu(), teacher.cpu(), **opts)
    clear = ~ambiguous_rows(teacher, mu=mu)
    assert clear.sum() >= 5
    ties_in_head = ref.head_count - 1  # the boundary lies inside the tie group for these mu
    assert ((ties_in_head[clear] > 0) & (ties_in_head[clear] < 60)).all()
    assert torch.equal(stats.head_count.cpu()[clear], ref.head_count[clear])
    # The head gap depends on *which* tied tokens are in: lowest index first (docs/contract.md §2).
    assert torch.allclose(stats.head_gap.cpu()[clear].double(), ref.head_gap[clear], atol=1e-5)
    loss = akl_kernels.akl_loss(student, teacher, backend=backend, reduction="none", **opts)
    ref_loss = reference.reference_akl(student.cpu(), teacher.cpu(), reduction="none", **opts)
    assert torch.allclose(loss.cpu()[clear].double(), ref_loss[clear], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_at_the_top(rng, backend):
    teacher = torch.full((4, 64), -5.0)
    for r in range(4):
        teacher[r, torch.randperm(64, generator=rng)[:3]] = 6.0  # three equal top tokens
    teacher = teacher.to(torch.bfloat16).to(DEVICE)
    student = logits(rng, (4, 64), torch.bfloat16)
    for mu, include_crossing, expected in [(0.1, False, 1), (0.1, True, 1), (0.5, False, 1),
                                           (0.5, True, 2), (0.7, False, 2), (0.7, True, 3)]:
        opts = dict(mu=mu, include_crossing=include_crossing)
        stats = akl_kernels.head_tail_stats(student, teacher, backend=backend, **opts)
        ref = reference.reference_head_tail_stats(student.cpu(), teacher.cpu(), **opts)
        assert (stats.head_count.cpu() == expected).all() and (ref.head_count == expected).all()
        assert torch.allclose(stats.head_gap.cpu().double(), ref.head_gap, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", sorted(LOSSES))
@pytest.mark.parametrize("where", ["student", "teacher", "both", "padded_vocab"])
def test_negative_infinity_positions(rng, backend, kind, where):
    teacher = logits(rng, (4, 300))
    student = student_near(teacher, rng)
    cols_s = torch.randperm(300, generator=rng)[:20]
    cols_t = torch.randperm(300, generator=rng)[:20]
    if where in ("student", "both"):
        student[:, cols_s] = float("-inf")
    if where in ("teacher", "both"):
        teacher[:, cols_t] = float("-inf")
    if where == "padded_vocab":
        student[:, -17:] = float("-inf")
        teacher[:, -17:] = float("-inf")
    loss, grad = backend_grad(LOSSES[kind], student, teacher, backend=backend, reduction="none")
    ref_loss, ref_grad = reference_grad(kind, student, teacher, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert torch.allclose(loss.cpu().double(), ref_loss, rtol=1e-4, atol=1e-6)
    assert rel_err(grad, ref_grad) < 1e-4
    assert (grad[student == float("-inf")] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", sorted(LOSSES))
@pytest.mark.parametrize("poison", [float("nan"), float("inf")])
def test_nan_and_positive_infinity_propagate(rng, backend, kind, poison):
    teacher = logits(rng, (3, 100))
    student = student_near(teacher, rng)
    student[1, 7] = poison
    teacher_bad = teacher.clone()
    teacher_bad[2, 50] = poison
    loss = LOSSES[kind](student, teacher_bad, backend=backend, reduction="none")
    assert torch.isnan(loss[1]) and torch.isnan(loss[2]) and torch.isfinite(loss[0])
    assert torch.isnan(LOSSES[kind](student, teacher, backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_identical_models(rng, backend, dtype):
    teacher = logits(rng, (5, 513), dtype)
    teacher[:, :3] = float("-inf")
    for kind, fn in LOSSES.items():
        student = teacher.clone().requires_grad_(True)
        loss = fn(student, teacher, backend=backend, reduction="none")
        loss.sum().backward()
        assert (loss == 0).all(), kind
        assert (student.grad == 0).all(), kind
    stats = akl_kernels.head_tail_stats(teacher, teacher, backend=backend)
    assert (stats.head_weight == 0.5).all() and (stats.head_gap == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", sorted(LOSSES))
def test_extreme_logits(rng, backend, kind):
    teacher = logits(rng, (4, 1000), scale=1e4)
    student = logits(rng, (4, 1000), scale=1e4)
    loss, grad = backend_grad(LOSSES[kind], student, teacher, backend=backend, reduction="none")
    ref_loss, ref_grad = reference_grad(kind, student, teacher, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert torch.allclose(loss.cpu().double(), ref_loss, rtol=1e-4, atol=1e-4)
    if kind == "fkl":  # q - p: nothing cancels
        assert rel_err(grad, ref_grad) < 1e-4
    else:
        # RKL's q (log q - log p - RKL) subtracts numbers of size |z| ~ 4e4, whose float32
        # spacing is ~4e-3: per entry the error is bounded by q times a few such spacings.
        q = torch.softmax(student.double().cpu(), dim=-1)
        bound = 1e-4 * ref_grad.norm() + 8 * 2**-23 * student.abs().max().item() * q.norm()
        assert (grad.double().cpu() - ref_grad).norm() <= bound


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_views_are_not_copied(rng, backend, dtype):
    vocab = 1000
    big_s = logits(rng, (2, 3, vocab + 37), dtype)
    big_t = logits(rng, (2, 3, vocab + 11), dtype)
    student, teacher = big_s[..., :vocab], big_t[..., :vocab]
    assert as_rows(student).data_ptr() == student.data_ptr()
    assert as_rows(student).stride(0) == vocab + 37
    for kind, fn in LOSSES.items():
        loss, grad = backend_grad(fn, student, teacher, backend=backend, reduction="none")
        dense_loss, dense_grad = backend_grad(
            fn, student.contiguous(), teacher.contiguous(), backend=backend, reduction="none"
        )
        assert torch.equal(loss, dense_loss), kind
        assert torch.equal(grad, dense_grad), kind
        _ref_loss, ref_grad = reference_grad(kind, student, teacher, reduction="none")
        assert rel_err(grad, ref_grad) < grad_tol(dtype)


@pytest.mark.parametrize("kind", ["fkl", "rkl"])
@pytest.mark.parametrize("with_inf", [False, True])
def test_gradcheck_float64_torch_backend(rng, kind, with_inf):
    teacher = logits(rng, (3, 7), torch.float64)
    student = logits(rng, (3, 7), torch.float64)
    if with_inf:
        # Q_C < 1: the extra terms of the gradient (docs/contract.md §2) matter
        teacher[0, 2] = float("-inf")
    student.requires_grad_(True)
    fn = LOSSES[kind]
    assert torch.autograd.gradcheck(
        lambda s: fn(s, teacher, backend="torch", temperature=1.7, reduction="sum"), (student,)
    )


def test_akl_gradient_is_the_weighted_fkl_rkl_gradient(rng):
    """AKL's weights are constants: its gradient is w_head dFKL + w_tail dRKL (gradchecked)."""
    teacher = logits(rng, (3, 50), torch.float64)
    student = logits(rng, (3, 50), torch.float64).requires_grad_(True)
    w = akl_kernels.head_tail_stats(student, teacher, backend="torch").head_weight
    (g_akl,) = torch.autograd.grad(akl_kernels.akl_loss(student, teacher, backend="torch",
                                                        reduction="sum"), student)
    (g_f,) = torch.autograd.grad(akl_kernels.fkl_loss(student, teacher, backend="torch",
                                                      reduction="none") @ w, student)
    (g_r,) = torch.autograd.grad(akl_kernels.rkl_loss(student, teacher, backend="torch",
                                                      reduction="none") @ (1 - w), student)
    assert torch.allclose(g_akl, g_f + g_r, atol=1e-12)


@pytest.mark.parametrize("kind", sorted(LOSSES))
def test_torch_backend_chunking_is_exact(rng, kind, monkeypatch):
    teacher = logits(rng, (9, 2000), device="cpu")  # CUDA may sum other row counts otherwise
    student = student_near(teacher, rng)
    whole = backend_grad(LOSSES[kind], student, teacher, backend="torch", reduction="none")
    monkeypatch.setenv("AKL_TORCH_WORKING_SET_MB", "0.2")  # forces chunks of one or two rows
    from akl_kernels.backends.torch import chunked

    assert chunked.chunk_rows(2000, torch.float32, chunked.sweep_of(kind)) <= 2
    chunked_result = backend_grad(LOSSES[kind], student, teacher, backend="torch",
                                  reduction="none")
    assert torch.allclose(whole[0], chunked_result[0], rtol=1e-6, atol=1e-7)
    assert torch.allclose(whole[1], chunked_result[1], rtol=1e-5, atol=1e-8)
