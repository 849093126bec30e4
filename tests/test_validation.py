"""Bad input gets a TypeError / ValueError naming the argument, before any work
(docs/contract.md §3).

Every public entry point is covered: the three loss functions, ``head_tail_stats`` and the
three ``torch.nn.Module`` wrappers (whose options are checked at construction). An autouse
fixture replaces the custom operator by a tripwire, so a check that only
fires *after* work has started (or never fires) fails here instead of passing by accident.
"""

import math

import pytest
import torch

import akl_kernels
from akl_kernels import losses as losses_module
from akl_kernels.backends import resolve_backend
from tests.conftest import DEVICE

V = 11
LEAD = (2, 3)


class _WorkStartedError(AssertionError):
    pass


def _tripwire(*args, **kwargs):
    raise _WorkStartedError("validation let bad input through to the backend")


@pytest.fixture(autouse=True)
def no_work(monkeypatch):
    """Any call that reaches the custom operator (and so a backend) fails the test."""
    monkeypatch.setattr(losses_module, "divergence_rows", _tripwire)


# Each entry point as f(student, teacher, labels=None, **options). For the modules the options
# go to the constructor (as a user would write them) and the tensors to the call.
def _fn(f):
    return lambda s, t, labels=None, **kw: f(s, t, labels, **kw)


def _stats(s, t, labels=None, **kw):
    assert labels is None, "head_tail_stats takes no labels"
    return akl_kernels.head_tail_stats(s, t, **kw)


def _module(cls):
    return lambda s, t, labels=None, **kw: cls(**kw)(s, t, labels)


LOSS_ENTRIES = {
    "fkl_loss": _fn(akl_kernels.fkl_loss),
    "rkl_loss": _fn(akl_kernels.rkl_loss),
    "akl_loss": _fn(akl_kernels.akl_loss),
    "FKLLoss": _module(akl_kernels.FKLLoss),
    "RKLLoss": _module(akl_kernels.RKLLoss),
    "AKLLoss": _module(akl_kernels.AKLLoss),
}
ALL_ENTRIES = {**LOSS_ENTRIES, "head_tail_stats": _stats}
# The entries that take AKL's split options (mu, include_crossing); the others refuse them.
SPLIT_ENTRIES = ("akl_loss", "AKLLoss", "head_tail_stats")
MODULES = [akl_kernels.FKLLoss, akl_kernels.RKLLoss, akl_kernels.AKLLoss]

all_entries = pytest.mark.parametrize("entry", sorted(ALL_ENTRIES))
loss_entries = pytest.mark.parametrize("entry", sorted(LOSS_ENTRIES))
split_entries = pytest.mark.parametrize("entry", SPLIT_ENTRIES)


def _pair(rng, lead=LEAD, v=V, dtype=torch.float32):
    s = torch.randn(*lead, v, generator=rng).to(dtype).to(DEVICE).requires_grad_(True)
    t = torch.randn(*lead, v, generator=rng).to(dtype).to(DEVICE)
    return s, t


def _labels(rng, lead=LEAD):
    lab = torch.randint(0, V, lead, generator=rng)
    lab.view(-1)[0] = -100
    return lab.to(DEVICE)


def _snapshot(*tensors):
    return [
        None
        if not isinstance(x, torch.Tensor)
        else (x, None if x.is_meta else x.detach().clone(), x.requires_grad, x.grad, x.dtype)
        for x in tensors
    ]


def _assert_unchanged(snapshot):
    for item in snapshot:
        if item is None:
            continue
        x, values, requires_grad, grad, dtype = item
        assert x.requires_grad == requires_grad
        assert x.grad is grad
        assert x.dtype == dtype
        if values is not None:
            assert torch.equal(x.detach(), values), "an input was modified on error"


def _expect(error, match, call, *inputs):
    """``call()`` raises ``error`` whose message matches ``match``; ``inputs`` are untouched."""
    snap = _snapshot(*inputs)
    with pytest.raises(error, match=match):
        call()
    _assert_unchanged(snap)


