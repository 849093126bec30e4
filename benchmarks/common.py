"""Inputs, timers and the memory floor shared by every benchmark entry point."""

from __future__ import annotations

import math
import statistics
import time

import torch

TEACHERS = ("flat", "peaked")


def make_inputs(n, vocab, dtype, teacher, device, seed=0):
    """Student and teacher logits [n, vocab], built in row chunks (no float32 N x V copies).

    flat: standard-normal logits times 2 for both models.
    peaked: the same, then one random token per row is raised so that it carries a mass drawn
    uniformly from [0.3, 0.9] of the teacher's distribution, like a trained LLM's next token.
    The student is the teacher plus unit Gaussian noise.
    """
    if teacher not in TEACHERS:
        raise ValueError(f"teacher must be one of {TEACHERS}, got {teacher!r}")
    gen = torch.Generator(device=device).manual_seed(seed)
    student = torch.empty(n, vocab, dtype=dtype, device=device)
    teacher_logits = torch.empty(n, vocab, dtype=dtype, device=device)
    rows = max(1, 2**26 // vocab)
    for r0 in range(0, n, rows):
        m = min(rows, n - r0)
        t = torch.randn(m, vocab, generator=gen, device=device) * 2.0
        if teacher == "peaked":
            top = torch.randint(0, vocab, (m, 1), generator=gen, device=device)
            t.scatter_(1, top, float("-inf"))
            rest = torch.logsumexp(t, dim=1, keepdim=True)
            share = 0.3 + 0.6 * torch.rand(m, 1, generator=gen, device=device)
            t.scatter_(1, top, rest + torch.log(share / (1 - share)))
        teacher_logits[r0 : r0 + m] = t
        student[r0 : r0 + m] = t + torch.randn(m, vocab, generator=gen, device=device)
    return student, teacher_logits


def floor_bytes(n, vocab, s_dtype, t_dtype):
    """SPEC 4: forward+backward must read s and t once and write the gradient once."""
    size = lambda d: torch.finfo(d).bits // 8  # noqa: E731
    return n * vocab * (2 * size(s_dtype) + size(t_dtype))


def cuda_median_ms(fn, *, warmup_ms=25, rep_ms=200, grad_to_none=None):
    import triton.testing

    return triton.testing.do_bench(
        fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median"
    )


def cpu_median_ms(fn, *, repeats=5, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(device, nbytes=2 * 2**30):
    """Device-to-device copy bandwidth, bytes read plus bytes written, in GB/s."""
    x = torch.empty(nbytes // 4, dtype=torch.float32, device=device).normal_()
    y = torch.empty_like(x)
    ms = cuda_median_ms(lambda: y.copy_(x))
    return 2 * nbytes / (ms * 1e-3) / 1e9


def fmt(x, digits=3):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}g}"
