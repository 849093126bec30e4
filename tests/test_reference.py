"""The references themselves: the contract's definition against the official algorithm
(docs/contract.md §5).

``reference.official_akl`` restates the paper's code (float32, unstable sort, NaN weights at
identical models); ``reference.reference_akl`` is docs/contract.md §2 in float64. They must
agree wherever the contract does not deliberately differ (tie-free finite inputs), and differ
exactly where it does.
"""

import pytest
import torch

import reference
from reference.official import _gap_ratios
from tests.helpers import ambiguous_rows, rel_err


def _has_ties(x):
    """True if some row of ``x`` holds two equal values."""
    srt = torch.sort(x, dim=-1).values
    return bool((srt[..., 1:] == srt[..., :-1]).any())


def _tie_free_inputs(gen, rows, vocab, *, mus, temperature, scale=2.0):
    """float32 randn logits, redrawn until the teacher (logits and float32 softmax) has no tie
    and no cumulative mass lies within 1e-5 of any mu (where float32 and float64 may split
    differently)."""
    for _ in range(100):
        student = torch.randn(rows, vocab, generator=gen) * scale
        teacher = torch.randn(rows, vocab, generator=gen) * scale
        p32 = torch.softmax(teacher / temperature, dim=-1)
        if _has_ties(teacher) or _has_ties(p32):
            continue
        if any(ambiguous_rows(teacher, mu=mu, temperature=temperature, margin=1e-5).any()
               for mu in mus):
            continue
        return student, teacher
    raise AssertionError("could not draw tie-free inputs")


