"""Sparse (top-k) teachers: this library against a plain PyTorch implementation.

    python -m benchmarks.sparse_teacher                  # CPU: N 4096, V 32000, k 64, float32
    python -m benchmarks.sparse_teacher --device cuda    # N 16384, V 128256, k 64, bfloat16

Every implementation gets the same student logits and the same ``TopKTeacher`` (the top-k of a
teacher's logits, built once outside the timing), and returns the token mean over all rows of
forward KL on the k tokens plus the "rest" bucket (docs/contract.md §6):
- ``torch`` / ``triton``: this library's ``fkl_loss`` (or ``akl_loss``) with the sparse teacher;
- ``plain``: what a user writes without the library: ``log_softmax`` of the student in float32,
  ``gather`` of the k entries, the rest as ``1 - sum_k q``, autograd for the gradient (FKL only).
Metrics per case: the median forward+backward time after a warm-up call, and the peak memory
above the inputs during it (CUDA: ``max_memory_allocated``; CPU: the peak resident memory of a
fresh process per case). On CUDA the time is also a multiple of the floor: read the student
once, write its gradient once and read the teacher's ``N x k`` entries, at the copy bandwidth
measured in the same run.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

import akl_kernels
from benchmarks import grid
from benchmarks.common import floor_ms, fmt, make_inputs
from benchmarks.measure import time_and_peak

IMPLS = ("torch", "triton", "plain")
# The shapes per device: (N, V, k, dtype).
DEFAULT_SHAPES = {"cpu": (4096, 32000, 64, "float32"), "cuda": (16384, 128256, 64, "bfloat16")}


@dataclass(frozen=True)
class Case:
    impl: str
    kind: str
    n: int
    vocab: int
    k: int
    dtype: str
    device: str


def plain_bucket_fkl(student, indices, logprobs):
    """Forward KL over the k tokens and the rest, as plain PyTorch code would write it."""
    log_q = F.log_softmax(student.float(), dim=-1)
    log_q_k = log_q.gather(-1, indices)
    p = logprobs.float().exp()
    p_rest = (1.0 - p.sum(-1)).clamp(min=0.0)
    q_rest = (1.0 - log_q_k.exp().sum(-1)).clamp(min=1e-30)
    rest = torch.where(p_rest > 0, p_rest * (p_rest.clamp(min=1e-30).log() - q_rest.log()), 0.0)
    return ((p * (logprobs.float() - log_q_k)).sum(-1) + rest).mean()


def build(impl, kind):
    if impl == "plain":
        return lambda s, teacher: plain_bucket_fkl(s, teacher.indices, teacher.logprobs)
    fn = getattr(akl_kernels, f"{kind}_loss")
    return lambda s, teacher: fn(s, teacher, backend=impl)


def unavailable(impl, kind, device):
    if impl == "triton" and device != "cuda":
        return "the Triton kernels run on CUDA (the interpreter is for tests)"
    if impl == "plain" and kind != "fkl":
        return "the plain implementation computes FKL"
    return None


def sparse_floor_bytes(n, vocab, k, dtype):
    """Read the student once, write its gradient once, read the teacher's k int64 indices and
    float32 log-probabilities."""
    size = getattr(torch, dtype).itemsize
    return n * vocab * 2 * size + n * k * (8 + 4)


def run_case(case: Case, repeats: int) -> dict:
    dtype = getattr(torch, case.dtype)
    student, teacher_logits = make_inputs(case.n, case.vocab, dtype, "flat", case.device)
    teacher = akl_kernels.topk_teacher(teacher_logits, case.k)
    del teacher_logits
    student.requires_grad_(True)
    fn = build(case.impl, case.kind)

    def clear_grad():
        student.grad = None

    result = time_and_peak(lambda: fn(student, teacher), clear_grad, case.device == "cuda",
                           repeats, time_forward=False)
    return dict(asdict(case), **result)


def markdown(meta, records) -> str:
    bandwidth_gbs = meta.get("copy_bandwidth_gbs")
    base = {r["kind"]: r for r in records if r["impl"] == "plain" and "error" not in r}
    plain = base.get("fkl")
    n, vocab, k, dtype = (records[0][x] for x in ("n", "vocab", "k", "dtype"))
    floor = floor_ms(sparse_floor_bytes(n, vocab, k, dtype), bandwidth_gbs)
    lines = [
        f"# Sparse teachers: {meta['device_name']}",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, {meta['date']}. N = {n}, V = {vocab}, "
        f"k = {k}, {dtype} student, float32 top-k teacher (bucket tail); forward+backward; "
        "peak memory above the inputs (gradient included). Ratios are to the plain PyTorch FKL "
        "measured in the same run" + (f"; floor {fmt(floor)} ms at {fmt(bandwidth_gbs)} GB/s"
                                      if floor else "") + ".",
        "",
        "| loss | implementation | fwd+bwd ms | plain / this (speed-up) | peak MiB "
        "| x plain memory | x floor | loss value |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['kind']} | {r['impl']} | error: {r['error'][:80]} | | | | | |")
            continue
        t = r["forward_backward_ms"]
        speedup = plain["forward_backward_ms"] / t if plain else None
        memory = r["peak_extra_bytes"] / plain["peak_extra_bytes"] if plain else None
        lines.append(
            f"| {r['kind']} | {r['impl']} | {fmt(t)} | {fmt(speedup)} "
            f"| {fmt(r['peak_extra_bytes'] / 2**20, 4)} | {fmt(memory)} "
            f"| {fmt(t / floor) if floor else '-'} | {fmt(r['loss'], 5)} |")
    return "\n".join(lines) + "\n"


GRID = grid.Grid("sparse_teacher", __doc__, Case, ("N", "V", "K"), DEFAULT_SHAPES, IMPLS, run_case,
                 unavailable, markdown, kinds=("fkl", "akl"), floor=True)


def main(argv=None):
    return grid.main(GRID, argv)


if __name__ == "__main__":
    sys.exit(main())
