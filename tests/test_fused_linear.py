"""Fused linear losses against the float64 reference of the materialised logits."""

from __future__ import annotations

import math

import pytest
import torch

import akl_kernels
import reference
from akl_kernels import fused_linear_sweeps as fused_linear
from akl_kernels.config import DIVERGENCES
from tests.conftest import BACKENDS, DEVICE, HAS_CUDA
from tests.helpers import rel_err, without_tvd_kinks

# Each divergence's keyword options and the reference's param for them.
OPTIONS = {"akl": dict(mu=0.4), "jsd": dict(beta=0.3), "skew_fkl": dict(lam=0.2),
           "skew_rkl": dict(lam=0.2), "mixed_kl": dict(lam=0.3), "fkl": {}, "rkl": {},
           "tvd": {}}


def _reference_options(kind):
    options = dict(OPTIONS[kind])
    for name in ("beta", "lam"):
        if name in options:
            options["param"] = options.pop(name)
    return options


def _heads(gen, n, hidden, vocab, dtype, *, teacher_hidden=None, bias=True, lead=None,
           device=DEVICE):
    """Student head (hidden, weight, bias) and teacher head (hidden, weight, bias): logits with
    standard deviations of about 2 (student) and 3 (teacher)."""
    teacher_hidden = teacher_hidden or hidden

    def normal(*shape, scale=1.0):
        x = torch.randn(*shape, generator=gen, dtype=torch.float64) * scale
        return x.to(dtype).to(device)

    lead = lead or (n,)
    student = [normal(*lead, hidden), normal(vocab, hidden, scale=2 / math.sqrt(hidden)),
               normal(vocab, scale=0.5) if bias else None]
    teacher = [normal(*lead, teacher_hidden),
               normal(vocab, teacher_hidden, scale=3 / math.sqrt(teacher_hidden)),
               normal(vocab, scale=0.5) if bias else None]
    return student, teacher


def _logits64(head):
    hidden, weight, bias = head
    out = hidden.double() @ weight.double().T
    return out if bias is None else out + bias.double()


def _labels(gen, lead, vocab, ignored_share=0.25, device=DEVICE):
    labels = torch.randint(0, vocab, lead, generator=gen)
    labels[torch.rand(lead, generator=gen) < ignored_share] = -100
    return labels.to(device)


def _teacher_kwargs(teacher, form, dtype):
    if form == "head":
        return dict(teacher_hidden=teacher[0], teacher_weight=teacher[1], teacher_bias=teacher[2])
    return dict(teacher_logits=_logits64(teacher).to(dtype))


def _reference(kind, student, teacher_logits, labels, grad_weights=None, **options):
    """Float64 loss and gradients for (hidden, weight, bias) by autograd through the logits."""
    leaves = [None if x is None else x.detach().double().cpu().requires_grad_(True)
              for x in student]
    loss = reference.reference_loss(kind, _logits64(leaves), teacher_logits.double().cpu(),
                                    None if labels is None else labels.cpu(), **options)
    target = loss if grad_weights is None else (loss * grad_weights.double().cpu()).sum()
    grads = torch.autograd.grad(target, [x for x in leaves if x is not None])
    return loss.detach(), grads


def _fused(fn, student, labels, grad_weights=None, **kwargs):
    leaves = [None if x is None else x.detach().clone().requires_grad_(True) for x in student]
    loss = fn(leaves[0], leaves[1], labels, student_bias=leaves[2], **kwargs)
    target = loss if grad_weights is None else (loss * grad_weights).sum()
    grads = torch.autograd.grad(target, [x for x in leaves if x is not None])
    return loss.detach(), grads


def _assert_close(loss, grads, ref_loss, ref_grads, dtype):
    assert loss.dtype == torch.float32
    assert torch.allclose(loss.double().cpu(), ref_loss, rtol=2e-5, atol=2e-6), (loss, ref_loss)
    tol = 1e-4 if dtype == torch.float32 else 1e-2
    for grad, ref in zip(grads, ref_grads, strict=True):
        assert grad.dtype == dtype
        assert rel_err(grad, ref) < tol


