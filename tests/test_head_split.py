"""The exact head split in a bounded number of reads (docs/contract.md §2.4, §4.4).

Both backends run the radix select of akl_kernels/radix_split.py. On inputs built to be hard
(ties just above the crossing, one huge outlier, probabilities in float32's denormal range,
-inf, mu near 0 and 1, T far from 1) the head equals the reference's, and the number of
reads of the teacher row is the fixed bound whatever the data: the Triton kernel counts its
reads, the torch backend its histogram passes.
"""

import importlib

import pytest
import torch

import reference
from akl_kernels.backends.torch import head_split
from akl_kernels.backends.triton import forward_kernel as triton_forward
from akl_kernels.config import make_config
from akl_kernels.radix_split import digit_plan, key_bits, search_passes
from tests.conftest import DEVICE
from tests.helpers import ambiguous_rows

VOCAB = 600


def _hard_teachers(gen, dtype):
    """[rows, VOCAB] teacher logits, one hard case per row."""
    rows = []
    base = lambda: torch.randn(VOCAB, generator=gen, dtype=torch.float64)  # noqa: E731
    rows.append(base() * 0.01)  # nearly flat: every token close to the crossing
    x = base() * 0.5 - 3.0
    x[torch.randperm(VOCAB, generator=gen)[:300]] = 1.0  # 300 equal tokens hold the crossing
    rows.append(x)
    x = base()
    x[7] = 80.0  # one huge outlier: p = 1 to float32 rounding
    rows.append(x)
    x = -torch.linspace(0.0, 110.0, VOCAB, dtype=torch.float64)  # p down to e^-110 (denormal)
    rows.append(x[torch.randperm(VOCAB, generator=gen)])
    x = base() * 2.0
    x[torch.randperm(VOCAB, generator=gen)[:200]] = float("-inf")  # masked vocabulary
    rows.append(x)
    x = torch.zeros(VOCAB, dtype=torch.float64)  # all tied, -0.0 and +0.0 alike
    x[torch.randperm(VOCAB, generator=gen)[:VOCAB // 2]] = -0.0
    rows.append(x)
    # Against the pivot search (even splits in value between the bracket's ends): values
    # bunched geometrically towards the top, so each split keeps most of the mass.
    x = -20.0 * 2.0 ** (-torch.arange(VOCAB, dtype=torch.float64) / 40)
    rows.append(x[torch.randperm(VOCAB, generator=gen)])
    x = base() * 3.0
    x[:40] = x[:40].max() + 1e-3  # many equal values just above where mu cuts
    rows.append(x)
    return torch.stack(rows).to(dtype)


CASES = [
    (0.5, 1.0), (1e-6, 1.0), (0.9999, 1.0), (0.3, 0.05), (0.7, 20.0),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("include_crossing", [False, True])
@pytest.mark.parametrize(("mu", "temperature"), CASES)
def test_torch_backend_head_equals_the_reference_in_a_fixed_number_of_passes(
        rng, monkeypatch, dtype, include_crossing, mu, temperature):
    teacher = _hard_teachers(rng, dtype)
    calls = []
    counted = head_split.crossing_digit

    def counting(hist, *args):  # called once per pass, on its [R, bins] histogram
        calls.append(hist.shape)
        return counted(hist, *args)

    monkeypatch.setattr(head_split, "crossing_digit", counting)
    p = torch.softmax(teacher.float() / temperature, dim=-1)
    head = head_split.head_mask(teacher, p, mu, include_crossing)
    ref = reference.reference_head_mask(teacher, mu=mu, include_crossing=include_crossing,
                                        temperature=temperature)
    clear = ~ambiguous_rows(teacher, mu=mu, temperature=temperature)
    assert clear.sum() >= len(clear) - 3
    assert torch.equal(head[clear], ref[clear])
    assert len(calls) == search_passes(dtype) == len(digit_plan(key_bits(dtype)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("include_crossing", [False, True])
@pytest.mark.parametrize(("mu", "temperature"), CASES)
def test_the_sort_split_is_the_radix_split_bit_for_bit(rng, dtype, include_crossing, mu,
                                                        temperature):
    """head_mask_by_sort (the sparse teachers' split) against head_mask on the hard inputs,
    ambiguous rows included: the same integer masses and tie rule give the same head; with a
    ``total`` larger than the row's mass (a sparse teacher's rest) too."""
    teacher = _hard_teachers(rng, dtype)
    p = torch.softmax(teacher.float() / temperature, dim=-1)
    by_radix = head_split.head_mask(teacher, p, mu, include_crossing)
    by_sort = head_split.head_mask_by_sort(teacher, p, mu, include_crossing)
    assert torch.equal(by_sort, by_radix)
    cut = p[:, : p.shape[1] // 3]  # a third of each row, the rest of its mass "outside"
    total = head_split.integer_masses(p).sum(dim=1)
    assert torch.equal(
        head_split.head_mask_by_sort(teacher[:, : cut.shape[1]], cut, mu, include_crossing,
                                     total=total),
        head_split.head_mask(teacher[:, : cut.shape[1]], cut, mu, include_crossing,
                             total=total))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("include_crossing", [False, True])
@pytest.mark.parametrize(("mu", "temperature"), CASES[:3])
def test_triton_radix_head_equals_the_reference_in_bounded_reads(
        rng, monkeypatch, dtype, include_crossing, mu, temperature):
    monkeypatch.setenv("AKL_TRITON_HEAD_SEARCH", "radix")
    teacher = _hard_teachers(rng, dtype).to(DEVICE)
    student = torch.randn(teacher.shape, generator=rng).to(dtype).to(DEVICE)
    cfg = make_config("akl", dict(mu=mu, include_crossing=include_crossing),
                      temperature=temperature)
    valid = torch.ones(teacher.shape[0], dtype=torch.bool, device=DEVICE)
    got = triton_forward.forward(student, teacher, valid, cfg, head_stats=True).head
    ref = reference.reference_head_tail_stats(student.cpu(), teacher.cpu(), mu=mu,
                                              include_crossing=include_crossing,
                                              temperature=temperature)
    clear = ~ambiguous_rows(teacher, mu=mu, temperature=temperature)
    assert torch.equal(got.head_count.cpu()[clear], ref.head_count[clear])
    assert torch.allclose(got.head_gap.cpu()[clear].double(), ref.head_gap[clear], atol=1e-5)
    reads = triton_forward.teacher_reads(student, teacher, cfg, search="radix").cpu()
    # statistics + the digit passes + the gap pass, whatever the row
    assert (reads == 1 + search_passes(dtype) + 1).all(), reads


def test_the_pivot_search_needs_more_reads_on_inputs_built_against_it(rng):
    """The inputs above defeat the old search's bound; the radix select's does not move."""
    teacher = _hard_teachers(rng, torch.float32).to(DEVICE)
    student = torch.randn(teacher.shape, generator=rng).to(DEVICE)
    cfg = make_config("akl", dict(mu=0.5), temperature=1.0)
    pivot = triton_forward.teacher_reads(student, teacher, cfg, search="pivot").cpu()
    radix = triton_forward.teacher_reads(student, teacher, cfg, search="radix").cpu()
    assert (radix == 5).all()
    assert pivot.max() > 5, pivot


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_both_backends_pick_the_same_head(rng, monkeypatch, dtype):
    """Same digits, masses and tie rule: the same head on every row that is not ambiguous,
    ties at the threshold included."""
    monkeypatch.setenv("AKL_TRITON_HEAD_SEARCH", "radix")
    gen_teacher = torch.randn(16, 512, generator=rng) * 2
    gen_teacher[:, :64] = gen_teacher[:, :64].round()  # many exact ties
    teacher = gen_teacher.to(dtype)
    student = torch.randn(teacher.shape, generator=rng).to(dtype)
    cfg = make_config("akl", dict(mu=0.5), temperature=1.0)
    valid = torch.ones(16, dtype=torch.bool)
    torch_backend = importlib.import_module("akl_kernels.backends.torch.chunked")
    by_torch = torch_backend.forward(student, teacher, valid, cfg, head_stats=True).head
    by_triton = triton_forward.forward(student.to(DEVICE), teacher.to(DEVICE),
                                       valid.to(DEVICE), cfg, head_stats=True).head
    clear = ~ambiguous_rows(teacher, mu=0.5)
    assert torch.equal(by_torch.head_count[clear], by_triton.head_count.cpu()[clear])


def test_the_head_search_is_chosen_by_name(monkeypatch):
    launch = importlib.import_module("akl_kernels.backends.triton.launch")
    assert launch.head_search() == "pivot"  # the default until a GPU shows radix faster
    monkeypatch.setenv("AKL_TRITON_HEAD_SEARCH", "radix")
    assert launch.head_search() == "radix"
    monkeypatch.setenv("AKL_TRITON_HEAD_SEARCH", "sort")
    with pytest.raises(ValueError, match="AKL_TRITON_HEAD_SEARCH"):
        launch.head_search()
