"""distillation_loss: (1 - kd_ratio) CE + kd_ratio divergence, the CE fused into the passes."""

import pytest
import torch
import torch.nn.functional as F

import akl_kernels
import reference
from tests.conftest import BACKENDS, DEVICE
from tests.helpers import grad_tol, logits, rel_err, student_near, without_tvd_kinks

DIVERGENCES = [("akl", {}, 0.0), ("fkl", {}, 0.0), ("rkl", {}, 0.0), ("jsd", {"beta": 0.3}, 0.3),
               ("skew_fkl", {"lam": 0.1}, 0.1), ("skew_rkl", {"lam": 0.1}, 0.1),
               ("tvd", {}, 0.0), ("mixed_kl", {"lam": 0.25}, 0.25)]


def _inputs(rng, dtype=torch.float32, shape=(3, 4), vocab=600):
    teacher = logits(rng, (*shape, vocab), dtype)
    student = student_near(teacher, rng)
    labels = torch.randint(0, vocab, shape, generator=rng).to(DEVICE)
    labels.view(-1)[[1, 6]] = -100
    return student, teacher, labels


def _compare(backend, student, teacher, labels, divergence, options, param, **kwargs):
    s = student.detach().clone().requires_grad_(True)
    out = akl_kernels.distillation_loss(s, teacher, labels, divergence=divergence,
                                        backend=backend, return_parts=True, **options, **kwargs)
    out.loss.sum().backward()
    s64 = student.detach().double().cpu().requires_grad_(True)
    ref = reference.reference_distillation_loss(
        s64, teacher.double().cpu(), labels.cpu(), divergence=divergence, param=param, **kwargs)
    ref[0].sum().backward()
    for got, want in zip(out, ref, strict=True):
        assert got.dtype == torch.float32
        assert torch.allclose(got.double().cpu(), want.detach(), rtol=1e-4, atol=1e-5), (got, want)
    assert not out.cross_entropy.requires_grad and not out.divergence.requires_grad
    assert rel_err(s.grad, s64.grad) < grad_tol(student.dtype)
    return out, s.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence,options,param", DIVERGENCES, ids=[d[0] for d in DIVERGENCES])
@pytest.mark.parametrize("kd_ratio", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_matches_the_reference(rng, backend, divergence, options, param, kd_ratio, temperature):
    student, teacher, labels = _inputs(rng)
    if divergence == "tvd":
        labels = without_tvd_kinks(labels, student, teacher, temperature=temperature)
    for reduction in ("mean", "sum", "none"):
        _compare(backend, student, teacher, labels, divergence, options, param,
                 kd_ratio=kd_ratio, temperature=temperature, reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits(rng, backend, dtype):
    student, teacher, labels = _inputs(rng, dtype, vocab=32003)
    _compare(backend, student, teacher, labels, "akl", {}, 0.0, kd_ratio=0.5, temperature=1.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_part_is_torchs(rng, backend):
    student, teacher, labels = _inputs(rng, vocab=1000)
    out = akl_kernels.distillation_loss(student, teacher, labels, temperature=2.0,
                                        backend=backend, return_parts=True)
    expected = F.cross_entropy(student.reshape(-1, 1000), labels.reshape(-1), ignore_index=-100)
    assert torch.allclose(out.cross_entropy, expected, rtol=1e-5)
    divergence = akl_kernels.akl_loss(student, teacher, labels, temperature=2.0, backend=backend)
    assert torch.allclose(out.divergence, divergence, rtol=1e-6)
    assert torch.allclose(out.loss, 0.5 * (expected + divergence), rtol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_infinity_and_a_strided_student(rng, backend):
    wide = logits(rng, (6, 900))
    student = wide[:, :700]  # a row-strided view: not copied
    teacher = student_near(student.contiguous(), rng)
    labels = torch.randint(0, 700, (6,), generator=rng).to(DEVICE)
    labels[2] = -100
    student[0, (labels[0] + 1) % 700] = float("-inf")  # the student's own -inf, not the label
    teacher[1, labels[1]] = float("-inf")  # the teacher rules the label out: CE does not care
    _, grad = _compare(backend, student, teacher, labels, "akl", {}, 0.0, kd_ratio=0.4,
                       temperature=1.3, reduction="none")
    assert grad[0, (labels[0] + 1) % 700] == 0 and (grad[2] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_ignored(rng, backend):
    student, teacher, labels = _inputs(rng)
    labels[:] = -100
    s = student.clone().requires_grad_(True)
    loss = akl_kernels.distillation_loss(s, teacher, labels, backend=backend)
    loss.backward()
    assert loss.item() == 0 and (s.grad == 0).all()


def test_bad_arguments_name_themselves(rng):
    student, teacher, labels = _inputs(rng)
    loss = akl_kernels.distillation_loss
    with pytest.raises(ValueError, match="labels"):
        loss(student, teacher, labels.masked_fill(labels == labels[0, 0], 600))
    with pytest.raises(ValueError, match="labels"):
        loss(student, teacher, labels.masked_fill(labels == labels[0, 0], -3))
    with pytest.raises(ValueError, match="labels"):
        loss(student, teacher, None)
    with pytest.raises(ValueError, match="kd_ratio"):
        loss(student, teacher, labels, kd_ratio=1.5)
    with pytest.raises(ValueError, match="divergence"):
        loss(student, teacher, labels, divergence="kl")
    with pytest.raises(TypeError, match="beta"):
        loss(student, teacher, labels, divergence="akl", beta=0.5)
    with pytest.raises(ValueError, match="beta"):
        loss(student, teacher, labels, divergence="jsd", beta=-1)
    with pytest.raises(ValueError, match="mu"):
        loss(student, teacher, labels, mu=0.0)


def test_module(rng):
    student, teacher, labels = _inputs(rng)
    module = akl_kernels.DistillationLoss("jsd", kd_ratio=0.7, beta=0.2, temperature=2.0)
    expected = akl_kernels.distillation_loss(student, teacher, labels, divergence="jsd",
                                             kd_ratio=0.7, beta=0.2, temperature=2.0)
    assert torch.equal(module(student, teacher, labels), expected)
    assert "divergence='jsd'" in repr(module)
    with pytest.raises(TypeError, match="lam"):
        akl_kernels.DistillationLoss("akl", lam=0.1)