@pytest.fixture
def small_tiles(monkeypatch):
    """A budget so small that the backward sweep splits V = 203 into two vocabulary blocks."""
    monkeypatch.setenv("AKL_FUSED_LINEAR_BUDGET_MB", str(203 * 16 * 8 / 2**20))


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", ["head", "logits"])
@pytest.mark.parametrize("strategy", ["forward_gradient", "recompute"])
def test_matches_float64_reference(rng, small_tiles, kind, dtype, form, strategy):
    n, hidden, vocab = 37, 19, 203  # odd everything; teacher hidden size differs
    assert fused_linear.plan_tiles(n, vocab, torch.float32, None).vocab_block < vocab
    student, teacher = _heads(rng, n, hidden, vocab, dtype, teacher_hidden=11)
    labels = _labels(rng, (n,), vocab)
    kwargs = _teacher_kwargs(teacher, form, dtype)
    ref_teacher = _logits64(teacher).to(dtype) if form == "logits" else _logits64(teacher)
    if kind == "tvd":
        labels = without_tvd_kinks(labels, _logits64(student), ref_teacher, temperature=1.5)
    loss, grads = _fused(akl_kernels.fused_linear_loss, student, labels, divergence=kind,
                         temperature=1.5, backend="torch", strategy=strategy, **OPTIONS[kind],
                         **kwargs)
    ref_loss, ref_grads = _reference(kind, student, ref_teacher, labels, temperature=1.5,
                                     **_reference_options(kind))
    _assert_close(loss, grads, ref_loss, ref_grads, dtype)


def _sweeps_called(monkeypatch):
    """Which sweeps a call runs: names appended as they are called."""
    from akl_kernels import fused_linear_op

    called = []
    for name in ("forward_sweep", "forward_gradient_sweep", "backward_sweep"):
        original = getattr(fused_linear_op, name)

        def spy(*args, _original=original, _name=name, **kwargs):
            called.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(fused_linear_op, name, spy)
    return called


@pytest.mark.parametrize("teacher_form", ["head", "logits", "topk"])
def test_the_strategies_agree_under_any_incoming_gradient(rng, monkeypatch, teacher_form):
    """forward_gradient forms the gradients in forward for a unit coefficient and scales them
    by the incoming gradient in backward: the same gradients as recomputing, for a loss used
    as ``-2.5 * loss``, and again on a second backward through the same graph."""
    n, vocab = 31, 211
    student, teacher = _heads(rng, n, 17, vocab, torch.float32)
    labels = _labels(rng, (n,), vocab)
    kwargs = _teacher_kwargs(teacher, "head" if teacher_form == "head" else "logits",
                             torch.float32)
    if teacher_form == "topk":
        kwargs = dict(teacher_logits=akl_kernels.topk_teacher(kwargs["teacher_logits"], 6))
    called = _sweeps_called(monkeypatch)
    results = {}
    for strategy in ("forward_gradient", "recompute"):
        leaves = [x.detach().clone().requires_grad_(True) for x in student]
        loss = akl_kernels.fused_linear_distillation_loss(
            leaves[0], leaves[1], labels, student_bias=leaves[2], kd_ratio=0.7,
            divergence="akl", chunk_size=7, strategy=strategy, **kwargs)
        first = torch.autograd.grad(-2.5 * loss, leaves, retain_graph=True)
        second = torch.autograd.grad(-2.5 * loss, leaves)
        for a, b in zip(first, second, strict=True):
            assert torch.equal(a, b)
        results[strategy] = (loss.detach(), first)
    assert called == ["forward_gradient_sweep", "forward_sweep", "backward_sweep",
                      "backward_sweep"]
    (loss_f, grads_f), (loss_r, grads_r) = results["forward_gradient"], results["recompute"]
    # The strategies chunk the rows differently, and a GEMM's bits depend on its row count.
    assert torch.allclose(loss_f, loss_r, rtol=1e-6, atol=0)
    for a, b in zip(grads_f, grads_r, strict=True):
        assert rel_err(a, b) < 1e-6


