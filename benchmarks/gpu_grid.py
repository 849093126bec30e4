"""GPU benchmark grid (SPEC section 4): Triton FKL/RKL/AKL against the memory floor and the
official-style reference, side by side in one run. Writes JSON and Markdown under --out.

    python -m benchmarks.gpu_grid --out DIR [--quick]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import triton

import akl_kernels
from akl_kernels.kernels import heuristics
from benchmarks.common import copy_bandwidth_gbs, cuda_median_ms, floor_bytes, fmt, make_inputs
from reference import official_akl

LOSSES = {"fkl": akl_kernels.fkl_loss, "rkl": akl_kernels.rkl_loss, "akl": akl_kernels.akl_loss}
N_ROWS = 16384
GRID = [  # (vocab, dtype, teacher)
    (32000, torch.bfloat16, "flat"),
    (32000, torch.bfloat16, "peaked"),
    (128256, torch.bfloat16, "flat"),
    (128256, torch.bfloat16, "peaked"),
    (262144, torch.bfloat16, "flat"),
    (262144, torch.bfloat16, "peaked"),
    (32000, torch.float32, "flat"),
    (128256, torch.float32, "flat"),
]
# The official-style reference keeps ~15 float32 N x V temporaries: it runs on the first
# rows only, and the Triton path is timed again on those same rows for the speed-up.
REFERENCE_ELEMENTS = 2**28


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def time_loss(fn, student, teacher, backward):
    """Median ms of fn (forward, or forward+backward) and the peak memory it adds."""
    s = student.detach().requires_grad_(backward)
    if backward:
        run = lambda: fn(s, teacher).backward()  # noqa: E731
    else:
        run = lambda: fn(s, teacher)  # noqa: E731
    run()  # compile / warm
    s.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    s.grad = None
    ms = cuda_median_ms(run, grad_to_none=[s] if backward else None)
    return ms, peak


def grid(records, bandwidth, quick, deadline):
    for vocab, dtype, teacher in GRID[:2] if quick else GRID:
        if time.time() > deadline:
            print(f"skipping V={vocab} {dtype} {teacher}: time budget spent", flush=True)
            continue
        n = N_ROWS
        student, teacher_logits = make_inputs(n, vocab, dtype, teacher, "cuda")
        logits_bytes = student.numel() * student.element_size()
        floor_ms = floor_bytes(n, vocab, dtype, dtype) / (bandwidth * 1e9) * 1e3
        base = dict(n=n, vocab=vocab, dtype=_dtype_name(dtype), teacher=teacher)
        for kind, fn in LOSSES.items():
            for backward in (False, True):
                ms, peak = time_loss(fn, student, teacher_logits, backward)
                extra = peak - (logits_bytes if backward else 0)  # the gradient is an output
                records.append(dict(
                    base, impl="triton", kind=kind, passes="fwd+bwd" if backward else "fwd",
                    ms=ms, floor_ms=floor_ms, x_floor=ms / floor_ms,
                    extra_mem_bytes=extra, extra_mem_frac=extra / logits_bytes,
                ))
                print(json.dumps(records[-1]), flush=True)
        n_ref = min(n, REFERENCE_ELEMENTS // vocab)
        s_ref, t_ref = student[:n_ref], teacher_logits[:n_ref]
        ref_base = dict(base, n=n_ref)
        for impl, fn in (("official", official_akl), ("triton", akl_kernels.akl_loss)):
            ms, peak = time_loss(fn, s_ref, t_ref, True)
            records.append(dict(ref_base, impl=impl, kind="akl", passes="fwd+bwd", ms=ms,
                                extra_mem_bytes=peak - s_ref.numel() * s_ref.element_size()))
            print(json.dumps(records[-1]), flush=True)
        del student, teacher_logits, s_ref, t_ref
        torch.cuda.empty_cache()


FORWARD_SWEEP = {  # kernel -> launch overrides tried (V = 128256, bf16, flat teacher)
    "fkl": [dict(), dict(BLOCK=2048, num_warps=8), dict(BLOCK=1024, num_warps=8),
            dict(BLOCK=2048, num_warps=16), dict(BLOCK=4096, num_warps=16)],
    "akl": [dict(), dict(PIVOTS=2), dict(PIVOTS=8), dict(SEARCH_BLOCK=512),
            dict(SEARCH_BLOCK=2048, num_warps=16), dict(BLOCK=1024, num_warps=4)],
}


def launch_sweep(records, bandwidth):
    """Forward kernels under a few launch settings (N = 16384, V = 128256, bf16, flat)."""
    n, vocab, dtype = N_ROWS, 128256, torch.bfloat16
    student, teacher = make_inputs(n, vocab, dtype, "flat", "cuda")
    for kind, variants in FORWARD_SWEEP.items():
        for variant in variants:
            heuristics.FORWARD_OVERRIDES.clear()
            heuristics.FORWARD_OVERRIDES.update(variant)
            ms, _ = time_loss(LOSSES[kind], student, teacher, False)
            records.append(dict(sweep=f"{kind}_forward", n=n, vocab=vocab, dtype="bfloat16",
                                teacher="flat", launch=variant, ms=ms))
            print(json.dumps(records[-1]), flush=True)
    heuristics.FORWARD_OVERRIDES.clear()


def markdown(meta, records):
    lines = [
        f"# GPU benchmark: {meta['device']}",
        "",
        f"Measured {meta['date']} with `python -m benchmarks.gpu_grid` (torch {meta['torch']}, "
        f"triton {meta['triton']}). Copy bandwidth (read+write) measured in the same run: "
        f"{meta['copy_bandwidth_gbs']:.0f} GB/s. Median of `triton.testing.do_bench` repeats "
        "(CUDA events, warm-up excluded). Floor = N*V*(2*bytes(s)+bytes(t)) / copy bandwidth. "
        "Extra memory = peak allocated above the inputs, minus the gradient, as a fraction of "
        "one logits tensor.",
        "",
        "| V | dtype | teacher | loss | fwd ms | fwd+bwd ms | floor ms | fwd+bwd / floor "
        "| extra mem |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    main = [r for r in records if r.get("impl") == "triton" and r["n"] == N_ROWS]
    main = [r for r in main if "sweep" not in r]
    for r in main:
        if r["passes"] != "fwd+bwd":
            continue
        fwd = next(x for x in main if x["passes"] == "fwd" and all(
            x[k] == r[k] for k in ("vocab", "dtype", "teacher", "kind")))
        lines.append(
            f"| {r['vocab']} | {r['dtype']} | {r['teacher']} | {r['kind']} | {fmt(fwd['ms'])} "
            f"| {fmt(r['ms'])} | {fmt(r['floor_ms'])} | {r['x_floor']:.2f}x "
            f"| {100 * r['extra_mem_frac']:.3f}% |"
        )
    lines += ["", "AKL forward+backward against the official-style reference (eager), same rows:",
              "", "| V | dtype | teacher | rows | official ms | triton ms | speed-up "
              "| official extra mem GiB | triton extra mem GiB |",
              "|---|---|---|---|---|---|---|---|---|"]
    ref_rows = [r for r in records if r.get("impl") == "official"]
    for r in ref_rows:
        tri = next(x for x in records if x.get("impl") == "triton" and x["n"] == r["n"]
                   and x["kind"] == "akl" and x["passes"] == "fwd+bwd"
                   and all(x[k] == r[k] for k in ("vocab", "dtype", "teacher")))
        lines.append(
            f"| {r['vocab']} | {r['dtype']} | {r['teacher']} | {r['n']} | {fmt(r['ms'])} "
            f"| {fmt(tri['ms'])} | {r['ms'] / tri['ms']:.1f}x | {r['extra_mem_bytes'] / 2**30:.2f} "
            f"| {tri['extra_mem_bytes'] / 2**30:.2f} |"
        )
    sweep = [r for r in records if "sweep" in r]
    if sweep:
        lines += ["", "Launch settings (N=16384, V=128256, bf16, flat):", "",
                  "| kernel | settings | ms |", "|---|---|---|"]
        lines += [f"| {r['sweep']} | {r['launch']} | {fmt(r['ms'])} |" for r in sweep]
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--quick", action="store_true", help="two shapes, no launch sweep")
    parser.add_argument("--sweep-only", action="store_true", help="only the launch sweep")
    parser.add_argument("--budget-s", type=float, default=240.0, help="stop starting new shapes")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + args.budget_s
    bandwidth = copy_bandwidth_gbs("cuda")
    meta = dict(
        device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
        python=platform.python_version(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        copy_bandwidth_gbs=bandwidth,
    )
    print(json.dumps(meta), flush=True)
    records = []
    if not args.sweep_only:
        grid(records, bandwidth, args.quick, deadline)
    if args.sweep_only or (not args.quick and time.time() < deadline):
        launch_sweep(records, bandwidth)
    (args.out / "gpu_grid.json").write_text(json.dumps(dict(meta=meta, records=records), indent=1))
    table = markdown(meta, records)
    (args.out / "gpu_grid.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
