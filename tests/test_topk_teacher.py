"""Sparse (top-k) teachers (docs/contract.md §6): every loss against the float64 reference and
against the dense loss at k = V, both tail rules, AKL's head among the k tokens, validation."""

import pytest
import torch

import akl_kernels
import reference
from akl_kernels import TopKTeacher, topk_teacher
from tests.conftest import BACKENDS, DEVICE
from tests.helpers import (
    grad_tol,
    logits,
    peaked_teacher,
    rel_err,
    student_near,
    tvd_kink_rows,
    zero_rows,
)

DIVERGENCES = {"fkl": {}, "rkl": {}, "akl": {"mu": 0.5}, "jsd": {"beta": 0.3},
               "skew_fkl": {"lam": 0.2}, "skew_rkl": {"lam": 0.2}, "tvd": {},
               "mixed_kl": {"lam": 0.4}}
TAILS = ["bucket", "renormalize"]


def _param(kind, options):
    return next(iter(options.values())) if kind in ("jsd", "skew_fkl", "skew_rkl",
                                                    "mixed_kl") else 0.0


def _loss_and_grad(student, teacher, labels=None, **kwargs):
    s = student.detach().clone().requires_grad_(True)
    loss = akl_kernels.divergence_loss(s, teacher, labels, **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), s)
    return loss.detach(), grad


def _reference(kind, student, teacher, labels=None, *, options, **kwargs):
    s = student.detach().double().cpu().requires_grad_(True)
    cpu_teacher = teacher.to("cpu")
    lab = None if labels is None else labels.cpu()
    mu = options.get("mu", 0.5)
    loss = reference.reference_sparse_loss(kind, s, cpu_teacher, lab, mu=mu,
                                           param=_param(kind, options), **kwargs)
    (grad,) = torch.autograd.grad(loss.sum(), s)
    return loss.detach(), grad


def _with_padding(teacher: TopKTeacher, gen, index_of_padding=None):
    """Some rows lose some of their last entries to padding (-inf, index garbage)."""
    lp = teacher.logprobs.clone()
    idx = teacher.indices.clone()
    n, k = lp.reshape(-1, lp.shape[-1]).shape
    keep = torch.randint(1, k + 1, (n,), generator=gen).to(lp.device)
    padded = torch.arange(k, device=lp.device)[None, :] >= keep[:, None]
    lp.reshape(n, k)[padded] = float("-inf")
    garbage = torch.randint(0, 7, (int(padded.sum()),), generator=gen).to(idx.device)
    idx.reshape(n, k)[padded] = garbage if index_of_padding is None else index_of_padding
    return TopKTeacher(idx, lp, teacher.tail)


def _assert_close(loss, grad, ref_loss, ref_grad, dtype, value_tol=1e-5, kinks=None):
    """Values, and the gradient away from ``kinks`` (rows: tests/helpers.py tvd_kink_rows)."""
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    err = (loss.double().cpu() - ref_loss).abs()
    assert (err <= value_tol * ref_loss.abs() + 1e-6).all(), (loss, ref_loss)
    grad, ref_grad = zero_rows(kinks, grad, ref_grad)
    # Relative, with a floor: a gradient entry is a float32 difference of terms of size up to 1
    # (the probabilities), formed to a few ulps of 1 however small it is. A student this near a
    # peaked teacher gives rows whose whole gradient is ~1e-5 (seed 4268882038).
    floor = 8 * torch.finfo(torch.float32).eps * ref_loss.numel() ** 0.5
    err = (grad.double().cpu() - ref_grad).norm().item()
    assert err < grad_tol(dtype) * ref_grad.norm().item() + floor, rel_err(grad, ref_grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", sorted(DIVERGENCES))
@pytest.mark.parametrize("tail", TAILS)
def test_k_equal_to_vocabulary_is_the_dense_loss(rng, backend, kind, tail):
    vocab, temperature = 97, 1.7
    teacher = logits(rng, (3, 4, vocab))
    student = student_near(teacher, rng)
    sparse = topk_teacher(teacher, vocab, temperature=temperature, tail=tail)
    options = dict(divergence=kind, temperature=temperature, reduction="none", backend=backend,
                   **DIVERGENCES[kind])
    loss, grad = _loss_and_grad(student, sparse, **options)
    dense_loss, dense_grad = _loss_and_grad(student, teacher, **options)
    assert torch.allclose(loss, dense_loss, rtol=1e-5, atol=1e-6)
    assert rel_err(grad, dense_grad) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["fkl", "rkl", "akl", "jsd"])