def test_a_bf16_weight_gradient_accumulates_to_float32_accuracy(rng):
    """forward_gradient adds 58 row chunks' products into a compensated bf16 pair: the result
    is the float32-accumulated gradient (recompute's: one float32 GEMM over every row per
    vocabulary block) rounded once to bf16, up to ties, and as close to float64."""
    n, hidden, vocab = 400, 48, 1500
    student, teacher = _heads(rng, n, hidden, vocab, torch.float64, bias=False)

    def weight_grad(dtype, strategy):
        h, w = (x.detach().to(dtype).requires_grad_(True) for x in student[:2])
        loss = akl_kernels.fused_linear_fkl_loss(
            h, w, teacher_hidden=teacher[0].to(dtype), teacher_weight=teacher[1].to(dtype),
            reduction="sum", chunk_size=7, strategy=strategy, backend="torch")
        return torch.autograd.grad(loss, w)[0].double()

    exact = weight_grad(torch.float64, "recompute")
    compensated = weight_grad(torch.bfloat16, "forward_gradient")
    float32_sum = weight_grad(torch.bfloat16, "recompute")
    assert (compensated == float32_sum).double().mean() > 0.98
    assert rel_err(compensated, exact) <= 1.01 * rel_err(float32_sum, exact)


def test_auto_recomputes_per_row_gradients_and_forms_none_without_grad(rng, monkeypatch):
    student, teacher = _heads(rng, 9, 8, 50, torch.float32)
    labels = _labels(rng, (9,), 50)
    kwargs = _teacher_kwargs(teacher, "head", torch.float32)
    called = _sweeps_called(monkeypatch)
    h = student[0].clone().requires_grad_(True)
    rows = akl_kernels.fused_linear_fkl_loss(h, student[1], labels, reduction="none", **kwargs)
    rows.sum().backward()
    assert called == ["forward_sweep", "backward_sweep"]  # a gradient per row: recompute
    called.clear()
    with torch.no_grad():
        akl_kernels.fused_linear_fkl_loss(h, student[1], labels, **kwargs)
    akl_kernels.fused_linear_fkl_loss(h.detach(), student[1], labels, **kwargs)
    assert called == ["forward_sweep", "forward_sweep"]  # no gradient asked for: none formed
    called.clear()
    akl_kernels.fused_linear_fkl_loss(h, student[1], labels, **kwargs).backward()
    assert called == ["forward_gradient_sweep"]  # the default: nothing recomputed
    with pytest.raises(ValueError, match="strategy"):
        akl_kernels.fused_linear_fkl_loss(h, student[1], labels, strategy="fast", **kwargs)
    with pytest.raises(ValueError, match="strategy"):
        akl_kernels.FusedLinearAKLLoss(strategy=None)


@pytest.mark.parametrize("kind", ["fkl", "rkl", "akl"])
def test_matches_the_unfused_path(rng, kind):
    """Bit-for-bit inputs, float32: the fused loss equals logits-then-loss."""
    student, teacher = _heads(rng, 29, 24, 150, torch.float32)
    labels = _labels(rng, (29,), 150)
    kwargs = _teacher_kwargs(teacher, "head", torch.float32)
    loss, grads = _fused(akl_kernels.fused_linear_loss, student, labels, divergence=kind,
                         backend="torch", **kwargs)
    leaves = [x.detach().clone().requires_grad_(True) for x in student]
    with torch.no_grad():
        teacher_logits = teacher[0] @ teacher[1].T + teacher[2]
    unfused = akl_kernels.divergence_loss(
        leaves[0] @ leaves[1].T + leaves[2], teacher_logits, labels, divergence=kind,
        backend="torch")
    unfused_grads = torch.autograd.grad(unfused, leaves)
    assert torch.allclose(loss, unfused, rtol=1e-5, atol=1e-6)
    for grad, ref in zip(grads, unfused_grads, strict=True):
        assert rel_err(grad, ref) < 1e-5


