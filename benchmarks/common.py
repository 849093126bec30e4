"""Inputs, timers and the memory floor shared by every benchmark entry point."""

from __future__ import annotations

import math
import os
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
    """docs/contract.md §4: forward+backward must read s and t once and write the gradient once."""
    return n * vocab * (2 * s_dtype.itemsize + t_dtype.itemsize)


def floor_ms(nbytes, bandwidth_gbs):
    """The time to move ``nbytes`` at the copy bandwidth measured in the same run (GB/s), or
    None without one (on CPU)."""
    return nbytes / (bandwidth_gbs * 1e9) * 1e3 if bandwidth_gbs else None


def cuda_median_ms(fn, *, setup=None, min_repeats=5, max_repeats=100, target_ms=300.0):
    """Median of CUDA-event timings of fn, warm-up excluded.

    The number of repeats aims at target_ms of measured time, clamped to [min_repeats,
    max_repeats], so that even a 100 ms call gets a median of several runs. setup (e.g.
    clearing .grad) runs before each call, outside the timed region.
    """
    def timed():
        if setup is not None:
            setup()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        return start, end

    warm = timed()  # warm-up, also the estimate for the number of repeats
    torch.cuda.synchronize()
    estimate = max(warm[0].elapsed_time(warm[1]), 1e-3)
    repeats = int(min(max_repeats, max(min_repeats, target_ms // estimate)))
    events = [timed() for _ in range(repeats)]
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def cpu_median_ms(fn, *, setup=None, repeats=5):
    """Median wall time of fn over repeats (the caller has warmed it up); setup runs untimed
    before each call."""
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
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


def device_meta(device):
    """What every result records about where it was measured."""
    import platform

    import triton

    if device == "cuda":
        name = torch.cuda.get_device_name()
    else:
        model = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as info:
                model = next(line.split(":", 1)[1].strip() for line in info
                             if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
        name = f"CPU {model}, {os.cpu_count()} cores"
    return dict(device=device, device_name=name, torch=torch.__version__,
                triton=triton.__version__, python=platform.python_version(),
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))


def fmt(x, digits=3):
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return f"{x:.{digits}g}"