def test_k_equal_to_vocabulary_with_impossible_tokens_in_bucket_mode(rng, backend, kind):
    """Teacher -inf logits: their log-probability is -inf, i.e. padding; bucket mode still
    equals the dense loss (renormalize does only for teachers without -inf, docs §6)."""
    vocab = 61
    teacher = logits(rng, (5, vocab))
    teacher[:, -9:] = float("-inf")
    student = student_near(teacher.clamp(min=-30.0), rng)
    sparse = topk_teacher(teacher, vocab)
    options = dict(divergence=kind, reduction="none", backend=backend, **DIVERGENCES[kind])
    loss, grad = _loss_and_grad(student, sparse, **options)
    dense_loss, dense_grad = _loss_and_grad(student, teacher, **options)
    assert torch.allclose(loss, dense_loss, rtol=1e-5, atol=1e-6)
    assert rel_err(grad, dense_grad) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", sorted(DIVERGENCES))
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("k", [1, 8, 64])
def test_against_the_reference_with_padding(rng, backend, kind, tail, k):
    vocab, temperature = 300, 0.8
    teacher_logits = peaked_teacher(rng, (2, 5, vocab)) if k == 8 else logits(rng, (2, 5, vocab))
    student = student_near(teacher_logits, rng, noise=1.5)
    teacher = _with_padding(topk_teacher(teacher_logits, k, tail=tail), rng)
    labels = torch.randint(0, vocab, (2, 5), generator=rng).to(DEVICE)
    labels[0, 1] = -100
    options = DIVERGENCES[kind]
    loss, grad = _loss_and_grad(student, teacher, labels, divergence=kind,
                                temperature=temperature, reduction="none", backend=backend,
                                **options)
    ref_loss, ref_grad = _reference(kind, student, teacher, labels, options=options,
                                    temperature=temperature, reduction="none")
    kinks = tvd_kink_rows(student, teacher, temperature=temperature) if kind == "tvd" else None
    _assert_close(loss, grad, ref_loss, ref_grad, student.dtype, kinks=kinks)
    assert (grad[0, 1] == 0).all() and loss[0, 1] == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tail", TAILS)
def test_half_precision_students_and_teachers(rng, backend, dtype, tail):
    vocab = 500
    teacher_logits = logits(rng, (6, vocab), dtype)
    student = student_near(teacher_logits, rng).to(dtype)
    dense = topk_teacher(teacher_logits, 16, tail=tail)
    teacher = TopKTeacher(dense.indices.int(), dense.logprobs.to(dtype), tail)
    loss, grad = _loss_and_grad(student, teacher, divergence="akl", reduction="none",
                                backend=backend)
    ref_loss, ref_grad = _reference("akl", student, teacher, options={}, reduction="none")
    assert grad.dtype == dtype and loss.dtype == torch.float32
    _assert_close(loss, grad, ref_loss, ref_grad, dtype, value_tol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("include_crossing", [False, True])
@pytest.mark.parametrize("mu", [0.05, 0.5, 0.9, 1.0])
def test_akl_head_among_the_k_tokens(rng, backend, tail, include_crossing, mu):
    """Flat teachers put less than mu in their k tokens (the head is then all of them in
    bucket mode); bf16 logits give ties inside the top k, broken by vocabulary index."""
    vocab, k = 400, 12
    flat = logits(rng, (4, vocab), scale=0.3)
    tied = (logits(rng, (4, vocab), scale=1.0) * 4).round().to(torch.bfloat16)
    peaked = peaked_teacher(rng, (4, vocab))
    teacher_logits = torch.cat([flat, tied.float(), peaked])
    student = student_near(teacher_logits, rng)
    teacher = topk_teacher(teacher_logits, k, tail=tail)
    stats = akl_kernels.head_tail_stats(student, teacher, mu=mu,
                                        include_crossing=include_crossing, backend=backend)
    ref = reference.reference_sparse_head_tail_stats(student.cpu(), teacher.to("cpu"), mu=mu,
                                                     include_crossing=include_crossing)
    assert torch.equal(stats.head_count.cpu(), ref.head_count)
    for name, ours, theirs in zip(ref._fields, stats, ref, strict=True):
        got, want = ours.double().cpu(), theirs.double()
        if name != "head_weight":
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), name
            continue
        # The weight H / (H + T) is as accurate as the gaps checked above (|dH|, |dT| <= 1e-6 +
        # 1e-5 of each): its error is at most (|dH| + |dT|) / (H + T) <= 1e-5 + 2e-6 / (H + T).
        # A student close to a teacher whose top token holds ~0.997 has gaps of ~1e-3 there,
        # each |p - q| formed to ~1e-7 in float32 (seed 2734893327); both gaps 0 give 0.5.
        total = (ref.head_gap + ref.tail_gap).double()
        bound = torch.where(total > 0, 1e-5 + 2e-6 / total.clamp(min=1e-30), 0.0)
        assert ((got - want).abs() <= bound).all(), (name, got, want)
    if tail == "bucket" and mu > 0.05:
        assert (stats.head_count[:4] == k).all()  # the flat rows hold less than mu
    if mu == 1.0:
        assert (stats.head_count == k).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["fkl", "rkl", "akl"])