@pytest.mark.parametrize("chunk_size", [1, 5, 10_000])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_chunk_sizes_and_reductions(rng, chunk_size, reduction):
    n, vocab = 23, 97
    student, teacher = _heads(rng, n, 13, vocab, torch.float32)
    labels = _labels(rng, (n,), vocab)
    weights = torch.randn(n, generator=rng).to(DEVICE) if reduction == "none" else None
    kwargs = _teacher_kwargs(teacher, "head", torch.float32)
    loss, grads = _fused(akl_kernels.fused_linear_akl_loss, student, labels, weights,
                         chunk_size=chunk_size, reduction=reduction, backend="torch", **kwargs)
    ref_loss, ref_grads = _reference("akl", student, _logits64(teacher), labels, weights,
                                     reduction=reduction)
    _assert_close(loss, grads, ref_loss, ref_grads, torch.float32)


def test_ignored_rows_get_exactly_zero_and_cost_no_gemm(rng):
    student, teacher = _heads(rng, 12, 8, 64, torch.float32, bias=False)
    labels = _labels(rng, (12,), 64, ignored_share=0.5)
    labels[0], labels[1] = -100, 3
    h = student[0].clone().requires_grad_(True)
    seen_rows = []
    original = fused_linear.matmul_wide

    def spy(a, b, dtype, out=None):
        seen_rows.append(a.shape[0])
        return original(a, b, dtype, out)

    fused_linear.matmul_wide = spy
    try:
        loss = akl_kernels.fused_linear_fkl_loss(
            h, student[1], labels, reduction="none", backend="torch",
            **_teacher_kwargs(teacher, "head", torch.float32))
        loss.sum().backward()
    finally:
        fused_linear.matmul_wide = original
    ignored = (labels == -100).cpu()
    assert (loss.detach().cpu()[ignored] == 0).all() and (loss.detach().cpu()[~ignored] > 0).all()
    assert (h.grad.cpu()[ignored] == 0).all()
    assert max(seen_rows) == int((~ignored).sum())  # the GEMMs only ever saw valid rows


def test_all_rows_ignored(rng):
    student, teacher = _heads(rng, 6, 8, 40, torch.float32)
    labels = torch.full((6,), -100, device=DEVICE)
    loss, grads = _fused(akl_kernels.fused_linear_akl_loss, student, labels, backend="torch",
                         **_teacher_kwargs(teacher, "head", torch.float32))
    assert loss.item() == 0.0
    assert all(grad.abs().max() == 0 for grad in grads)


def test_leading_shape_and_no_bias(rng):
    lead = (3, 5)
    student, teacher = _heads(rng, 0, 16, 70, torch.float32, bias=False, lead=lead)
    labels = _labels(rng, lead, 70)
    weights = torch.randn(lead, generator=rng).to(DEVICE)
    loss, grads = _fused(akl_kernels.fused_linear_rkl_loss, student, labels, weights,
                         reduction="none", backend="torch",
                         **_teacher_kwargs(teacher, "logits", torch.float32))
    assert loss.shape == lead
    ref_loss, ref_grads = _reference("rkl", student, _logits64(teacher).float(), labels,
                                     weights, reduction="none")
    _assert_close(loss, grads, ref_loss, ref_grads, torch.float32)


