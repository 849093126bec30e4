"""JSD(beta), skew FKL/RKL, TVD and mixed KL against the float64 reference, every backend."""

import functools

import pytest
import torch

import akl_kernels
from akl_kernels.backends.torch import chunked
from tests.conftest import BACKENDS, DEVICE
from tests.helpers import (
    assert_matches_reference,
    backend_grad,
    logits,
    peaked_teacher,
    reference_grad,
    student_near,
    tvd_kink_rows,
)

# (reference kind, public function, parameter name, parameter values tried)
FAMILY = [
    ("jsd", akl_kernels.jsd_loss, "beta", [0.0, 0.1, 0.5, 0.9, 1.0]),
    ("skew_fkl", akl_kernels.skew_fkl_loss, "lam", [0.0, 0.1, 0.5, 1.0]),
    ("skew_rkl", akl_kernels.skew_rkl_loss, "lam", [0.0, 0.1, 0.5, 1.0]),
    ("mixed_kl", akl_kernels.mixed_kl_loss, "lam", [0.0, 0.3, 1.0]),
    ("tvd", akl_kernels.tvd_loss, None, [0.0]),
]
CASES = [(kind, fn, name, value) for kind, fn, name, values in FAMILY for value in values]
IDS = [f"{kind}-{value}" for kind, _, _, value in CASES]


def _loss_fn(fn, name, value):
    return functools.partial(fn, **({name: value} if name else {}))


def _check(case, backend, student, teacher, labels=None, **options):
    kind, fn, name, value = case
    loss, grad = backend_grad(_loss_fn(fn, name, value), student, teacher, labels,
                              backend=backend, **options)
    ref_loss, ref_grad = reference_grad(kind, student, teacher, labels, param=value, **options)
    kinks = None
    if kind == "tvd":
        kinks = tvd_kink_rows(student, teacher, temperature=options.get("temperature", 1.0))
    assert_matches_reference(loss, grad, ref_loss, ref_grad, student, kinks=kinks)
    return loss, grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_values_and_gradients(rng, backend, case, dtype):
    temperature = [0.7, 1.0, 2.0][CASES.index(case) % 3]
    teacher = logits(rng, (3, 4, 1000), dtype)
    student = student_near(teacher, rng)
    labels = torch.randint(0, 1000, (3, 4), generator=rng).to(DEVICE)
    labels[0, 1] = labels[2, 3] = -100
    for reduction in ("none", "mean", "sum"):
        _check(case, backend, student, teacher, labels, temperature=temperature,
               reduction=reduction)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_peaked_teacher_and_a_vocabulary_not_a_power_of_two(rng, backend, case):
    teacher = peaked_teacher(rng, (4, 32003))
    _check(case, backend, student_near(teacher, rng, noise=2.0), teacher, reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_negative_infinity_positions(rng, backend, case):
    teacher = logits(rng, (4, 300))
    student = student_near(teacher, rng)
    student[0, :7] = float("-inf")  # student-only
    teacher[1, 10:20] = float("-inf")  # teacher-only: the gradient's [j in C] terms matter
    student[2, 30] = teacher[2, 30] = float("-inf")  # both
    teacher[3, 40:] = float("-inf")  # most of the row
    _, grad = _check(case, backend, student, teacher, reduction="none")
    assert (grad[0, :7] == 0).all()  # no gradient where the student is -inf


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_no_nan_where_both_models_put_almost_no_mass(rng, backend, case):
    # Log-probabilities below -104: float32 p and q are 0 there, log(p / m) would be 0/0.
    teacher = logits(rng, (3, 500))
    student = student_near(teacher, rng)
    teacher[:, :100] -= 130.0
    student[:, :100] -= 150.0
    teacher[1, :300] -= 300.0
    student[2, 100:200] -= 120.0  # the student alone nearly zero: large but finite log ratios
    _check(case, backend, student, teacher, reduction="none")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_identical_models_give_zero(rng, backend, case):
    teacher = logits(rng, (3, 777))
    _kind, fn, name, value = case
    loss, grad = backend_grad(_loss_fn(fn, name, value), teacher, teacher, backend=backend,
                              reduction="none")
    assert loss.abs().max() < 1e-6
    # Zero up to float32 rounding of terms as large as the top probability: a peaked row's
    # (p = 0.81) skew FKL gradient is -0.7325 + 0.8139 * 0.9, two ulps of 0.73 = 1.2e-7 apart
    # (seed 239 of 3000 in the torch backend; 10 of them went over 1e-7).
    assert grad.abs().max() < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_positive_infinity_propagate(rng, backend):
    teacher = logits(rng, (3, 200))
    student = student_near(teacher, rng)
    student[0, 5] = float("nan")
    teacher[1, 9] = float("inf")
    for kind, fn, name, value in CASES:
        loss = _loss_fn(fn, name, value)(student, teacher, backend=backend, reduction="none")
        assert torch.isnan(loss[:2]).all() and torch.isfinite(loss[2]), kind


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_student_view(rng, backend):
    wide = logits(rng, (4, 1200))
    student = wide[:, :1000]
    teacher = student_near(student.contiguous(), rng)
    for case in CASES:
        _check(case, backend, student, teacher, reduction="none")


@pytest.mark.parametrize("kind", ["jsd", "skew_fkl", "skew_rkl", "tvd"])
def test_gradcheck_float64_torch_backend(rng, kind):
    student = logits(rng, (2, 9), torch.float64)
    # TVD's |p - q| has kinks at p = q: shifted logits keep every p_i away from q_i.
    shift = 0.5 * torch.sign(torch.randn(2, 9, generator=rng, dtype=torch.float64)).to(DEVICE)
    teacher = student + shift if kind == "tvd" else student_near(student, rng)
    teacher[0, 3] = float("-inf")
    fn, name = next((fn, name) for k, fn, name, _ in FAMILY if k == kind)
    loss_fn = _loss_fn(fn, name, 0.3)
    s = student.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: loss_fn(x, teacher, backend="torch", reduction="sum"), (s,)
    )


