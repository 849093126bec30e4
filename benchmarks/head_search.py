"""The Triton kernel's two exact head searches side by side: AKL forward+backward with the
pivot search (the default) and with the radix select (``AKL_TRITON_HEAD_SEARCH=radix``),
against the library's FKL and the floor, with the reads of the teacher row each search made
(docs/kernels.md). What decides whether radix becomes the default.

    python -m benchmarks.head_search --out DIR                (CUDA: the contract's GPU grid)
    python -m benchmarks.head_search --device cpu --n 4 --vocab 1000 --out DIR
                                                   (the Triton interpreter: a check, not a timing)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
from pathlib import Path
from unittest import mock

import torch

import akl_kernels
from akl_kernels.backends.triton import forward_kernel as triton_forward
from akl_kernels.config import make_config
from benchmarks.common import (
    copy_bandwidth_gbs,
    cpu_median_ms,
    cuda_median_ms,
    device_meta,
    floor_bytes,
    floor_ms,
    make_inputs,
)

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def _forward_backward_ms(loss_fn, student, teacher, cuda):
    leaf = student.detach().requires_grad_(True)

    def step():
        loss_fn(leaf, teacher, backend="triton").backward()

    step()  # compiles this specialisation outside the timing
    clear = lambda: setattr(leaf, "grad", None)  # noqa: E731
    return cuda_median_ms(step, setup=clear) if cuda else cpu_median_ms(step, setup=clear)


def measure(n, vocab, dtype, teacher_kind, device, bandwidth):
    student, teacher = make_inputs(n, vocab, DTYPES[dtype], teacher_kind, device)
    cuda = device == "cuda"
    record = dict(n=n, vocab=vocab, dtype=dtype, teacher=teacher_kind,
                  fkl_ms=_forward_backward_ms(akl_kernels.fkl_loss, student, teacher, cuda))
    cfg = make_config("akl", dict(mu=0.5), temperature=1.0)
    for search in ("pivot", "radix"):
        with mock.patch.dict(os.environ, {"AKL_TRITON_HEAD_SEARCH": search}):
            record[f"akl_{search}_ms"] = _forward_backward_ms(akl_kernels.akl_loss, student,
                                                              teacher, cuda)
        reads = triton_forward.teacher_reads(student, teacher, cfg, search=search).float()
        record[f"{search}_reads_mean"] = reads.mean().item()
        record[f"{search}_reads_max"] = reads.max().item()
    if bandwidth:
        record["floor_ms"] = floor_ms(floor_bytes(n, vocab, student.dtype, teacher.dtype),
                                      bandwidth)
    return record


def render(records, meta) -> str:
    lines = [f"# Head search: pivot against radix ({meta['device_name']}, {meta['date']})", "",
             "AKL forward+backward, ms (x the library's FKL); reads of the teacher row per row "
             "in the forward pass, mean / max.", "",
             "| N | V | dtype | teacher | FKL ms | AKL pivot | AKL radix | reads pivot | "
             "reads radix | floor ms |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        akl = {s: f"{r[f'akl_{s}_ms']:.2f} ({r[f'akl_{s}_ms'] / r['fkl_ms']:.2f}x)"
               for s in ("pivot", "radix")}
        reads = {s: f"{r[f'{s}_reads_mean']:.1f} / {r[f'{s}_reads_max']:.0f}"
                 for s in ("pivot", "radix")}
        floor = f"{r['floor_ms']:.2f}" if "floor_ms" in r else "-"
        lines.append(f"| {r['n']} | {r['vocab']} | {r['dtype']} | {r['teacher']} | "
                     f"{r['fkl_ms']:.2f} | {akl['pivot']} | {akl['radix']} | {reads['pivot']} | "
                     f"{reads['radix']} | {floor} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256, 262144])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16"], choices=sorted(DTYPES))
    parser.add_argument("--teachers", nargs="+", default=["flat", "peaked"],
                        choices=["flat", "peaked"])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    meta = device_meta(args.device)
    bandwidth = copy_bandwidth_gbs(args.device) if args.device == "cuda" else None
    meta["copy_bandwidth_gbs"] = bandwidth
    records = []
    args.out.mkdir(parents=True, exist_ok=True)
    for vocab, dtype, teacher in itertools.product(args.vocab, args.dtypes, args.teachers):
        records.append(measure(args.n, vocab, dtype, teacher, args.device, bandwidth))
        print(json.dumps(records[-1]), flush=True)
        (args.out / "head_search.json").write_text(
            json.dumps(dict(meta=meta, records=records), indent=1))
    (args.out / "head_search.md").write_text(render(records, meta))
    return records


if __name__ == "__main__":
    main()