@pytest.mark.parametrize("divergence", ["akl", "jsd"])
def test_distillation_matches_the_reference(rng, small_tiles, divergence):
    n, vocab = 31, 203
    student, teacher = _heads(rng, n, 12, vocab, torch.float32)
    labels = _labels(rng, (n,), vocab)
    leaves = [x.detach().clone().requires_grad_(True) for x in student]
    out = akl_kernels.fused_linear_distillation_loss(
        leaves[0], leaves[1], labels, student_bias=leaves[2], divergence=divergence,
        kd_ratio=0.3, temperature=2.0, return_parts=True, backend="torch",
        **OPTIONS[divergence], **_teacher_kwargs(teacher, "head", torch.float32))
    grads = torch.autograd.grad(out.loss, leaves)
    ref_leaves = [x.detach().double().cpu().requires_grad_(True) for x in student]
    ref = reference.reference_distillation_loss(
        _logits64(ref_leaves), _logits64(teacher).cpu(), labels.cpu(), divergence=divergence,
        kd_ratio=0.3, temperature=2.0, **_reference_options(divergence))
    ref_grads = torch.autograd.grad(ref[0], ref_leaves)
    _assert_close(out.loss, grads, ref[0].detach(), ref_grads, torch.float32)
    assert torch.allclose(out.cross_entropy.double().cpu(), ref[1], rtol=2e-5)
    assert torch.allclose(out.divergence.double().cpu(), ref[2], rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["akl", "jsd", "fkl"])
def test_backends(rng, small_tiles, backend, kind):
    """The Triton kernels (the CPU interpreter without CUDA) behind the same sweeps."""
    n, vocab = 6, 203
    student, teacher = _heads(rng, n, 8, vocab, torch.float32)
    labels = _labels(rng, (n,), vocab)
    loss, grads = _fused(akl_kernels.fused_linear_loss, student, labels, divergence=kind,
                         backend=backend, **OPTIONS[kind],
                         **_teacher_kwargs(teacher, "head", torch.float32))
    ref_loss, ref_grads = _reference(kind, student, _logits64(teacher), labels,
                                     **_reference_options(kind))
    _assert_close(loss, grads, ref_loss, ref_grads, torch.float32)


def test_autocast_does_not_lower_the_logits_precision(rng):
    """Under torch.autocast the loss still runs its GEMMs in the inputs' dtype (float32 here):
    values and gradients equal those without autocast."""
    student, teacher = _heads(rng, 16, 32, 100, torch.float32)
    kwargs = dict(backend="torch", **_teacher_kwargs(teacher, "head", torch.float32))
    plain = _fused(akl_kernels.fused_linear_akl_loss, student, None, **kwargs)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        autocast = _fused(akl_kernels.fused_linear_akl_loss, student, None, **kwargs)
    assert torch.equal(plain[0], autocast[0])
    for a, b in zip(plain[1], autocast[1], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_logits_with_any_strides(rng, backend):
    """A transposed (column-major) teacher_logits gives the same loss and gradients."""
    student, teacher = _heads(rng, 7, 8, 150, torch.float32)
    logits = _logits64(teacher).float()
    transposed = logits.T.contiguous().T  # same values, last-dimension stride 7
    assert transposed.stride(-1) != 1
    results = [_fused(akl_kernels.fused_linear_akl_loss, student, None, backend=backend,
                      teacher_logits=t) for t in (logits, transposed)]
    assert torch.equal(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1], strict=True):
        assert torch.equal(a, b)


def test_zero_rows(rng):
    student, teacher = _heads(rng, 0, 8, 30, torch.float32)
    for kwargs in (_teacher_kwargs(teacher, "head", torch.float32),
                   _teacher_kwargs(teacher, "logits", torch.float32)):
        loss, grads = _fused(akl_kernels.fused_linear_fkl_loss, student, None, backend="torch",
                             **kwargs)
        assert loss.item() == 0.0 and grads[0].shape == (0, 8)
        assert all(g.abs().sum() == 0 for g in grads)


def test_teacher_tensors_are_released_after_backward(rng):
    """The autograd Function keeps no teacher tensor beyond backward, even while the loss
    (e.g. for logging) is still referenced."""
    import weakref

    student, teacher = _heads(rng, 6, 8, 40, torch.float32)
    teacher_logits = _logits64(teacher).float()
    alive = weakref.ref(teacher_logits)
    h = student[0].clone().requires_grad_(True)
    loss = akl_kernels.fused_linear_akl_loss(h, student[1], teacher_logits=teacher_logits,
                                             backend="torch")
    del teacher_logits
    assert alive() is not None  # saved for backward
    loss.backward()
    assert alive() is None and loss.item() > 0