def test_torch_backend_chunking_is_exact(rng, monkeypatch):
    # On CPU: a CUDA reduction may pick another summation order for another number of rows.
    teacher = logits(rng, (7, 2000), device="cpu")
    student = student_near(teacher, rng)
    for kind, fn, name, value in CASES:
        loss_fn = _loss_fn(fn, name, value)
        whole = backend_grad(loss_fn, student, teacher, backend="torch", reduction="none")
        monkeypatch.setattr(chunked, "working_set_bytes", lambda *_: 2 * 2000 * 4 * 16)
        parts = backend_grad(loss_fn, student, teacher, backend="torch", reduction="none")
        monkeypatch.undo()
        assert torch.equal(whole[0], parts[0]) and torch.equal(whole[1], parts[1]), kind


def test_parameter_conventions(rng):
    teacher = logits(rng, (3, 100))
    student = student_near(teacher, rng)
    fkl = akl_kernels.fkl_loss(student, teacher, backend="torch")
    rkl = akl_kernels.rkl_loss(student, teacher, backend="torch")
    # beta = 0 / 1 is FKL / RKL exactly (the TRL and Liger-Kernel convention), and so are the
    # skew KLs at lam = 0 and the mixed KL at its ends.
    assert torch.equal(akl_kernels.jsd_loss(student, teacher, beta=0.0, backend="torch"), fkl)
    assert torch.equal(akl_kernels.jsd_loss(student, teacher, beta=1.0, backend="torch"), rkl)
    assert torch.equal(akl_kernels.skew_fkl_loss(student, teacher, lam=0.0, backend="torch"), fkl)
    assert torch.equal(akl_kernels.skew_rkl_loss(student, teacher, lam=0.0, backend="torch"), rkl)
    assert torch.equal(akl_kernels.mixed_kl_loss(student, teacher, lam=1.0, backend="torch"), rkl)
    half = akl_kernels.mixed_kl_loss(student, teacher, lam=0.5, backend="torch")
    assert torch.allclose(half, 0.5 * (fkl + rkl))
    # JSD is symmetric at beta = 0.5 (swap the roles: the teacher becomes the student).
    a = akl_kernels.jsd_loss(student, teacher, beta=0.5, backend="torch")
    b = akl_kernels.jsd_loss(teacher, student, beta=0.5, backend="torch")
    assert torch.allclose(a, b, rtol=1e-5)
    tvd = akl_kernels.tvd_loss(student, teacher, backend="torch", reduction="none")
    assert ((tvd >= 0) & (tvd <= 1)).all()


@pytest.mark.parametrize("name,fn", [("beta", akl_kernels.jsd_loss),
                                     ("lam", akl_kernels.skew_fkl_loss),
                                     ("lam", akl_kernels.skew_rkl_loss),
                                     ("lam", akl_kernels.mixed_kl_loss)])
def test_parameter_validation_names_the_argument(name, fn):
    x = torch.zeros(2, 5)
    for bad, error in ((-0.1, ValueError), (1.5, ValueError), ("0.5", TypeError),
                       (True, TypeError)):
        with pytest.raises(error, match=name):
            fn(x, x, **{name: bad})


def test_modules_match_the_functions(rng):
    teacher = logits(rng, (2, 3, 50))
    student = student_near(teacher, rng)
    pairs = [(akl_kernels.JSDLoss(beta=0.3), akl_kernels.jsd_loss, dict(beta=0.3)),
             (akl_kernels.SkewFKLLoss(lam=0.2), akl_kernels.skew_fkl_loss, dict(lam=0.2)),
             (akl_kernels.SkewRKLLoss(), akl_kernels.skew_rkl_loss, dict(lam=0.1)),
             (akl_kernels.MixedKLLoss(lam=0.25), akl_kernels.mixed_kl_loss, dict(lam=0.25)),
             (akl_kernels.TVDLoss(temperature=2.0), akl_kernels.tvd_loss, dict(temperature=2.0))]
    for module, fn, options in pairs:
        assert torch.equal(module(student, teacher), fn(student, teacher, **options))
        assert "reduction='mean'" in repr(module)
    with pytest.raises(ValueError, match="beta"):
        akl_kernels.JSDLoss(beta=2.0)
