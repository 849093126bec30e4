"""Parity of this library's backends against the float64 reference on fresh random inputs."""

from __future__ import annotations

import time

import torch

import akl_kernels
import reference
from benchmarks.common import make_inputs
from benchmarks.implementations import KINDS


def parity(device, n=64, vocab=32000):
    """Largest error of the per-row loss and the gradient's relative error, per backend."""
    backends = ["torch"] + (["triton"] if device == "cuda" else [])
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for teacher in ("flat", "peaked"):
            student, teacher_logits = make_inputs(n, vocab, dtype, teacher, device,
                                                  seed=time.time_ns() % 2**31)
            s64 = student.detach().double().cpu()
            t64 = teacher_logits.double().cpu()
            for kind in KINDS:
                s_ref = s64.clone().requires_grad_(True)
                ref = reference.reference_loss(kind, s_ref, t64, reduction="none")
                ref.sum().backward()
                for backend in backends:
                    s = student.detach().requires_grad_(True)
                    loss_fn = getattr(akl_kernels, f"{kind}_loss")
                    out = loss_fn(s, teacher_logits, backend=backend, reduction="none")
                    out.sum().backward()
                    grad = s.grad.double().cpu()
                    rows.append(dict(
                        dtype=str(dtype).removeprefix("torch."), teacher=teacher,
                        backend=backend, kind=kind, n=n, vocab=vocab,
                        max_abs_loss_err=(out.double().cpu() - ref.detach()).abs().max().item(),
                        grad_rel_err=((grad - s_ref.grad).norm() / s_ref.grad.norm()).item(),
                    ))
    return rows


def parity_markdown(rows):
    n, vocab = rows[0]["n"], rows[0]["vocab"]
    lines = [f"Parity against the float64 reference ({n} rows, V = {vocab}, fresh random "
             "data each run):", "",
             "| dtype | teacher | backend | loss | max abs error of the loss rows "
             "| gradient rel. error |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['dtype']} | {r['teacher']} | {r['backend']} | {r['kind']} "
              f"| {r['max_abs_loss_err']:.2e} | {r['grad_rel_err']:.2e} |" for r in rows]
    return lines