def test_gradcheck_float64(rng):
    student, teacher = _heads(rng, 4, 5, 17, torch.float64, device="cpu")
    leaves = [x.clone().requires_grad_(True) for x in student]
    kwargs = _teacher_kwargs(teacher, "head", torch.float64)
    assert torch.autograd.gradcheck(
        lambda h, w, b: akl_kernels.fused_linear_loss(h, w, divergence="jsd", student_bias=b,
                                                      backend="torch", chunk_size=3, **kwargs),
        leaves)


def test_plan_respects_the_budget():
    budget = fused_linear.budget_bytes()
    for n, vocab in [(8192, 128256), (4096, 32000), (1, 262144), (100_000, 32000)]:
        tiles = fused_linear.plan_tiles(n, vocab, torch.float32, None)
        assert tiles.forward_rows * vocab * 4 * 2 <= max(budget, vocab * 8)
        assert tiles.backward_rows * tiles.vocab_block * 4 * 3 <= max(budget, 128 * 12)
        assert tiles.vocab_block % 128 == 0 or tiles.vocab_block == vocab
        # forward_gradient: three tiles per row, or two (and room beside them) in place
        assert tiles.gradient_rows * vocab * 4 * 3 <= max(budget, vocab * 12)
        assert tiles.in_place_rows * vocab * 4 * 2.5 <= max(budget, vocab * 10)
    expected = fused_linear.Tiling(10, 10, 10, 10, 1000, torch.float32)
    assert fused_linear.plan_tiles(10, 1000, torch.float32, 10_000) == expected


def test_modules(rng):
    student, teacher = _heads(rng, 9, 8, 50, torch.float32)
    labels = _labels(rng, (9,), 50)
    kwargs = _teacher_kwargs(teacher, "head", torch.float32)
    module = akl_kernels.FusedLinearAKLLoss(mu=0.3, reduction="sum", backend="torch")
    assert "mu=0.3" in repr(module)
    expected = akl_kernels.fused_linear_akl_loss(student[0], student[1], labels, mu=0.3,
                                                 reduction="sum", backend="torch",
                                                 student_bias=student[2], **kwargs)
    assert torch.equal(module(student[0], student[1], labels, student_bias=student[2], **kwargs),
                       expected)
    distill = akl_kernels.FusedLinearDistillationLoss("jsd", beta=0.2, kd_ratio=0.4,
                                                      return_parts=True, backend="torch")
    out = distill(student[0], student[1], labels, **kwargs)
    assert torch.allclose(out.loss, 0.6 * out.cross_entropy + 0.4 * out.divergence)
    with pytest.raises(TypeError, match="beta"):
        akl_kernels.FusedLinearLoss("fkl", beta=0.3)
    with pytest.raises(ValueError, match="chunk_size"):
        akl_kernels.FusedLinearFKLLoss(chunk_size=0)


