"""GPU parity at real sizes and the peak-memory contract (skipped without CUDA).

Rows are independent, so each full-size launch is checked on a random sample of its rows (plus
the first and last, which exercise the int64 row offsets) against the float64 reference.
"""

import pytest
import torch

import akl_kernels
import reference
from benchmarks.common import make_inputs
from tests.helpers import ambiguous_rows, grad_tol, rel_err

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

LOSSES = {"fkl": akl_kernels.fkl_loss, "rkl": akl_kernels.rkl_loss, "akl": akl_kernels.akl_loss}
SIZES = [
    (16384, 32000, torch.bfloat16),
    (16384, 128256, torch.bfloat16),
    (16384, 262144, torch.bfloat16),
    (16384, 32000, torch.float32),
    (8192, 128256, torch.float32),
    (4096, 262144, torch.float32),
]


def _sample_rows(n, gen):
    picked = torch.randperm(n, generator=gen)[:48]
    return torch.cat([torch.tensor([0, n - 1]), picked]).unique()


@pytest.mark.parametrize("n,vocab,dtype", SIZES)
@pytest.mark.parametrize("teacher", ["flat", "peaked"])
def test_parity_at_real_sizes(rng, monkeypatch, n, vocab, dtype, teacher):
    seed = int(torch.randint(0, 2**31, (1,), generator=rng))
    student, teacher_logits = make_inputs(n, vocab, dtype, teacher, "cuda", seed=seed)
    rows = _sample_rows(n, rng).cuda()
    s_ref = student[rows].double()
    t_ref = teacher_logits[rows].double()
    clear = ~ambiguous_rows(teacher_logits[rows], mu=0.5, temperature=1.3).cuda()
    for kind, fn in LOSSES.items():
        s = student.detach().requires_grad_(True)
        loss = fn(s, teacher_logits, reduction="none", temperature=1.3)
        loss.sum().backward()
        s_r = s_ref.clone().requires_grad_(True)
        ref = reference.reference_loss(kind, s_r, t_ref, reduction="none", temperature=1.3)
        ref.sum().backward()
        keep = clear if kind == "akl" else torch.ones_like(clear)
        assert torch.allclose(loss[rows][keep].double(), ref[keep], rtol=1e-4, atol=1e-6), kind
        assert rel_err(s.grad[rows][keep], s_r.grad[keep]) < grad_tol(dtype), kind
        del s, loss
    stats = akl_kernels.head_tail_stats(student, teacher_logits, temperature=1.3)
    ref_stats = reference.reference_head_tail_stats(s_ref, t_ref, temperature=1.3)
    assert torch.equal(stats.head_count[rows][clear], ref_stats.head_count[clear])
    monkeypatch.setenv("AKL_TRITON_HEAD_SEARCH", "radix")  # the bounded-pass search too
    radix = akl_kernels.head_tail_stats(student, teacher_logits, temperature=1.3)
    assert torch.equal(radix.head_count[rows][clear], ref_stats.head_count[clear])


@pytest.mark.parametrize("vocab", [32000, 128256])
@pytest.mark.parametrize("kind", sorted(LOSSES))
def test_peak_extra_memory_under_one_percent(kind, vocab):
    n, dtype = 16384, torch.bfloat16
    student, teacher = make_inputs(n, vocab, dtype, "flat", "cuda")
    student.requires_grad_(True)
    logits_bytes = student.numel() * student.element_size()
    LOSSES[kind](student, teacher).backward()  # compile and warm the allocator
    student.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    LOSSES[kind](student, teacher).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base - logits_bytes  # minus the gradient itself
    assert extra < 0.01 * logits_bytes, (extra, logits_bytes)