def test_a_tiny_student_rest_mass_is_exact(rng, backend, kind):
    """The k tokens hold all but ~1e-8 of the student's mass and the teacher keeps 1e-3 for
    the rest: log Q_rest drives the loss, so Q_rest must be summed outside the k tokens (a
    float32 difference 1 - sum_k q would be noise at that size)."""
    vocab, k = 3000, 8
    student = logits(rng, (4, vocab), scale=0.5)
    teacher_logits = logits(rng, (4, vocab))
    sparse = topk_teacher(teacher_logits, k)
    student.scatter_(1, sparse.indices, 26.0)  # Q_rest ~ V e^-26 / k ~ 2e-9
    weights = torch.rand((4, k), generator=rng, dtype=torch.float64) + 0.5
    lp = torch.log(weights / weights.sum(-1, keepdim=True) * (1.0 - 1e-3)).float()
    teacher = TopKTeacher(sparse.indices, lp.to(DEVICE))
    loss, grad = _loss_and_grad(student, teacher, divergence=kind, reduction="none",
                                backend=backend)
    ref_loss, ref_grad = _reference(kind, student, teacher, options={}, reduction="none")
    _assert_close(loss, grad, ref_loss, ref_grad, student.dtype)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_inside_the_top_k_follow_the_vocabulary_index(rng, backend):
    """Equal log-probabilities listed in any order: the head takes the lower indices."""
    vocab = 50
    lp = torch.log(torch.tensor([[0.2, 0.2, 0.2, 0.2, 0.1]], dtype=torch.float64))
    idx = torch.tensor([[40, 7, 23, 3, 11]])
    student = logits(rng, (1, vocab), torch.float64)
    teacher = TopKTeacher(idx.to(DEVICE), lp.to(DEVICE).float())
    stats = akl_kernels.head_tail_stats(student.float(), teacher, mu=0.45, backend=backend)
    assert int(stats.head_count) == 2
    head_mass = float(stats.head_mass)
    assert head_mass == pytest.approx(0.4, rel=1e-6)
    q = torch.softmax(student.double(), -1)[0]
    # head = tokens 3 and 7 (the lowest indices among the 0.2s)
    want = float((0.2 - q[3]).abs() + (0.2 - q[7]).abs())
    assert float(stats.head_gap) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("kind", [k for k in sorted(DIVERGENCES) if k != "akl"])
@pytest.mark.parametrize("tail", TAILS)
def test_gradcheck(rng, kind, tail):
    """Finite differences against the analytic gradient (AKL's weights are constants by
    definition, so finite differences do not apply to it; its gradient is tested against the
    reference above)."""
    teacher_logits = logits(rng, (3, 40), torch.float64)
    student = student_near(teacher_logits, rng).requires_grad_(True)
    teacher = _with_padding(topk_teacher(teacher_logits, 6, temperature=1.3, tail=tail), rng)
    assert torch.autograd.gradcheck(
        lambda s: akl_kernels.divergence_loss(s, teacher, divergence=kind, temperature=1.3,
                                              backend="torch", **DIVERGENCES[kind]),
        (student,))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", TAILS)