def test_tripwire_is_armed(rng):
    # Valid input reaches the backend, so every error below really comes from validation.
    s, t = _pair(rng)
    for f in ALL_ENTRIES.values():
        with pytest.raises(_WorkStartedError):
            f(s, t)


# ---------------------------------------------------------------- logits


@all_entries
@pytest.mark.parametrize("bad", [None, 1.5, [[0.1, 0.2]], "logits"])
@pytest.mark.parametrize("which", ["student_logits", "teacher_logits"])
def test_non_tensor_logits(rng, entry, bad, which):
    s, t = _pair(rng)
    args = (bad, t) if which == "student_logits" else (s, bad)
    _expect(TypeError, which, lambda: ALL_ENTRIES[entry](*args), s, t)


@all_entries
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.uint8])
@pytest.mark.parametrize("which", ["student_logits", "teacher_logits"])
def test_integer_dtype_logits(rng, entry, dtype, which):
    s, t = _pair(rng)
    bad = torch.zeros(*LEAD, V, dtype=dtype, device=DEVICE)
    args = (bad, t) if which == "student_logits" else (s, bad)
    _expect(TypeError, which, lambda: ALL_ENTRIES[entry](*args), s, t, bad)


@all_entries
@pytest.mark.parametrize("which", ["student_logits", "teacher_logits"])
def test_scalar_logits(rng, entry, which):
    s, t = _pair(rng, lead=())
    bad = torch.tensor(1.0, device=DEVICE)
    args = (bad, t) if which == "student_logits" else (s, bad)
    _expect(ValueError, which, lambda: ALL_ENTRIES[entry](*args), s, t, bad)


@all_entries
@pytest.mark.parametrize("which", ["student_logits", "teacher_logits"])
def test_empty_vocabulary(rng, entry, which):
    s, t = _pair(rng)
    bad = torch.zeros(*LEAD, 0, device=DEVICE)
    args = (bad, t) if which == "student_logits" else (s, bad)
    _expect(ValueError, which, lambda: ALL_ENTRIES[entry](*args), s, t, bad)


@all_entries
def test_vocabulary_mismatch(rng, entry):
    s, _ = _pair(rng)
    t = torch.randn(*LEAD, V + 1, generator=rng).to(DEVICE)
    _expect(ValueError, r"teacher_logits.*\bV\b", lambda: ALL_ENTRIES[entry](s, t), s, t)
    _expect(ValueError, r"student_logits", lambda: ALL_ENTRIES[entry](s, t), s, t)


@all_entries
@pytest.mark.parametrize("teacher_lead", [(3, 2), (6,), (2, 3, 1), (1, 3)])
def test_leading_shape_mismatch(rng, entry, teacher_lead):
    s, _ = _pair(rng)
    t = torch.randn(*teacher_lead, V, generator=rng).to(DEVICE)
    _expect(ValueError, "teacher_logits", lambda: ALL_ENTRIES[entry](s, t), s, t)


@all_entries
def test_devices_differ(rng, entry):
    s, _ = _pair(rng)
    t = torch.empty(*LEAD, V, device="meta")
    _expect(ValueError, "device", lambda: ALL_ENTRIES[entry](s, t), s, t)
    # And the other way round: a student on another device than a real teacher.
    s_meta = torch.empty(*LEAD, V, device="meta", requires_grad=True)
    t_real = torch.randn(*LEAD, V, generator=rng).to(DEVICE)
    _expect(ValueError, "device", lambda: ALL_ENTRIES[entry](s_meta, t_real), s_meta, t_real)


@loss_entries
def test_teacher_requiring_grad(rng, entry):
    s, t = _pair(rng)
    t.requires_grad_(True)
    assert torch.is_grad_enabled()
    _expect(ValueError, "teacher_logits", lambda: LOSS_ENTRIES[entry](s, t), s, t)


