"""Every backend against the float64 reference: values and gradients (docs/contract.md §5)."""

import itertools

import pytest
import torch

import akl_kernels
from tests.conftest import BACKENDS, DEVICE
from tests.helpers import (
    ambiguous_rows,
    assert_matches_reference,
    backend_grad,
    logits,
    peaked_teacher,
    reference_grad,
    student_near,
)

LOSSES = {"fkl": akl_kernels.fkl_loss, "rkl": akl_kernels.rkl_loss, "akl": akl_kernels.akl_loss}
DTYPE_PAIRS = [
    (torch.float32, torch.float32),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
    (torch.bfloat16, torch.float32),
    (torch.float32, torch.float16),
]
SHAPES = [((5,), 1), ((3,), 2), ((2, 3), 7), ((4,), 1000), ((2, 2, 2), 1000), ((3,), 32003)]
TEMPERATURES = [0.5, 1.0, 2.0]


def _check(kind, backend, student, teacher, labels=None, value_tol=1e-4, **kwargs):
    loss, grad = backend_grad(LOSSES[kind], student, teacher, labels, backend=backend, **kwargs)
    ref_loss, ref_grad = reference_grad(kind, student, teacher, labels, **kwargs)
    assert_matches_reference(loss, grad, ref_loss, ref_grad, student, value_tol)
    return loss, grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", sorted(LOSSES))
@pytest.mark.parametrize("s_dtype,t_dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("lead,vocab", SHAPES)
def test_values_and_gradients(rng, backend, kind, s_dtype, t_dtype, lead, vocab):
    case = SHAPES.index((lead, vocab)) + DTYPE_PAIRS.index((s_dtype, t_dtype))
    temperature = TEMPERATURES[case % 3]
    shape = (*lead, vocab)
    teacher = logits(rng, shape, t_dtype)
    student = student_near(teacher, rng).to(s_dtype)
    amb = ambiguous_rows(teacher, mu=0.5, temperature=temperature)
    # An ambiguous row may pick a neighbouring head (docs/contract.md §2): the loss moves by
    # ~1e-6 then.
    tol = 1e-3 if (kind == "akl" and amb.any()) else 1e-4
    _check(kind, backend, student, teacher, temperature=temperature, reduction="sum", value_tol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", sorted(LOSSES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_with_ignored_rows(rng, backend, kind, reduction):
    teacher = logits(rng, (3, 4, 777))
    student = student_near(teacher, rng)
    labels = torch.randint(0, 777, (3, 4), generator=rng)
    labels[0, 1] = labels[2, 3] = labels[1, 0] = -100
    labels = labels.to(DEVICE)
    loss, grad = _check(kind, backend, student, teacher, labels, reduction=reduction)
    ignored = labels == -100
    assert (grad[ignored] == 0).all()
    if reduction == "none":
        assert loss.shape == (3, 4) and (loss[ignored] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_custom_ignore_index(rng, backend, reduction):
    teacher = logits(rng, (6, 300))
    student = student_near(teacher, rng)
    labels = torch.tensor([3, 7, 7, 1, 7, 0], device=DEVICE)
    _check("akl", backend, student, teacher, labels, ignore_index=7, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", sorted(LOSSES))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_rows_ignored(rng, backend, kind, reduction):
    teacher = logits(rng, (2, 3, 50))
    student = logits(rng, (2, 3, 50)).requires_grad_(True)
    labels = torch.full((2, 3), -100, device=DEVICE)
    loss = LOSSES[kind](student, teacher, labels, reduction=reduction, backend=backend)
    assert (loss == 0).all()
    loss.sum().backward()
    assert (student.grad == 0).all()


MU_RULES = list(itertools.product([0.1, 0.5, 0.9, 1.0], [False, True]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mu,include_crossing", MU_RULES)
def test_mu_and_boundary_rules(rng, backend, mu, include_crossing):
    teacher = torch.cat([logits(rng, (6, 2000)), peaked_teacher(rng, (2, 2000))])
    student = student_near(teacher, rng)
    opts = dict(mu=mu, include_crossing=include_crossing, temperature=1.0)
    _check("akl", backend, student, teacher, reduction="none", value_tol=1e-3, **opts)
    stats = akl_kernels.head_tail_stats(student, teacher, backend=backend, **opts)
    ref = __import__("reference").reference_head_tail_stats(student.cpu(), teacher.cpu(), **opts)
    clear = ~ambiguous_rows(teacher, mu=mu)
    assert clear.sum() >= 6  # the test must not pass by excluding every row
    assert torch.equal(stats.head_count.cpu()[clear], ref.head_count[clear])
    assert torch.allclose(stats.head_mass.cpu()[clear].double(), ref.head_mass[clear], atol=1e-5)
    assert torch.allclose(stats.head_gap.cpu()[clear].double(), ref.head_gap[clear], atol=1e-5)
    assert torch.allclose(stats.tail_gap.cpu()[clear].double(), ref.tail_gap[clear], atol=1e-5)
    if mu == 1.0:
        assert (stats.head_count == 2000).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", [4096 * 2 + 5, 1024 * 3 + 1])
def test_last_vocabulary_chunk_counts(rng, backend, vocab):
    """All of the teacher's mass and the student's error sit in the final partial chunk."""
    teacher = logits(rng, (3, vocab), scale=0.1)
    teacher[:, -3:] += 15.0
    student = logits(rng, (3, vocab), scale=0.1)
    student[:, -2] += 9.0
    for kind in LOSSES:
        _check(kind, backend, student, teacher, reduction="none")
    stats = akl_kernels.head_tail_stats(student, teacher, backend=backend, mu=0.9)
    ref = __import__("reference").reference_head_tail_stats(student.cpu(), teacher.cpu(), mu=0.9)
    assert torch.equal(stats.head_count.cpu(), ref.head_count)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_vocabulary_not_power_of_two(rng, backend):
    teacher = logits(rng, (2, 70001), torch.bfloat16)
    student = student_near(teacher, rng)
    for kind in LOSSES:
        _check(kind, backend, student, teacher, reduction="none", value_tol=1e-3)