def test_bad_arguments_name_themselves(rng):
    student, teacher = _heads(rng, 4, 6, 20, torch.float32)
    h, w, b = student
    th, tw, tb = teacher
    call = akl_kernels.fused_linear_akl_loss
    cases = [
        (ValueError, "exactly one", dict()),
        (ValueError, "exactly one", dict(teacher_hidden=th, teacher_weight=tw,
                                         teacher_logits=torch.zeros(4, 20))),
        (ValueError, "go together", dict(teacher_hidden=th)),
        (ValueError, "teacher_weight must have shape", dict(teacher_hidden=th,
                                                             teacher_weight=tw[:, :3])),
        (ValueError, "V = 20", dict(teacher_hidden=th, teacher_weight=tw[:7])),
        (ValueError, "teacher_logits must have shape", dict(teacher_logits=torch.zeros(4, 21))),
        (ValueError, "teacher_bias goes with", dict(teacher_logits=torch.zeros(4, 20),
                                                    teacher_bias=tb)),
        (ValueError, "teacher_weight requires grad",
         dict(teacher_hidden=th, teacher_weight=tw.clone().requires_grad_(True))),
        (ValueError, "teacher_bias requires grad",
         dict(teacher_hidden=th, teacher_weight=tw, teacher_bias=tb.clone().requires_grad_())),
        (ValueError, "teacher_hidden requires grad",
         dict(teacher_hidden=th.clone().requires_grad_(True), teacher_weight=tw)),
        (ValueError, "student_bias must have shape", dict(teacher_logits=torch.zeros(4, 20),
                                                          student_bias=b[:5])),
        (TypeError, "chunk_size", dict(teacher_logits=torch.zeros(4, 20), chunk_size=2.0)),
        (ValueError, "chunk_size", dict(teacher_logits=torch.zeros(4, 20), chunk_size=0)),
        (ValueError, "reduction", dict(teacher_logits=torch.zeros(4, 20), reduction="avg")),
        (ValueError, "mu", dict(teacher_logits=torch.zeros(4, 20), mu=0.0)),
    ]
    for error, message, kwargs in cases:
        if "teacher_logits" in kwargs:
            kwargs["teacher_logits"] = kwargs["teacher_logits"].to(DEVICE)
        with pytest.raises(error, match=message):
            call(h, w, **kwargs)
    with pytest.raises(ValueError, match="student_weight must have shape"):
        call(h, w[:, :5], teacher_hidden=th, teacher_weight=tw)
    with pytest.raises(TypeError, match="student_weight must have the dtype"):
        call(h, w.double(), teacher_hidden=th, teacher_weight=tw)
    with pytest.raises(ValueError, match="labels"):
        call(h, w, torch.zeros(5, dtype=torch.long, device=DEVICE), teacher_hidden=th,
             teacher_weight=tw)
    with pytest.raises(ValueError, match="labels must lie"):
        akl_kernels.fused_linear_distillation_loss(
            h, w, torch.full((4,), 20, device=DEVICE), teacher_hidden=th, teacher_weight=tw)
    with pytest.raises(ValueError, match="labels are required"):
        akl_kernels.fused_linear_distillation_loss(h, w, None, teacher_hidden=th,
                                                   teacher_weight=tw)


@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("kind", ["fkl", "akl", "jsd"])
def test_cuda_real_size_bf16(kind):
    """bf16 heads at a real vocabulary: float32 logits (no bf16 rounding) give gradients within
    bf16 rounding of the float64 truth, and the extra memory stays far below the logits'."""
    gen = torch.Generator().manual_seed(0)
    n, hidden, vocab = 2048, 1024, 128256
    student, teacher = _heads(gen, n, hidden, vocab, torch.bfloat16, device="cuda")
    kwargs = _teacher_kwargs(teacher, "head", torch.bfloat16)
    leaves = [x.detach().clone().requires_grad_(True) for x in student]
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = akl_kernels.fused_linear_loss(leaves[0], leaves[1], divergence=kind,
                                         student_bias=leaves[2], **OPTIONS[kind], **kwargs)
    loss.backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    grads = [x.grad for x in leaves]
    # float64 truth on the GPU, a block of rows at a time is not needed at this size
    ref_leaves = [x.detach().double().requires_grad_(True) for x in student]
    ref = reference.reference_loss(kind, _logits64(ref_leaves), _logits64(teacher),
                                   **_reference_options(kind))
    ref_grads = torch.autograd.grad(ref, ref_leaves)
    assert abs(loss.item() - ref.item()) <= 1e-4 * abs(ref.item()) + 1e-5
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert rel_err(grad, ref_grad) < 1e-2
    one_logits_tensor = n * vocab * 2
    gradients = sum(x.numel() * x.element_size() for x in leaves)
    assert peak - gradients < 0.7 * one_logits_tensor + fused_linear.budget_bytes() * 1.5