@pytest.mark.parametrize("entry", ["akl_loss", "fkl_loss", "head_tail_stats"])
def test_teacher_requiring_grad_is_fine_without_grad_mode(rng, entry):
    # Under no_grad nothing is differentiated, so the check must not fire: the call reaches the
    # backend (the tripwire) instead of a ValueError.
    s, t = _pair(rng)
    t.requires_grad_(True)
    with torch.no_grad(), pytest.raises(_WorkStartedError):
        ALL_ENTRIES[entry](s, t)


# ---------------------------------------------------------------- options

BAD_TEMPERATURES = [
    (0.0, ValueError),
    (-1.0, ValueError),
    (-0.0, ValueError),
    (float("nan"), ValueError),
    (float("inf"), ValueError),
    (float("-inf"), ValueError),
    (True, TypeError),
    (False, TypeError),
    ("1.0", TypeError),
    (None, TypeError),
]


@all_entries
@pytest.mark.parametrize("temperature,error", BAD_TEMPERATURES, ids=repr)
def test_bad_temperature(rng, entry, temperature, error):
    s, t = _pair(rng)
    call = lambda: ALL_ENTRIES[entry](s, t, temperature=temperature)  # noqa: E731
    _expect(error, "temperature", call, s, t)


BAD_MUS = [
    (0.0, ValueError),
    (-0.25, ValueError),
    (1.0 + 1e-9, ValueError),
    (1.5, ValueError),
    (float("nan"), ValueError),
    (float("inf"), ValueError),
    (True, TypeError),
    ("0.5", TypeError),
    (None, TypeError),
]


@split_entries
@pytest.mark.parametrize("mu,error", BAD_MUS, ids=repr)
def test_bad_mu(rng, entry, mu, error):
    s, t = _pair(rng)
    _expect(error, "mu", lambda: ALL_ENTRIES[entry](s, t, mu=mu), s, t)


@split_entries
@pytest.mark.parametrize("value", [1, 0, "yes", None, 1.0, torch.tensor(True)], ids=repr)
def test_include_crossing_not_a_bool(rng, entry, value):
    s, t = _pair(rng)
    call = lambda: ALL_ENTRIES[entry](s, t, include_crossing=value)  # noqa: E731
    _expect(TypeError, "include_crossing", call, s, t)


@pytest.mark.parametrize("entry", sorted(set(LOSS_ENTRIES) - set(SPLIT_ENTRIES)))
@pytest.mark.parametrize("option", [dict(mu=0.5), dict(include_crossing=True), dict(param=0.3),
                                    dict(beta=0.5), dict(lam=0.1)], ids=repr)
def test_options_of_other_divergences_are_refused(rng, entry, option):
    # An option the divergence does not take is an error, not silently ignored.
    s, t = _pair(rng)
    _expect(TypeError, next(iter(option)), lambda: LOSS_ENTRIES[entry](s, t, **option), s, t)


@loss_entries
@pytest.mark.parametrize("reduction", ["avg", "MEAN", "", None, "batchmean"], ids=repr)
def test_unknown_reduction(rng, entry, reduction):
    s, t = _pair(rng)
    call = lambda: LOSS_ENTRIES[entry](s, t, reduction=reduction)  # noqa: E731
    _expect(ValueError, "reduction", call, s, t)


@all_entries
@pytest.mark.parametrize("backend", ["cuda", "Torch", "", None, "triton "], ids=repr)
def test_unknown_backend(rng, entry, backend):
    s, t = _pair(rng)
    _expect(ValueError, "backend", lambda: ALL_ENTRIES[entry](s, t, backend=backend), s, t)