def _labels(gen, rows, vocab):
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    ignored = torch.randperm(rows, generator=gen)[: rows // 3]
    labels[ignored] = -100
    assert (labels == -100).any() and (labels != -100).any()
    return labels


# ---------------------------------------------------------------- (a) official == definition


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("mu", [0.3, 0.5, 0.8])
@pytest.mark.parametrize("with_labels", [False, True])
@pytest.mark.parametrize("vocab", [97, 512])
def test_official_agrees_with_definition_on_tie_free_inputs(
    rng, temperature, mu, with_labels, vocab
):
    rows = 12
    student, teacher = _tie_free_inputs(rng, rows, vocab, mus=[mu], temperature=temperature)
    assert student.dtype == teacher.dtype == torch.float32
    assert not _has_ties(teacher)
    labels = _labels(rng, rows, vocab) if with_labels else None

    s32 = student.clone().requires_grad_(True)
    official = reference.official_akl(s32, teacher, labels, mu=mu, temperature=temperature)
    (g_official,) = torch.autograd.grad(official, s32)

    s64 = student.double().requires_grad_(True)
    ref = reference.reference_akl(
        s64, teacher.double(), labels, mu=mu, temperature=temperature, reduction="mean"
    )
    (g_ref,) = torch.autograd.grad(ref, s64)

    assert official.dtype == torch.float32 and ref.dtype == torch.float64
    assert torch.isfinite(official) and ref > 0
    assert abs(official.item() - ref.item()) <= 1e-5 * abs(ref.item()), (official, ref)
    assert rel_err(g_official, g_ref) < 1e-4
    if labels is not None:
        ignored = labels == -100
        assert (g_official[ignored] == 0).all() and (g_ref[ignored] == 0).all()
    # The split itself agrees too: same head on every row.
    p = torch.softmax(teacher.double() / temperature, dim=-1)
    head = reference.reference_head_mask(teacher, mu=mu, temperature=temperature)
    order = torch.sort(torch.softmax(teacher / temperature, dim=-1), dim=-1, descending=True)
    official_in_tail = order.values.cumsum(-1) > mu
    official_in_tail[:, 0] = False
    assert torch.equal(head.sum(-1), (~official_in_tail).sum(-1))
    assert torch.equal(head.gather(-1, order.indices), ~official_in_tail)
    assert (torch.where(head, p, 0.0).sum(-1) <= mu).logical_or(head.sum(-1) == 1).all()


@pytest.mark.parametrize("kind", ["fkl", "rkl"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_official_kl_terms_agree_with_definition(rng, kind, temperature):
    student = torch.randn(10, 200, generator=rng) * 2
    teacher = torch.randn(10, 200, generator=rng) * 2
    labels = _labels(rng, 10, 200)
    official = getattr(reference, f"official_{kind}")(
        student, teacher, labels, temperature=temperature
    )
    ref = reference.reference_loss(
        kind, student.double(), teacher.double(), labels, temperature=temperature
    )
    assert abs(official.item() - ref.item()) <= 1e-5 * abs(ref.item())


# ---------------------------------------------------------------- (b) the head mask


@pytest.mark.parametrize("include_crossing", [False, True])
def test_mu_one_selects_every_token(rng, include_crossing):
    for scale in (0.1, 2.0, 30.0):  # flat, typical and extremely peaked teachers
        teacher = torch.randn(8, 300, generator=rng) * scale
        for dtype in (torch.float32, torch.float64, torch.bfloat16):
            head = reference.reference_head_mask(
                teacher.to(dtype), mu=1.0, include_crossing=include_crossing
            )
            assert head.dtype == torch.bool and head.shape == teacher.shape
            assert head.all()


@pytest.mark.parametrize("include_crossing", [False, True])
def test_top_token_is_always_in_the_head(rng, include_crossing):
    # A flat teacher: the top token alone holds far less than mu, yet it is in the head.
    teacher = torch.randn(16, 1000, generator=rng) * 0.05
    top = teacher.argmax(-1)
    teacher.scatter_add_(-1, top[:, None], torch.full((16, 1), 0.01))  # a unique top token
    assert (teacher.topk(2, dim=-1).values.diff(dim=-1) < 0).all()
    for mu in (1e-6, 0.001, 0.3, 0.5, 0.9):
        head = reference.reference_head_mask(teacher, mu=mu, include_crossing=include_crossing)
        assert head.gather(-1, top[:, None]).all()
        assert (head.sum(-1) >= 1).all()
    head = reference.reference_head_mask(teacher, mu=1e-6)
    assert (head.sum(-1) == 1).all()  # only the top token: its mass alone exceeds mu
    # And with temperature: the top token does not depend on T.
    head = reference.reference_head_mask(teacher, mu=1e-6, temperature=0.1)
    assert torch.equal(head.float().argmax(-1), top)


@pytest.mark.parametrize("mu", [0.05, 0.3, 0.5, 0.8, 0.99, 1.0])
def test_include_crossing_adds_exactly_one_token(rng, mu):
    teacher = torch.cat([
        torch.randn(6, 64, generator=rng) * 3.0,
        torch.randn(2, 64, generator=rng) * 0.01,
        torch.full((1, 64), -2.0),  # all tied
    ]).double()
    teacher[-1, 7] = 0.0  # one peak, the rest tied
    for temperature in (1.0, 2.0):
        official = reference.reference_head_mask(teacher, mu=mu, temperature=temperature)
        crossing = reference.reference_head_mask(
            teacher, mu=mu, include_crossing=True, temperature=temperature
        )
        vocab = teacher.shape[-1]
        n_off, n_cross = official.sum(-1), crossing.sum(-1)
        p = torch.softmax(teacher / temperature, dim=-1)
        # No extra token when the official head is everything, or when the forced top token
        # is itself the crossing one (its mass alone exceeds mu: smallest prefix >= mu is it).
        top_crosses = p.max(-1).values > mu
        assert (n_off[top_crosses] == 1).all()
        unchanged = (n_off == vocab) | top_crosses
        assert torch.equal(n_cross, torch.where(unchanged, n_off, n_off + 1))
        assert (crossing | ~official).all()  # a superset of the official head
        # The head with the crossing token is the smallest stable prefix with mass >= mu.
        assert (torch.where(crossing, p, 0.0).sum(-1) >= mu - 1e-12).all()
        # The extra token is the most probable tail token (lowest index among equals).
        for r in torch.nonzero(~unchanged).flatten().tolist():
            extra = torch.nonzero(crossing[r] & ~official[r]).flatten()
            assert extra.numel() == 1
            tail = torch.nonzero(~official[r]).flatten()
            best = tail[p[r, tail] == p[r, tail].max()].min()
            assert extra.item() == best.item()
    assert (~unchanged).sum() >= 1 or mu == 1.0  # the +1 case is exercised
    if mu == 1.0:
        assert official.all() and crossing.all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_ties_take_the_lowest_indices_first(dtype):
    # p: index 5 holds 0.2; indices 8, 1, 6, 3 are tied at 0.15 each; five tokens at 0.04.
    # Sorted stably: 5, 1, 3, 6, 8, 0, 2, 4, 7, 9 with cumulative mass
    # 0.2, 0.35, 0.5, 0.65, 0.8, ... The boundary mu cuts through the tie group.
    prob = torch.full((10,), 0.04, dtype=torch.float64)
    prob[5] = 0.2
    prob[[8, 1, 6, 3]] = 0.15
    logits = prob.log().to(dtype)
    if dtype == torch.bfloat16:  # bf16 rounds distinct values; the tie survives
        assert logits[1] == logits[3] == logits[6] == logits[8]

    def mask(idx):
        m = torch.zeros(10, dtype=torch.bool)
        m[idx] = True
        return m

    expected = {
        (0.1, False): mask([5]),
        (0.1, True): mask([5]),  # the forced top token already crosses mu
        (0.4, False): mask([5, 1]),
        (0.4, True): mask([5, 1, 3]),
        (0.6, False): mask([5, 1, 3]),
        (0.6, True): mask([5, 1, 3, 6]),
        (0.7, False): mask([5, 1, 3, 6]),
        (0.7, True): mask([5, 1, 3, 6, 8]),
    }
    for (mu, include_crossing), want in expected.items():
        got = reference.reference_head_mask(logits, mu=mu, include_crossing=include_crossing)
        assert torch.equal(got, want), (mu, include_crossing, got)
        # Same in a batch, with the row permuted so that the tied tokens move: the chosen ones
        # are always the lowest-index members of the group.
        perm = torch.tensor([3, 9, 0, 8, 6, 1, 7, 2, 5, 4])
        got_perm = reference.reference_head_mask(
            torch.stack([logits, logits[perm]]), mu=mu, include_crossing=include_crossing
        )
        assert torch.equal(got_perm[0], want)
        tied = [int(i) for i in range(10) if perm[i] in (1, 3, 6, 8)]
        n_tied_in = int(want[[1, 3, 6, 8]].sum())
        want_perm = mask([int((perm == 5).nonzero()), *tied[:n_tied_in]])
        assert torch.equal(got_perm[1], want_perm), (mu, include_crossing, got_perm[1])


# ---------------------------------------------------------------- (c) identical models


def test_reference_weights_are_one_half_for_identical_models(rng):
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        teacher = (torch.randn(2, 3, 50, generator=rng) * 3).to(dtype)
        for mu, include_crossing in [(0.5, False), (0.2, True), (1.0, False)]:
            stats = reference.reference_head_tail_stats(
                teacher.clone(), teacher, mu=mu, include_crossing=include_crossing
            )
            assert stats.head_weight.shape == (2, 3)
            assert (stats.head_weight == 0.5).all()
            assert (stats.head_gap == 0).all() and (stats.tail_gap == 0).all()
        loss = reference.reference_akl(teacher.clone(), teacher, reduction="none")
        assert (loss == 0).all()
    # And a different student gives a weight that is not 0.5 (the 0.5 is not a constant).
    s = torch.randn(4, 50, generator=rng) * 3
    t = torch.randn(4, 50, generator=rng) * 3
    w = reference.reference_head_tail_stats(s, t).head_weight
    assert ((w > 0) & (w < 1) & (w != 0.5)).all()
    stats = reference.reference_head_tail_stats(s, t)
    assert torch.allclose(w, stats.head_gap / (stats.head_gap + stats.tail_gap))


# ---------------------------------------------------------------- (d) where the contract differs


def test_official_gives_nan_weights_for_identical_models_the_spec_gives_one_half(rng):
    teacher = torch.randn(4, 100, generator=rng) * 2
    student = teacher.clone()
    head_ratio, tail_ratio = _gap_ratios(teacher, student, 0.5)
    assert torch.isnan(head_ratio).all() and torch.isnan(tail_ratio).all()
    assert torch.isnan(reference.official_akl(student, teacher))

    stats = reference.reference_head_tail_stats(student, teacher)
    assert (stats.head_weight == 0.5).all()
    assert reference.reference_akl(student, teacher) == 0

    # Where the models differ the two weightings agree.
    other = student + torch.randn(4, 100, generator=rng)
    head_ratio, tail_ratio = _gap_ratios(teacher, other, 0.5)
    ref = reference.reference_head_tail_stats(other, teacher)
    assert torch.allclose(head_ratio.double(), ref.head_weight, rtol=1e-5)
    assert torch.allclose((head_ratio + tail_ratio).double(), torch.ones(4, dtype=torch.float64))