def test_distillation_loss_with_a_sparse_teacher(rng, backend, tail):
    vocab = 211
    teacher_logits = logits(rng, (3, 5, vocab))
    student = student_near(teacher_logits, rng)
    teacher = topk_teacher(teacher_logits, 10, tail=tail)
    labels = torch.randint(0, vocab, (3, 5), generator=rng).to(DEVICE)
    labels[1, :2] = -100
    s = student.clone().requires_grad_(True)
    out = akl_kernels.distillation_loss(s, teacher, labels, divergence="akl", kd_ratio=0.3,
                                        temperature=2.0, backend=backend, return_parts=True)
    (grad,) = torch.autograd.grad(out.loss, s)
    s64 = student.double().cpu().requires_grad_(True)
    ref = reference.reference_sparse_distillation_loss(s64, teacher.to("cpu"), labels.cpu(),
                                                       kd_ratio=0.3, temperature=2.0)
    (ref_grad,) = torch.autograd.grad(ref[0], s64)
    for got, want in zip(out, ref, strict=True):
        assert float(got.detach()) == pytest.approx(float(want.detach()), rel=1e-5)
    assert rel_err(grad, ref_grad) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_modules_take_a_sparse_teacher(rng, backend):
    teacher_logits = logits(rng, (4, 90))
    student = student_near(teacher_logits, rng)
    teacher = topk_teacher(teacher_logits, 5)
    for module, kind in ((akl_kernels.AKLLoss(backend=backend), "akl"),
                         (akl_kernels.FKLLoss(backend=backend), "fkl"),
                         (akl_kernels.JSDLoss(beta=0.5, backend=backend), "jsd")):
        want = akl_kernels.divergence_loss(student, teacher, divergence=kind, backend=backend,
                                           **({"beta": 0.5} if kind == "jsd" else {}))
        assert torch.equal(module(student, teacher), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_impossible_and_poisoned_student_logits(rng, backend):
    vocab = 80
    teacher_logits = logits(rng, (4, vocab))
    student = student_near(teacher_logits, rng)
    teacher = topk_teacher(teacher_logits, 6)
    student[0, teacher.indices[0, 0]] = float("-inf")  # a top-k token impossible: no NaN
    outside = next(j for j in range(vocab) if j not in teacher.indices[1].tolist())
    student[1, outside] = float("nan")  # NaN outside the k tokens poisons the row
    student[2, outside] = float("inf")
    loss, grad = _loss_and_grad(student, teacher, divergence="fkl", reduction="none",
                                backend=backend)
    assert torch.isfinite(loss[0]) and torch.isfinite(grad[0]).all()
    assert grad[0, teacher.indices[0, 0]] == 0
    assert loss[1:3].isnan().all() and grad[1:3].isnan().all()
    assert torch.isfinite(loss[3]) and torch.isfinite(grad[3]).all()


def test_topk_teacher_takes_the_most_probable_tokens_stably(rng):
    vocab = 64
    teacher_logits = (logits(rng, (3, 7, vocab)) * 2).round()  # many ties
    built = topk_teacher(teacher_logits, 9, temperature=2.0, rows_per_chunk=2)
    log_p = torch.log_softmax(teacher_logits.double() / 2.0, -1)
    order = torch.sort(log_p, dim=-1, descending=True, stable=True).indices[..., :9]
    assert torch.equal(built.indices, order)
    assert torch.allclose(built.logprobs.double(), log_p.gather(-1, order), atol=1e-6)
    assert built.logprobs.dtype == torch.float32 and built.tail == "bucket"
    assert torch.equal(topk_teacher(teacher_logits, 9, temperature=2.0).indices, built.indices)
    shifted = built[:, :-1]
    assert shifted.indices.shape == (3, 6, 9) and torch.equal(shifted.logprobs,
                                                              built.logprobs[:, :-1])


def test_sparse_losses_trace_as_one_graph(rng):
    teacher_logits = logits(rng, (2, 3, 50))
    student = student_near(teacher_logits, rng).requires_grad_(True)
    teacher = topk_teacher(teacher_logits, 4)
    labels = torch.randint(0, 50, (2, 3), generator=rng).to(DEVICE)

    def step(s, indices, logprobs):
        sparse = TopKTeacher(indices, logprobs, "bucket")
        return (akl_kernels.akl_loss(s, sparse, labels)
                + akl_kernels.distillation_loss(s, sparse, labels, divergence="jsd"))

    explained = torch._dynamo.explain(step)(student, teacher.indices, teacher.logprobs)
    assert explained.graph_count == 1 and explained.graph_break_count == 0
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got = compiled(student, teacher.indices, teacher.logprobs)
    want = step(student, teacher.indices, teacher.logprobs)
    assert torch.allclose(got, want, rtol=1e-6)
    (g1,) = torch.autograd.grad(got, student)
    (g2,) = torch.autograd.grad(want, student)
    assert torch.allclose(g1, g2, rtol=1e-6, atol=1e-8)


BAD = [
    ("out_of_range", ValueError, "must lie in \\[0, 50\\)"),
    ("negative_index", ValueError, "must lie in \\[0, 50\\)"),
    ("repeated", ValueError, "repeat a token"),
    ("positive", ValueError, "<= 0"),
    ("nan", ValueError, "not NaN"),
    ("mass", ValueError, "mass of"),
]


@pytest.mark.parametrize("case,error,match", BAD)
def test_bad_values_are_refused(rng, case, error, match):
    teacher = topk_teacher(logits(rng, (3, 50)), 5)
    idx, lp = teacher.indices.clone(), teacher.logprobs.clone()
    if case == "out_of_range":
        idx[1, 2] = 50
    elif case == "negative_index":
        idx[2, 0] = -1
    elif case == "repeated":
        idx[0, 3] = idx[0, 1]
    elif case == "positive":
        lp[1, 0] = 0.5
    elif case == "nan":
        lp[0, 4] = float("nan")
    else:
        lp[2] = torch.log(torch.full((5,), 0.25))
    before = (idx.clone(), lp.clone())
    student = logits(rng, (3, 50))
    with pytest.raises(error, match=match):
        akl_kernels.akl_loss(student, TopKTeacher(idx, lp))
    assert torch.equal(idx, before[0])
    assert torch.allclose(lp, before[1], rtol=0, atol=0, equal_nan=True)


def test_padding_may_point_anywhere(rng):
    """A padded entry's index is ignored: out of range, repeated, negative."""
    teacher_logits = logits(rng, (3, 50))
    student = student_near(teacher_logits, rng)
    teacher = topk_teacher(teacher_logits, 5)
    lp = teacher.logprobs.clone()
    lp[:, 3:] = float("-inf")
    clean = TopKTeacher(teacher.indices.clone(), lp)
    idx = teacher.indices.clone()
    idx[0, 3:] = 999
    idx[1, 3:] = idx[1, 0]
    idx[2, 3:] = -5
    for kind in ("fkl", "akl"):
        want = _loss_and_grad(student, clean, divergence=kind)
        got = _loss_and_grad(student, TopKTeacher(idx, lp), divergence=kind)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_check_values_false_skips_the_value_checks(rng):
    teacher = topk_teacher(logits(rng, (3, 50)), 5)
    idx = teacher.indices.clone()
    idx[0, 3] = idx[0, 1]  # repeated: refused with the checks, computed without them
    student = logits(rng, (3, 50))
    with pytest.raises(ValueError, match="repeat"):
        akl_kernels.fkl_loss(student, TopKTeacher(idx, teacher.logprobs))
    loss = akl_kernels.fkl_loss(student, TopKTeacher(idx, teacher.logprobs), check_values=False)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("case,error,match", [
    ("float_indices", TypeError, "int32 or int64"),
    ("int_logprobs", TypeError, "float32, bfloat16"),
    ("shape", ValueError, "one shape"),
    ("lead", ValueError, "leading shape"),
    ("tail", ValueError, "tail must be one of"),
    ("grad", ValueError, "requires grad"),
])
def test_bad_teachers_are_refused(rng, case, error, match):
    teacher = topk_teacher(logits(rng, (2, 3, 50)), 5)
    idx, lp, tail = teacher
    if case == "float_indices":
        idx = idx.float()
    elif case == "int_logprobs":
        lp = lp.long()
    elif case == "shape":
        lp = lp[..., :4]
    elif case == "lead":
        idx, lp = idx[:, :2], lp[:, :2]
    elif case == "tail":
        tail = "drop"
    else:
        lp = lp.clone().requires_grad_(True)
    with pytest.raises(error, match=match):
        akl_kernels.akl_loss(logits(rng, (2, 3, 50)), TopKTeacher(idx, lp, tail))


def test_topk_teacher_arguments_are_checked(rng):
    with pytest.raises(ValueError, match="k must be"):
        topk_teacher(logits(rng, (2, 10)), 11)
    with pytest.raises(ValueError, match="tail must be"):
        topk_teacher(logits(rng, (2, 10)), 3, tail="none")
    with pytest.raises(ValueError, match="temperature"):
        topk_teacher(logits(rng, (2, 10)), 3, temperature=0.0)
    with pytest.raises(TypeError, match="tail must be a str"):
        topk_teacher(logits(rng, (2, 10)), 3, tail=None)
    with pytest.raises(TypeError, match="k must be a positive int"):
        topk_teacher(logits(rng, (2, 10)), 3.0)
    # A chunk size that would leave the outputs unwritten (an empty range) is refused.
    for rows_per_chunk, error in ((0, ValueError), (-1, ValueError), (2.5, TypeError)):
        with pytest.raises(error, match="rows_per_chunk must be"):
            topk_teacher(logits(rng, (2, 10)), 3, rows_per_chunk=rows_per_chunk)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of a few rows and vocabulary blocks, so that every sweep loops."""
    monkeypatch.setenv("AKL_FUSED_LINEAR_BUDGET_MB", "0.01")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["akl", "fkl", "jsd", "tvd"])
@pytest.mark.parametrize("tail", TAILS)
def test_fused_linear_with_a_sparse_teacher_is_the_loss_on_logits(rng, small_tiles, backend,
                                                                   kind, tail):
    """From hidden states (no N x V tensor at all) the same values and gradients as the loss on
    the student's logits, with ignored rows, a bias and a temperature; the cross-entropy too."""
    n, hidden, vocab = 29, 16, 300
    h = torch.randn(n, hidden, generator=rng).to(DEVICE).requires_grad_(True)
    w = (torch.randn(vocab, hidden, generator=rng) * 0.5).to(DEVICE).requires_grad_(True)
    b = torch.randn(vocab, generator=rng).to(DEVICE).requires_grad_(True)
    teacher = _with_padding(topk_teacher(logits(rng, (n, vocab)), 12, tail=tail), rng)
    labels = torch.randint(0, vocab, (n,), generator=rng).to(DEVICE)
    labels[3] = -100
    options = dict(divergence=kind, temperature=1.5, backend=backend, **DIVERGENCES[kind])
    for distill in (False, True):
        if distill:
            fused = akl_kernels.fused_linear_distillation_loss(
                h, w, labels, teacher_logits=teacher, student_bias=b, kd_ratio=0.4,
                chunk_size=8, **options)
            plain = akl_kernels.distillation_loss(h @ w.T + b, teacher, labels, kd_ratio=0.4,
                                                  **options)
        else:
            fused = akl_kernels.fused_linear_loss(h, w, labels, teacher_logits=teacher,
                                                  student_bias=b, chunk_size=8, **options)
            plain = akl_kernels.divergence_loss(h @ w.T + b, teacher, labels, **options)
        got = torch.autograd.grad(fused, (h, w, b))
        want = torch.autograd.grad(plain, (h, w, b))
        assert fused.item() == pytest.approx(plain.item(), rel=1e-5)
        for g, r in zip(got, want, strict=True):
            assert rel_err(g, r) < 1e-5


def test_fused_linear_modules_take_a_sparse_teacher(rng):
    h, w = torch.randn(6, 8, generator=rng), torch.randn(40, 8, generator=rng)
    teacher = topk_teacher(logits(rng, (6, 40)), 5)
    module = akl_kernels.FusedLinearAKLLoss(mu=0.3)
    want = akl_kernels.akl_loss(h @ w.T, teacher, mu=0.3)
    assert torch.allclose(module(h, w, teacher_logits=teacher), want, rtol=1e-5)
    with pytest.raises(ValueError, match="leading shape"):
        module(h[:5], w, teacher_logits=teacher)
