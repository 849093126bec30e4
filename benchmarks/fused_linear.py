"""Fused linear losses against the unfused path and Liger-Kernel's fused linear JSD.

    python -m benchmarks.fused_linear                  # CPU: N 4096, H 1024, V 32000, float32
    python -m benchmarks.fused_linear --device cuda    # N 8192, H 4096, V 128256, bfloat16

Every implementation gets the same student hidden states and head weight and the same teacher
hidden states and head weight, and returns the token mean over all rows:
- ``fused``: this library's ``fused_linear_loss`` (teacher given as hidden states + weight)
  with its default strategy ("forward_gradient": the gradients formed in the forward pass
  from whole-row tiles, 4 GEMMs) and 256 MiB tile budget;
- ``fused_recompute``: the same with ``strategy="recompute"`` (logits recomputed per
  vocabulary block in backward: 6 GEMMs, the leanest memory); ``fused_recompute_budget1024``
  that with 1 GiB of tiles (``AKL_FUSED_LINEAR_BUDGET_MB``);
- ``unfused``: ``hidden @ weight.T`` for both models in the inputs' dtype (the teacher's under
  ``no_grad``), then this library's loss on those logits, as a training step without fusion
  would do;
- ``liger_fljsd``: Liger-Kernel's Triton ``LigerFusedLinearJSD`` at beta 0 (forward KL),
  CUDA only;
- ``liger_fljsd_loss``: Liger-Kernel's ``chunked_loss.LigerFusedLinearJSDLoss`` (torch.compile)
  at beta 0 with its hard-label weight 0 (forward KL).
Metrics per case: the median forward+backward time (gradients for the student's hidden states
and weight) after a warm-up call, and the peak memory above the inputs during it (CUDA:
``max_memory_allocated``; CPU: the peak resident memory of a fresh process per case).
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import asdict, dataclass

import torch

import akl_kernels
from akl_kernels import fused_linear_sweeps
from benchmarks import grid
from benchmarks.common import fmt
from benchmarks.measure import time_and_peak

IMPLS = ("fused", "fused_recompute", "fused_recompute_budget1024", "unfused", "liger_fljsd",
         "liger_fljsd_loss")
# The contract's fused linear shape on GPU (docs/contract.md §4), per device: (N, H, V, dtype).
DEFAULT_SHAPES = {"cpu": (4096, 1024, 32000, "float32"), "cuda": (8192, 4096, 128256, "bfloat16")}


@dataclass(frozen=True)
class Case:
    impl: str
    kind: str
    n: int
    hidden: int
    vocab: int
    dtype: str
    device: str


def _fused(kind, budget_mb=fused_linear_sweeps.DEFAULT_BUDGET_MB, strategy="auto"):
    def run(h, w, th, tw, labels):
        os.environ["AKL_FUSED_LINEAR_BUDGET_MB"] = str(budget_mb)  # read at each call
        return akl_kernels.fused_linear_loss(h, w, labels, divergence=kind, teacher_hidden=th,
                                             teacher_weight=tw, strategy=strategy)

    return run


def _unfused(kind):
    def run(h, w, th, tw, labels):
        with torch.no_grad():
            teacher_logits = th @ tw.T
        return akl_kernels.divergence_loss(h @ w.T, teacher_logits, labels, divergence=kind)

    return run


def _liger_fljsd(kind):
    from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

    loss = LigerFusedLinearJSD(jsd_beta=0.0)  # beta 0: KL(teacher || student), FKL
    return loss


def _liger_fljsd_loss(kind):
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    loss = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0)
    return loss


BUILDERS = {"fused": _fused,
            "fused_recompute": lambda kind: _fused(kind, strategy="recompute"),
            "fused_recompute_budget1024": lambda kind: _fused(kind, 1024, "recompute"),
            "unfused": _unfused, "liger_fljsd": _liger_fljsd,
            "liger_fljsd_loss": _liger_fljsd_loss}


def unavailable(impl, kind, device):
    """Why a case cannot run, or None."""
    if impl.startswith("liger"):
        if kind != "fkl":
            return "Liger-Kernel's fused linear JSD computes FKL (beta 0), not " + kind
        try:
            import liger_kernel  # noqa: F401
        except ImportError:
            return "liger-kernel is not installed"
        if impl == "liger_fljsd" and device != "cuda":
            return "LigerFusedLinearJSD is a Triton kernel: CUDA only"
    return None


def make_head_inputs(n, hidden, vocab, dtype, device, seed=0):
    """Hidden states ~ N(0, 1) and head weights scaled so that the student's logits have a
    standard deviation of about 2 and the teacher's about 4 (a peakier teacher)."""
    gen = torch.Generator(device=device).manual_seed(seed)

    def normal(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device=device) * scale).to(dtype)

    student_hidden, teacher_hidden = normal(n, hidden), normal(n, hidden)
    student_weight = normal(vocab, hidden, scale=2.0 / math.sqrt(hidden))
    teacher_weight = normal(vocab, hidden, scale=4.0 / math.sqrt(hidden))
    labels = torch.randint(0, vocab, (n,), generator=gen, device=device)
    return student_hidden, student_weight, teacher_hidden, teacher_weight, labels


def run_case(case: Case, repeats: int) -> dict:
    fn = BUILDERS[case.impl](case.kind)
    h, w, th, tw, labels = make_head_inputs(case.n, case.hidden, case.vocab,
                                            getattr(torch, case.dtype), case.device)
    h.requires_grad_(True)
    w.requires_grad_(True)

    def clear_grad():
        h.grad = w.grad = None

    result = time_and_peak(lambda: fn(h, w, th, tw, labels), clear_grad, case.device == "cuda",
                           repeats, time_forward=False)
    return dict(asdict(case), **result)


def markdown(meta, records) -> str:
    base = {r["kind"]: r for r in records if r["impl"] == "unfused" and "error" not in r}
    n, hidden, vocab, dtype = (records[0][k] for k in ("n", "hidden", "vocab", "dtype"))
    lines = [
        f"# Fused linear losses: {meta['device_name']}",
        "",
        f"torch {meta['torch']}, triton {meta['triton']}, {meta['date']}. N = {n}, H = {hidden}, "
        f"V = {vocab}, {dtype}; student and teacher heads of the same shape; forward+backward "
        "(gradients for the student's hidden states and weight); peak memory above the inputs "
        "(gradients included). Ratios are to the unfused path measured in the same run.",
        "",
        "| loss | implementation | fwd+bwd ms | x unfused time | peak MiB | x unfused memory "
        "| loss value |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['kind']} | {r['impl']} | error: {r['error'][:80]} | | | | |")
            continue
        ref = base.get(r["kind"])
        t_ratio = r["forward_backward_ms"] / ref["forward_backward_ms"] if ref else None
        m_ratio = r["peak_extra_bytes"] / ref["peak_extra_bytes"] if ref else None
        lines.append(
            f"| {r['kind']} | {r['impl']} | {fmt(r['forward_backward_ms'])} | {fmt(t_ratio)} "
            f"| {fmt(r['peak_extra_bytes'] / 2**20, 4)} | {fmt(m_ratio)} | {fmt(r['loss'], 5)} |")
    return "\n".join(lines) + "\n"


GRID = grid.Grid("fused_linear", __doc__, Case, ("N", "H", "V"), DEFAULT_SHAPES, IMPLS, run_case,
                 unavailable, markdown)


def main(argv=None):
    return grid.main(GRID, argv)


if __name__ == "__main__":
    sys.exit(main())