@all_entries
@pytest.mark.parametrize("which", ["student", "teacher", "both"])
def test_triton_backend_rejects_float64(rng, entry, which):
    s, t = _pair(rng)
    if which in ("student", "both"):
        s = s.detach().double().requires_grad_(True)
    if which in ("teacher", "both"):
        t = t.double()
    _expect(TypeError, "backend", lambda: ALL_ENTRIES[entry](s, t, backend="triton"), s, t)
    _expect(TypeError, "float64", lambda: ALL_ENTRIES[entry](s, t, backend="triton"), s, t)


# ---------------------------------------------------------------- labels


@loss_entries
@pytest.mark.parametrize("shape", [(3, 2), (6,), (2,), (2, 3, 1), (2, 3, V), ()], ids=str)
def test_labels_of_the_wrong_shape(rng, entry, shape):
    s, t = _pair(rng)
    labels = torch.zeros(shape, dtype=torch.long, device=DEVICE)
    call = lambda: LOSS_ENTRIES[entry](s, t, labels)  # noqa: E731
    _expect(ValueError, "labels", call, s, t, labels)


@loss_entries
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.bool])
def test_non_integer_labels(rng, entry, dtype):
    s, t = _pair(rng)
    labels = torch.zeros(LEAD, dtype=dtype, device=DEVICE)
    call = lambda: LOSS_ENTRIES[entry](s, t, labels)  # noqa: E731
    _expect(TypeError, "labels", call, s, t, labels)


@loss_entries
def test_labels_not_a_tensor(rng, entry):
    s, t = _pair(rng)
    call = lambda: LOSS_ENTRIES[entry](s, t, [[0, 1, 2], [3, 4, 5]])  # noqa: E731
    _expect(TypeError, "labels", call, s, t)


@loss_entries
def test_labels_on_another_device(rng, entry):
    s, t = _pair(rng)
    labels = torch.zeros(LEAD, dtype=torch.long, device="meta")
    call = lambda: LOSS_ENTRIES[entry](s, t, labels)  # noqa: E731
    _expect(ValueError, "labels", call, s, t, labels)


@loss_entries
@pytest.mark.parametrize("ignore_index", [True, -100.0, "x"], ids=repr)
def test_bad_ignore_index(rng, entry, ignore_index):
    s, t = _pair(rng)
    labels = _labels(rng)
    call = lambda: LOSS_ENTRIES[entry](s, t, labels, ignore_index=ignore_index)  # noqa: E731
    _expect(TypeError, "ignore_index", call, s, t, labels)


# ---------------------------------------------------------------- modules


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    "options,error,name",
    [
        (dict(mu=0.0), ValueError, "mu"),
        (dict(mu=1.25), ValueError, "mu"),
        (dict(mu=float("nan")), ValueError, "mu"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(temperature=-2.0), ValueError, "temperature"),
        (dict(temperature=float("nan")), ValueError, "temperature"),
        (dict(temperature=float("inf")), ValueError, "temperature"),
        (dict(temperature=True), TypeError, "temperature"),
        (dict(include_crossing=1), TypeError, "include_crossing"),
        (dict(reduction="avg"), ValueError, "reduction"),
        (dict(backend="cuda"), ValueError, "backend"),
    ],
    ids=repr,
)
def test_module_constructor_checks(cls, options, error, name):
    # No tensors at all: the module must refuse at construction, not at the first step.
    split = {"mu", "include_crossing"} & set(options)
    if split and cls is not akl_kernels.AKLLoss:
        error = TypeError  # only AKL takes the split's options
    with pytest.raises(error, match=name):
        cls(**options)


@pytest.mark.parametrize("cls", MODULES, ids=lambda c: c.__name__)
def test_module_call_checks(rng, cls):
    loss = cls(**(dict(mu=0.4) if cls is akl_kernels.AKLLoss else {}), temperature=2.0)
    s, t = _pair(rng)
    _expect(ValueError, "teacher_logits", lambda: loss(s, t[..., :-1]), s, t)
    _expect(ValueError, "labels", lambda: loss(s, t, torch.zeros(6, dtype=torch.long)), s, t)
    _expect(TypeError, "student_logits", lambda: loss(s.detach().long(), t), s, t)
    t.requires_grad_(True)
    _expect(ValueError, "teacher_logits", lambda: loss(s, t), s, t)


