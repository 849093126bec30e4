"""The pytest-benchmark suite: every implementation that runs here, per loss, pass and shape.

    pytest benchmarks/ --benchmark-only [-k akl] [--benchmark-json out.json]

Benchmarks are grouped by loss, pass (fwd or fwd+bwd) and inputs, so each group's table
compares the implementations side by side. Shapes default per device; AKL_BENCH_SHAPES
("NxV,NxV") overrides them. Peak memory is the benchmark CLI's job (``python -m benchmarks``,
a fresh process per case on CPU); on CUDA the allocator's peak is recorded here as extra_info too.
"""

import os

import pytest
import torch

from benchmarks.cli import free_memory_bytes, rows_that_fit
from benchmarks.common import TEACHERS, device_meta, make_inputs
from benchmarks.implementations import IMPLEMENTATIONS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DEFAULT_SHAPES = {"cpu": "512x32000,512x128256", "cuda": "16384x32000,16384x128256,4096x262144"}
SHAPES = [tuple(int(x) for x in shape.split("x"))
          for shape in os.environ.get("AKL_BENCH_SHAPES", DEFAULT_SHAPES[DEVICE]).split(",")]
CASES = [(impl, kind) for impl, spec in IMPLEMENTATIONS.items() for kind in spec.kinds]


@pytest.fixture(scope="module")
def inputs():
    cache = {}

    def get(n, vocab, dtype, teacher):
        key = (n, vocab, dtype, teacher)
        if key not in cache:
            cache.clear()  # one shape at a time in memory
            cache[key] = make_inputs(n, vocab, getattr(torch, dtype), teacher, DEVICE)
        return cache[key]

    return get


@pytest.mark.parametrize("passes", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("teacher", TEACHERS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("n,vocab", SHAPES, ids=[f"N{n}-V{v}" for n, v in SHAPES])
@pytest.mark.parametrize("impl,kind", CASES, ids=[f"{k}-{i}" for i, k in CASES])
def test_loss(benchmark, inputs, impl, kind, n, vocab, dtype, teacher, passes):
    reason = IMPLEMENTATIONS[impl].unavailable(DEVICE)
    if reason:
        pytest.skip(reason)
    if rows_that_fit(impl, n, vocab, dtype, free_memory_bytes(DEVICE)) < n:
        pytest.skip(f"{impl} needs more memory than this device has free at N={n}, V={vocab}")
    student, teacher_logits = inputs(n, vocab, dtype, teacher)
    student = student.detach().requires_grad_(True)
    fn = IMPLEMENTATIONS[impl].build(kind)
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)

    def run():
        loss = fn(student, teacher_logits)
        if passes == "fwd+bwd":
            loss.backward()
            student.grad = None
        sync()
        return loss

    benchmark.group = f"{kind} {passes} N={n} V={vocab} {dtype} {teacher}"
    benchmark.extra_info.update(device_meta(DEVICE), impl=impl, kind=kind, n=n, vocab=vocab,
                                dtype=dtype, teacher=teacher, passes=passes)
    if DEVICE == "cuda":
        run()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run()
        benchmark.extra_info["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
    loss = benchmark.pedantic(run, rounds=5 if DEVICE == "cuda" else 3, warmup_rounds=1)
    assert torch.isfinite(loss).item()
