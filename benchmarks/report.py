"""Parity-and-speed report on this machine (the README's main job).

1. Parity: for each loss and backend available here, the largest error of the per-row loss and
   the relative gradient error against the float64 reference, on fresh random inputs.
2. Speed and memory: forward+backward of this library's torch backend (and Triton on CUDA)
   against the official-style reference, each case in a fresh subprocess: median wall time
   over repeats after a warm-up, and the peak resident memory above the inputs (CPU) or the
   peak allocated memory above the inputs (CUDA).

    python -m benchmarks.report [--n 4096] [--vocab 32000] [--quick] [--out DIR]

Results go to benchmarks/results/<cpu|cuda>/report_<device>.{json,md}.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

LOSS_NAMES = ("fkl", "rkl", "akl")


def _loss_fn(impl, kind):
    if impl == "official":
        import reference

        return getattr(reference, f"official_{kind}")
    import akl_kernels

    fn = getattr(akl_kernels, f"{kind}_loss")
    return lambda s, t: fn(s, t, backend=impl)


# --- one timed case, run in a fresh interpreter -------------------------------------------


def _rss_bytes(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss():
    # Writing 5 to clear_refs resets VmHWM (the peak RSS) to the current RSS (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")


def run_case(impl, kind, n, vocab, dtype_name, device, repeats):
    from benchmarks.common import cpu_median_ms, cuda_median_ms, make_inputs

    dtype = getattr(torch, dtype_name)
    student, teacher = make_inputs(n, vocab, dtype, "flat", device)
    student.requires_grad_(True)
    fn = _loss_fn(impl, kind)

    def step():
        fn(student, teacher).backward()
        student.grad = None

    # Run once on two rows first: the library code pages and thread pools that any first call
    # loads are then part of the baseline, not of the measured peak.
    small_s, small_t = make_inputs(2, vocab, dtype, "flat", device, seed=1)
    fn(small_s.requires_grad_(True), small_t).backward()
    del small_s, small_t
    gc.collect()
    if device == "cuda":
        step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn(student, teacher).backward()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        student.grad = None
        ms = cuda_median_ms(step)
    else:
        base = _rss_bytes("VmRSS")
        _reset_peak_rss()
        ms = cpu_median_ms(step, repeats=repeats, warmup=1)
        peak = _rss_bytes("VmHWM") - base
    return dict(impl=impl, kind=kind, n=n, vocab=vocab, dtype=dtype_name, device=device,
                median_ms=ms, peak_extra_bytes=peak, repeats=repeats)


def measure_in_subprocess(impl, kind, n, vocab, dtype_name, device, repeats):
    cmd = [sys.executable, "-m", "benchmarks.report", "--case",
           json.dumps([impl, kind, n, vocab, dtype_name, device, repeats])]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"case {impl}/{kind} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- parity --------------------------------------------------------------------------------


def parity(device):
    import akl_kernels
    import reference
    from benchmarks.common import make_inputs

    backends = ["torch"] + (["triton"] if device == "cuda" else [])
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        student, teacher = make_inputs(64, 32000, dtype, "flat", device, seed=int(time.time()))
        for backend in backends:
            for kind in LOSS_NAMES:
                s = student.detach().requires_grad_(True)
                loss_fn = getattr(akl_kernels, f"{kind}_loss")
                out = loss_fn(s, teacher, backend=backend, reduction="none")
                out.sum().backward()
                s64 = student.detach().double().cpu().requires_grad_(True)
                ref = reference.reference_loss(kind, s64, teacher.double().cpu(), reduction="none")
                ref.sum().backward()
                grad_err = ((s.grad.double().cpu() - s64.grad).norm() / s64.grad.norm()).item()
                loss_err = (out.double().cpu() - ref.detach()).abs().max().item()
                rows.append(dict(dtype=str(dtype).replace("torch.", ""), backend=backend,
                                 kind=kind, max_abs_loss_err=loss_err, grad_rel_err=grad_err))
    return rows


def markdown(meta, parity_rows, speed_rows):
    lines = [f"# Parity and speed report: {meta['device_name']}", "",
             f"Measured {meta['date']} with `python -m benchmarks.report` on {meta['device_name']}"
             f" ({meta['cpus']} CPU cores; torch {meta['torch']}).", "",
             "## Parity against the float64 reference (64 rows, V = 32000, fresh random data)", "",
             "| dtype | backend | loss | max abs error of the loss rows | gradient rel. error |",
             "|---|---|---|---|---|"]
    lines += [f"| {r['dtype']} | {r['backend']} | {r['kind']} | {r['max_abs_loss_err']:.2e} "
              f"| {r['grad_rel_err']:.2e} |" for r in parity_rows]
    if speed_rows:
        first = speed_rows[0]
        lines += ["", f"## Forward+backward, N = {first['n']}, V = {first['vocab']}, "
                  f"{first['dtype']}, {first['device']}", "",
                  "Median over repeats after one warm-up; peak memory above the inputs, each "
                  "case in a fresh process.", "",
                  "| loss | implementation | median ms | peak extra MiB | speed-up vs official "
                  "| memory vs official |", "|---|---|---|---|---|---|"]
        for r in speed_rows:
            off = next(x for x in speed_rows if x["impl"] == "official" and x["kind"] == r["kind"])
            lines.append(
                f"| {r['kind']} | {r['impl']} | {r['median_ms']:.0f} "
                f"| {r['peak_extra_bytes'] / 2**20:.0f} | {off['median_ms'] / r['median_ms']:.2f}x "
                f"| {r['peak_extra_bytes'] / max(off['peak_extra_bytes'], 1):.3f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="N = 512, one repeat")
    parser.add_argument("--out", type=Path, default=None,
                        help="where JSON and Markdown go (default benchmarks/results/<device>)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(run_case(*json.loads(args.case))))
        return
    from tqdm import tqdm

    if args.quick:
        args.n, args.repeats = 512, 1
    device = "cuda" if torch.cuda.is_available() else "cpu"
    device_name = torch.cuda.get_device_name() if device == "cuda" else (
        f"CPU ({platform.processor() or platform.machine()})")
    meta = dict(device_name=device_name, cpus=os.cpu_count(), torch=torch.__version__,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    print("parity against the float64 reference ...", flush=True)
    parity_rows = parity(device)
    impls = ["torch"] + (["triton"] if device == "cuda" else [])
    cases = [("official", k) for k in LOSS_NAMES] + [(i, k) for i in impls for k in LOSS_NAMES]
    speed_rows = []
    for impl, kind in tqdm(cases, desc="timing (fresh process per case)"):
        speed_rows.append(measure_in_subprocess(impl, kind, args.n, args.vocab, args.dtype,
                                                device, args.repeats))
    table = markdown(meta, parity_rows, speed_rows)
    args.out = args.out or Path("benchmarks/results") / device
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"report_{device}"
    (args.out / f"{stem}.json").write_text(
        json.dumps(dict(meta=meta, parity=parity_rows, speed=speed_rows), indent=1))
    (args.out / f"{stem}.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