# ---------------------------------------------------------------- nothing modified on error


@loss_entries
def test_nothing_modified_on_error(rng, entry):
    # Non-contiguous, low-precision and labelled inputs, one bad option at a time.
    base = torch.randn(*LEAD, V + 5, generator=rng).to(torch.bfloat16).to(DEVICE)
    s = base[..., :V].requires_grad_(True)  # a strided view, as with logits[..., :V]
    assert not s.is_contiguous()
    t = torch.randn(*LEAD, V, generator=rng).to(torch.float16).to(DEVICE)
    labels = _labels(rng)
    for bad, refusal, name in [
        (dict(mu=2.0), ValueError, "mu"),
        (dict(temperature=-1.0), ValueError, "temperature"),
        (dict(reduction="max"), ValueError, "reduction"),
        (dict(backend="gpu"), ValueError, "backend"),
        (dict(include_crossing="no"), TypeError, "include_crossing"),
    ]:
        error = refusal
        if name in ("mu", "include_crossing") and entry not in SPLIT_ENTRIES:
            error = TypeError  # an option this divergence does not take
        call = lambda bad=bad: LOSS_ENTRIES[entry](s, t, labels, **bad)  # noqa: E731
        _expect(error, name, call, s, t, labels, base)
    assert not t.requires_grad and s.requires_grad and s.grad is None
    assert s.dtype == torch.bfloat16 and t.dtype == torch.float16


# ---------------------------------------------------------------- backend resolution


@pytest.mark.parametrize("value", ["0", ""])
def test_triton_on_cpu_without_interpreter(rng, monkeypatch, value):
    monkeypatch.setenv("TRITON_INTERPRET", value)
    s = torch.randn(3, V, generator=rng)
    t = torch.randn(3, V, generator=rng)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        resolve_backend("triton", s, t)
    # The public functions read the variable at call time too, and modify nothing.
    s.requires_grad_(True)
    _expect(ValueError, "TRITON_INTERPRET", lambda: akl_kernels.akl_loss(s, t, backend="triton"),
            s, t)
    _expect(ValueError, "TRITON_INTERPRET",
            lambda: akl_kernels.head_tail_stats(s, t, backend="triton"), s, t)
    # 'auto' and 'torch' need no interpreter on CPU.
    assert resolve_backend("auto", s, t) == "torch"
    assert resolve_backend("torch", s, t) == "torch"


