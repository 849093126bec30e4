"""One benchmark case: median forward and forward+backward time and the peak memory it adds.

On CUDA a case runs in the calling process (the allocator's peak counter is exact). On CPU each
case runs in a fresh interpreter, ``python -m benchmarks.measure '<case json>'``, so that its
peak resident memory is its own.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

from benchmarks.common import cpu_median_ms, cuda_median_ms, make_inputs
from benchmarks.implementations import IMPLEMENTATIONS


@dataclass(frozen=True)
class Case:
    impl: str
    kind: str
    n: int
    vocab: int
    dtype: str
    teacher: str
    device: str


def rss_bytes(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def release_freed_memory():
    """Give freed heap pages back to the OS so the baseline RSS holds only live memory."""
    gc.collect()
    with contextlib.suppress(OSError):  # not glibc: large tensors are unmapped on free anyway
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_rss():
    # Writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def time_and_peak(forward, clear_grad, cuda: bool, repeats: int, time_forward=True) -> dict:
    """Measure a loss closure: a first call (compilation and loading, timed on its own), then
    the peak memory of one forward+backward above what is allocated now, then median times.
    ``forward()`` returns the loss; ``clear_grad()`` drops the inputs' gradients."""
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def forward_backward():
        forward().backward()

    start = time.perf_counter()
    loss = forward()
    loss.backward()
    sync()
    first_call_ms = (time.perf_counter() - start) * 1e3
    loss_value = loss.item()
    del loss
    clear_grad()

    forward_ms = None
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        forward_backward()
        sync()
        peak = torch.cuda.max_memory_allocated() - base
        clear_grad()
        if time_forward:
            forward_ms = cuda_median_ms(forward)
        forward_backward_ms = cuda_median_ms(forward_backward, setup=clear_grad)
    else:
        release_freed_memory()
        base = rss_bytes("VmRSS")
        reset_peak_rss()
        if time_forward:
            forward_ms = cpu_median_ms(forward, repeats=repeats)
        forward_backward_ms = cpu_median_ms(forward_backward, setup=clear_grad, repeats=repeats)
        peak = rss_bytes("VmHWM") - base
    return dict(forward_ms=forward_ms, forward_backward_ms=forward_backward_ms,
                peak_extra_bytes=peak, first_call_ms=first_call_ms, loss=loss_value)


def run_case(case: Case, repeats: int, seed: int = 0) -> dict:
    """Measure one case here, in this process."""
    fn = IMPLEMENTATIONS[case.impl].build(case.kind)
    student, teacher = make_inputs(case.n, case.vocab, getattr(torch, case.dtype), case.teacher,
                                   case.device, seed=seed)
    student.requires_grad_(True)
    cuda = case.device == "cuda"

    def clear_grad():
        student.grad = None

    def forward():  # as in training: the autograd graph is built, then dropped
        return fn(student, teacher)

    return dict(asdict(case), **time_and_peak(forward, clear_grad, cuda, repeats),
                repeats=repeats if not cuda else "adaptive (>= 5)")


def measure_case(case, repeats: int, run, child: tuple[str, ...]) -> dict:
    """The record of ``run(case, repeats)`` for a dataclass ``case``: on CPU in a fresh process
    (``python -m *child <[case, repeats] as JSON>``), so that its peak RSS is its own; on CUDA
    in this one, an out-of-memory recorded as the case's error. Every benchmark measures so."""
    if case.device == "cpu":
        cmd = [sys.executable, "-m", *child, json.dumps([asdict(case), repeats])]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout)[-1500:]
            return dict(asdict(case), error=f"exit code {done.returncode}: {tail}")
        return json.loads(done.stdout.strip().splitlines()[-1])
    try:
        return run(case, repeats)
    except torch.cuda.OutOfMemoryError as error:
        return dict(asdict(case), error=f"out of memory: {str(error)[:200]}")
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def measure(case: Case, repeats: int) -> dict:
    return measure_case(case, repeats, run_case, ("benchmarks.measure",))


if __name__ == "__main__":
    fields, reps = json.loads(sys.argv[1])
    print(json.dumps(run_case(Case(**fields), reps)))