def test_triton_on_cpu_with_interpreter(rng, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    s = torch.randn(3, V, generator=rng)
    t = torch.randn(3, V, generator=rng)
    assert resolve_backend("triton", s, t) == "triton"
    assert resolve_backend("auto", s.double(), t.double()) == "torch"
    with pytest.raises(TypeError, match="float64"):
        resolve_backend("triton", s, t.double())


def test_infinite_options_are_refused(rng):
    s, t = _pair(rng)
    _expect(ValueError, "temperature", lambda: akl_kernels.akl_loss(s, t, temperature=math.inf),
            s, t)
    _expect(ValueError, "mu", lambda: akl_kernels.akl_loss(s, t, mu=-math.inf), s, t)


# ---------------------------------------------------------------- options that failed late


@pytest.mark.parametrize("make,error,name", [
    (lambda: akl_kernels.AKLLoss(ignore_index="x"), TypeError, "ignore_index"),
    (lambda: akl_kernels.FKLLoss(ignore_index=2**70), ValueError, "ignore_index"),
    (lambda: akl_kernels.FusedLinearLoss(ignore_index=None), TypeError, "ignore_index"),
    (lambda: akl_kernels.FusedLinearAKLLoss(check_values="no"), TypeError, "check_values"),
    (lambda: akl_kernels.DistillationLoss(backend="x"), ValueError, "backend"),
    (lambda: akl_kernels.DistillationLoss(return_parts="yes"), TypeError, "return_parts"),
    (lambda: akl_kernels.DistillationLoss(kd_ratio=1.5), ValueError, "kd_ratio"),
    (lambda: akl_kernels.DistillationLoss(["akl"]), TypeError, "divergence"),
    (lambda: akl_kernels.DivergenceLoss("kl"), ValueError, "divergence"),
    (lambda: akl_kernels.FusedLinearDistillationLoss(kd_ratio=-0.1), ValueError, "kd_ratio"),
], ids=["AKLLoss-ignore_index", "FKLLoss-ignore_index", "FusedLinearLoss-ignore_index",
        "FusedLinearAKLLoss-check_values", "DistillationLoss-backend",
        "DistillationLoss-return_parts", "DistillationLoss-kd_ratio", "DistillationLoss-divergence",
        "DivergenceLoss-divergence", "FusedLinearDistillationLoss-kd_ratio"])
def test_modules_refuse_bad_options_at_construction(make, error, name):
    with pytest.raises(error, match=name):
        make()


def test_bad_options_without_labels_or_of_the_wrong_type(rng):
    s, t = _pair(rng)
    labels = _labels(rng)
    _expect(TypeError, "ignore_index",
            lambda: akl_kernels.akl_loss(s, t, None, ignore_index="x"), s, t)
    _expect(ValueError, "ignore_index",
            lambda: akl_kernels.akl_loss(s, t, labels, ignore_index=2**70), s, t, labels)
    _expect(TypeError, "return_parts",
            lambda: akl_kernels.distillation_loss(s, t, labels, return_parts="yes"), s, t, labels)
    _expect(TypeError, "check_values",
            lambda: akl_kernels.fkl_loss(s, t, check_values=1), s, t)
    _expect(TypeError, "divergence",
            lambda: akl_kernels.distillation_loss(s, t, labels, divergence=["akl"]), s, t, labels)
    _expect(TypeError, "divergence",
            lambda: akl_kernels.divergence_loss(s, t, divergence=None), s, t)


@pytest.mark.parametrize("which", ["student_logits", "teacher_logits"])
def test_sparse_and_meta_tensors_are_refused(rng, which):
    s, t = _pair(rng)
    for bad, error, what in [(t.detach().to_sparse(), TypeError, "dense"),
                             (torch.empty(t.shape, device="meta"), ValueError, "meta")]:
        args = (bad, t) if which == "student_logits" else (s, bad)
        with pytest.raises(error, match=rf"{which}.*{what}"):
            akl_kernels.akl_loss(*args)
    h = torch.randn(4, 3, generator=rng).to_sparse()
    with pytest.raises(TypeError, match=r"student_hidden.*dense"):
        akl_kernels.fused_linear_loss(h, torch.randn(5, 3), teacher_logits=torch.randn(4, 5))


@pytest.mark.parametrize("variable", ["AKL_TORCH_WORKING_SET_MB", "AKL_FUSED_LINEAR_BUDGET_MB"])
@pytest.mark.parametrize("value", ["abc", "-5", "0", "nan"])
def test_a_bad_size_in_the_environment_names_the_variable(rng, monkeypatch, variable, value):
    monkeypatch.undo()  # the real operators: the variable is read where the work starts
    monkeypatch.setenv(variable, value)
    s, t = _pair(rng)
    h, w = torch.randn(*LEAD, 4, generator=rng), torch.randn(V, 4, generator=rng)
    if variable == "AKL_TORCH_WORKING_SET_MB":
        call = lambda: akl_kernels.akl_loss(s, t, backend="torch")  # noqa: E731
    else:
        call = lambda: akl_kernels.fused_linear_loss(h, w, teacher_logits=t,  # noqa: E731
                                                     backend="torch")
    with pytest.raises(ValueError, match=variable):
        call()
