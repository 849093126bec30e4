"""The benchmark report: this library against the official-style reference, torch.compile and
Liger-Kernel.

Measures on the current device, side by side in one run, every implementation in
``benchmarks/implementations.py`` that runs here, on the same inputs: median forward and
forward+backward time after a warm-up, and the peak memory above the inputs (CUDA: the
allocator's peak, in this process; CPU: the peak resident memory of a fresh subprocess per
case). On CUDA every time is also a multiple of the floor of docs/contract.md §4, with the
copy bandwidth
measured in the same run. Prints a table and writes JSON, Markdown and PNG plots.

    python -m benchmarks [--quick] [--n 512 2048] [--vocab 32000] [--losses akl] [--out DIR]
    ./run.sh bench ...   (the same, after setting up the environment)

Results go to benchmarks/results/local/<device> (ignored by git) unless ``--out`` says where:
the committed tables under benchmarks/results/ are written only when asked for.

A case whose implementation would not fit in memory runs on the largest power-of-two fraction
of the rows that does, and this library is then timed on those rows too, so that every
comparison is between equal inputs.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import TEACHERS, copy_bandwidth_gbs, device_meta, floor_bytes, floor_ms
from benchmarks.implementations import FAMILY, IMPLEMENTATIONS, KINDS, LIBRARY
from benchmarks.measure import Case, measure

GRIDS = {  # the default grid per device: rows, vocabularies
    "cpu": dict(n=[512, 2048, 4096], vocab=[32000, 128256]),
    "cuda": dict(n=[16384], vocab=[32000, 128256, 151936, 262144]),
}
# --quick: under a minute on 2 CPU cores. torch.compile is left out there because compiling
# the reference takes ~15 s per loss on such a machine.
QUICK = {
    "cpu": dict(n=[256], vocab=[32000], dtypes=["float32"], teachers=["flat"],
                impls=["torch", "official", "kl_div"], repeats=2),
    "cuda": dict(n=[4096], vocab=[32000, 128256], dtypes=["bfloat16"], teachers=["flat"]),
}
# Which implementations go first: with --budget-s the last ones are the first to be dropped.
PRIORITY = {
    "cpu": ["torch", "official", "official+compile", "kl_div"],
    "cuda": ["triton", "official", "official+compile", "liger_jsd", "liger_kldiv", "kl_div",
             "torch"],
}
# Only AKL does work that depends on the teacher's values (the head search); FKL and RKL cost
# the same on any teacher, so they are timed on the flat one unless --every-teacher is given.
VALUE_DEPENDENT = ("akl", "distill_akl")
MEMORY_HEADROOM = 0.8  # plan cases to use at most this share of the free memory


def free_memory_bytes(device):
    if device == "cuda":
        torch.cuda.empty_cache()  # what earlier steps left in the allocator's cache is free
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable not in /proc/meminfo")


def rows_that_fit(impl, n, vocab, dtype, free_bytes):
    """The largest n / 2**k rows whose inputs and the implementation's temporaries fit."""
    size = getattr(torch, dtype).itemsize
    per_row = vocab * (2 * size + IMPLEMENTATIONS[impl].bytes_per_element(size))
    while n >= 1 and n * per_row > MEMORY_HEADROOM * free_bytes:
        n //= 2
    return n


def plan(args, device):
    """The cases to measure, in priority order, and what is skipped with the reason."""
    free = free_memory_bytes(device)
    rank = {impl: i for i, impl in enumerate(PRIORITY[device])}
    order = sorted(args.impls, key=lambda impl: rank.get(impl, len(rank)))
    skipped = [dict(impl=impl, skipped=IMPLEMENTATIONS[impl].unavailable(device))
               for impl in order if IMPLEMENTATIONS[impl].unavailable(device)]
    order = [impl for impl in order if not IMPLEMENTATIONS[impl].unavailable(device)]
    library_here = [impl for impl in LIBRARY if impl in order]
    cases = []
    for impl in order:
        for n, vocab, dtype, teacher, kind in itertools.product(
                args.n, args.vocab, args.dtypes, args.teachers, args.losses):
            if kind not in IMPLEMENTATIONS[impl].kinds or (
                    impl == "official+compile" and kind not in args.compile_losses):
                continue
            if teacher != "flat" and kind not in VALUE_DEPENDENT and not args.every_teacher:
                continue
            rows = rows_that_fit(impl, n, vocab, dtype, free)
            if rows < 1:
                skipped.append(dict(vars(Case(impl, kind, n, vocab, dtype, teacher, device)),
                                    skipped="does not fit in memory"))
                continue
            cases.append(Case(impl, kind, rows, vocab, dtype, teacher, device))
            if rows < n:  # the library on the same reduced rows, for a like-for-like ratio
                cases += [Case(lib, kind, rows, vocab, dtype, teacher, device)
                          for lib in library_here]
    unique = list(dict.fromkeys(cases))
    unique.sort(key=lambda c: order.index(c.impl))  # stable: grid order within an impl
    return unique, skipped


# --- tables --------------------------------------------------------------------------------

CONFIG = ("n", "vocab", "dtype", "teacher")


def _same_inputs(a, b):
    return all(a[k] == b[k] for k in (*CONFIG, "kind"))


TIMES = ("forward_ms", "forward_backward_ms")


def interleaved(cases):
    """The cases with every implementation of the same inputs back to back (priority order
    within), for --rounds: a drift of the machine's speed then hits the cases a ratio pairs
    alike."""
    return sorted(cases, key=lambda c: tuple(getattr(c, k) for k in (*CONFIG, "kind")))


def combine_rounds(records):
    """One record per case from its records of every round (--rounds): each time the median
    of the rounds', the rounds' times kept beside it (``forward_ms_rounds``, ...), the peak
    memory the largest of the rounds'. A case measured once is kept as it is; a case that
    failed in any round is its failure."""
    by_case = {}
    for r in records:
        by_case.setdefault(Case(*(r[k] for k in Case.__dataclass_fields__)), []).append(r)
    combined = []
    for runs in by_case.values():
        failed = next((r for r in runs if "error" in r), None)
        record = {k: v for k, v in (failed or runs[0]).items() if k != "round"}
        if failed or len(runs) == 1:
            combined.append(record)
            continue
        for key in TIMES:
            record[f"{key}_rounds"] = [r[key] for r in runs]
            record[key] = statistics.median(record[f"{key}_rounds"])
        record["peak_extra_bytes"] = max(r["peak_extra_bytes"] for r in runs)
        record["rounds"] = len(runs)
        combined.append(record)
    return combined


def time_ratio(numerator, denominator, key="forward_backward_ms"):
    """numerator's time over denominator's. Measured in rounds, the median of the per-round
    ratios (each round times both cases close together), else the ratio of the times."""
    a, b = numerator.get(f"{key}_rounds"), denominator.get(f"{key}_rounds")
    if a and b and len(a) == len(b):
        return statistics.median(x / y for x, y in zip(a, b, strict=True))
    return numerator[key] / denominator[key]


def annotate(records, bandwidth):
    """Add the floor and the ratios against the official-style reference on the same rows."""
    for r in records:
        if "forward_backward_ms" not in r:
            continue
        if bandwidth:
            dtype = getattr(torch, r["dtype"])
            r["floor_ms"] = floor_ms(floor_bytes(r["n"], r["vocab"], dtype, dtype), bandwidth)
            r["x_floor"] = r["forward_backward_ms"] / r["floor_ms"]
        fkl = next((o for o in records if o["impl"] == r["impl"] and o["kind"] == "fkl"
                    and "forward_backward_ms" in o
                    and all(o[k] == r[k] for k in ("n", "vocab", "dtype"))), None)
        if fkl:  # the same implementation's FKL on the same shape
            r["x_own_fkl"] = time_ratio(r, fkl)
        official = next((o for o in records if o["impl"] == "official"
                         and "forward_backward_ms" in o and _same_inputs(o, r)), None)
        if official:
            r["speedup_vs_official"] = time_ratio(official, r)
            r["memory_vs_official"] = r["peak_extra_bytes"] / max(official["peak_extra_bytes"], 1)


def summary(records, device):
    """This library against each peer on the same inputs: fwd+bwd speed-up and memory ratio."""
    library = "triton" if device == "cuda" else "torch"
    measured = [r for r in records if "forward_backward_ms" in r]
    peers = [i for i in dict.fromkeys(r["impl"] for r in measured) if i not in LIBRARY]
    lines = [f"This library (`{library}`) against each peer on the same inputs: forward+backward "
             "speed-up (> 1x: the library is faster) / the library's peak memory as a share "
             "of the peer's.", "",
             "| loss | N | V | dtype | teacher | " + " | ".join(f"vs {p}" for p in peers) + " |",
             "|---|---|---|---|---|" + "---|" * len(peers)]
    mine = sorted((r for r in measured if r["impl"] == library),
                  key=lambda r: ((KINDS + FAMILY).index(r["kind"]), r["vocab"], r["dtype"],
                                 r["teacher"], r["n"]))
    for lib in mine:
        cells = []
        for peer in peers:
            other = next((o for o in measured if o["impl"] == peer and _same_inputs(o, lib)),
                         None)
            cells.append("-" if other is None else
                         f"{time_ratio(other, lib):.2f}x / "
                         f"{lib['peak_extra_bytes'] / max(other['peak_extra_bytes'], 1):.2f}")
        if any(c != "-" for c in cells):
            lines.append(f"| {lib['kind']} | {lib['n']} | {lib['vocab']} | {lib['dtype']} "
                         f"| {lib['teacher']} | " + " | ".join(cells) + " |")
    return lines


def _ms(x):
    return "-" if x is None else (f"{x:.3g}" if x < 100 else f"{x:.0f}")


def markdown(meta, records, skipped, parity_lines, command):
    where = (f"Measured {meta['date']} on **{meta['device_name']}** by `{command}` "
             f"(torch {meta['torch']}, triton {meta['triton']}, Python {meta['python']}).")
    resumed = meta.get("resumed")
    while resumed:  # the runs this one continued (--resume), newest first
        where += (f" It continued the run started {resumed['date']} and kept the "
                  f"{resumed['cases_kept']} cases measured by then.")
        resumed = resumed.get("earlier")
    lines = [f"# Benchmark report: {meta['device_name']}", "", where]
    rounds = meta["args"].get("rounds", 1)
    if meta.get("copy_bandwidth_gbs"):
        lines += ["", f"Copy bandwidth measured in this run: {meta['copy_bandwidth_gbs']:.0f} GB/s "
                  "(bytes read + written). Floor = N*V*(2*bytes(s) + bytes(t)) / that bandwidth "
                  "(read both logits once, write the gradient once: docs/contract.md §4)."]
    lines += [
        "", "Times: median after a warm-up call "
        + ("(CUDA events, at least 5 repeats)" if meta["device"] == "cuda"
           else f"(wall clock, {records[0].get('repeats', '?') if records else '?'} repeats)")
        + (f", in {rounds} rounds: each time the median of the rounds' medians, each ratio the "
           "median of the rounds' ratios, each peak the largest of the rounds' (the cases of "
           "the same inputs ran back to back, in the reverse order every other round)"
           if rounds > 1 else "")
        + "; forward builds the autograd graph as in training. Peak: memory above the two "
        "inputs, the gradient included, "
        + ("`torch.cuda.max_memory_allocated`." if meta["device"] == "cuda"
           else "peak resident memory of a fresh process per case.")
        + " FKL and RKL do no work that depends on the teacher's values, so unless "
        "`--every-teacher` is given they are timed on the flat teacher only."
        + " Speed-up and memory ratios are against the official-style reference on the same "
        "inputs (> 1x: faster). Teachers: flat = standard-normal logits x 2; peaked = the same "
        "with one token per row raised to carry 30-90% of the mass. The student is the "
        "teacher plus unit Gaussian noise.", "",
        "Implementations: " + "; ".join(f"`{i}`: {IMPLEMENTATIONS[i].note}"
                                        for i in dict.fromkeys(r["impl"] for r in records)) + ".",
    ]
    measured = [r for r in records if "forward_backward_ms" in r]
    lines += ["", "## Summary", "", *summary(records, meta["device"])]
    for kind in KINDS + FAMILY:
        rows = [r for r in measured if r["kind"] == kind]
        if not rows:
            continue
        gpu = meta["device"] == "cuda"
        lines += ["", f"## {kind.upper()}", "",
                  "| N | V | dtype | teacher | implementation | fwd ms | fwd+bwd ms "
                  "| peak MiB | vs official: speed | vs official: memory "
                  + ("| x floor " if gpu else "") + "| time / own FKL | loss |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else "")]
        rows.sort(key=lambda r: (r["vocab"], r["dtype"], r["teacher"], r["n"]))
        for r in rows:
            speed = r.get("speedup_vs_official")
            mem = r.get("memory_vs_official")
            own_fkl = f"{r['x_own_fkl']:.2f}x" if "x_own_fkl" in r else "-"
            lines.append(
                f"| {r['n']} | {r['vocab']} | {r['dtype']} | {r['teacher']} | {r['impl']} "
                f"| {_ms(r['forward_ms'])} | {_ms(r['forward_backward_ms'])} "
                f"| {r['peak_extra_bytes'] / 2**20:.0f} "
                f"| {'-' if speed is None else f'{speed:.2f}x'} "
                f"| {'-' if mem is None else f'{mem:.3f}'} "
                + (f"| {r['x_floor']:.2f}x " if gpu else "")
                + f"| {own_fkl} | {r['loss']:.5g} |")
    failed = [r for r in records if "error" in r]
    if failed or skipped:
        lines += ["", "## Not measured", ""]
        for r in skipped + failed:
            what = " ".join(f"{k}={r[k]}" for k in ("kind", "n", "vocab", "dtype", "teacher")
                            if k in r)
            lines.append(f"- {r['impl']} {what}: {r.get('skipped') or r.get('error', '')[:300]}")
    if parity_lines:
        lines += ["", "## Parity", "", *parity_lines]
    return "\n".join(lines) + "\n"


def plot(records, meta, out, n):
    """One PNG per dtype: time and peak memory against V at N = n rows, a colour per
    implementation, solid for the flat teacher and dashed for the peaked one.

    Cases that ran on fewer rows (they did not fit at n) are left out of the plot; the table
    has them.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [r for r in records if "forward_backward_ms" in r and r["n"] == n]
    colours = {impl: f"C{i}" for i, impl in enumerate(IMPLEMENTATIONS)}
    paths = []
    for dtype in sorted({r["dtype"] for r in measured}):
        subset = [r for r in measured if r["dtype"] == dtype]
        kinds = [k for k in KINDS + FAMILY if any(r["kind"] == k for r in subset)]
        fig, axes = plt.subplots(len(kinds), 2, figsize=(11, 3.4 * len(kinds)), squeeze=False)
        for row, kind in zip(axes, kinds, strict=True):
            lines = dict.fromkeys((r["impl"], r["teacher"]) for r in subset if r["kind"] == kind)
            for impl, teacher in lines:
                mine = sorted((r for r in subset if r["kind"] == kind and r["impl"] == impl
                               and r["teacher"] == teacher), key=lambda r: r["vocab"])
                style = dict(color=colours[impl], marker="o",
                             linestyle="-" if teacher == "flat" else "--",
                             label=f"{impl} ({teacher})")
                vocab = [r["vocab"] for r in mine]
                row[0].plot(vocab, [r["forward_backward_ms"] for r in mine], **style)
                row[1].plot(vocab, [r["peak_extra_bytes"] / 2**20 for r in mine], **style)
            row[0].set_ylabel(f"{kind.upper()} fwd+bwd ms")
            row[1].set_ylabel(f"{kind.upper()} peak MiB above inputs")
            for ax in row:
                ax.set_xscale("log")
                ax.set_yscale("log")
                ax.set_xlabel("vocabulary V")
                ax.grid(True, which="both", alpha=0.3)
            row[0].legend(fontsize=7)
        fig.suptitle(f"{meta['device_name']}: N = {n}, {dtype} ({meta['date']})", fontsize=10)
        fig.tight_layout()
        path = out / f"bench_{meta['device']}_{dtype}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# --- the command ---------------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="python -m benchmarks",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"],
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--n", type=int, nargs="+", help="rows (default: per device)")
    parser.add_argument("--vocab", type=int, nargs="+", help="vocabularies (default: per device)")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"],
                        choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--teachers", nargs="+", default=list(TEACHERS), choices=TEACHERS)
    parser.add_argument("--every-teacher", action="store_true",
                        help="time FKL and RKL on every teacher too (their cost does not "
                        "depend on it)")
    parser.add_argument("--losses", nargs="+", default=list(KINDS), choices=KINDS + FAMILY,
                        help=f"default {' '.join(KINDS)}; also {' '.join(FAMILY)}")
    parser.add_argument("--impls", nargs="+", default=list(IMPLEMENTATIONS),
                        choices=list(IMPLEMENTATIONS))
    parser.add_argument("--compile-losses", nargs="+", default=list(KINDS), choices=KINDS,
                        help="losses for which official+compile runs (compiling takes time)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per case on CPU")
    parser.add_argument("--rounds", type=int, default=1,
                        help="measure the whole grid this many times, the cases of the same "
                        "inputs back to back, and pair the ratios round by round (for a "
                        "machine whose speed drifts, e.g. a shared CPU)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no new case after this many seconds (the rest is listed)")
    parser.add_argument("--quick", action="store_true", help="a small grid (CPU: under a minute)")
    parser.add_argument("--no-parity", action="store_true", help="skip the parity check")
    parser.add_argument("--resume", type=Path, metavar="JSON",
                        help="keep every case an earlier run measured there and measure only "
                        "the rest of this grid")
    parser.add_argument("--render", type=Path, metavar="JSON",
                        help="only redraw the table and plots from an earlier run's JSON")
    parser.add_argument("--no-plot", action="store_true",
                        help="write the tables only (no matplotlib needed)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default benchmarks/results/local/<device>)")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK[args.device].items():
            setattr(args, key, value)
    args.n = args.n or GRIDS[args.device]["n"]
    args.vocab = args.vocab or GRIDS[args.device]["vocab"]
    args.out = args.out or Path("benchmarks/results/local") / args.device
    return args


def main(argv=None):
    from tqdm import tqdm

    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not args.no_plot and importlib.util.find_spec("matplotlib") is None:
        # Said before any case runs, not after the last one.
        raise SystemExit("matplotlib is not installed: the report's plots need it (pip install "
                         "matplotlib, or the bench extra); --no-plot writes the tables only")
    if args.render:
        return write_report(json.loads(args.render.read_text()), args.render.parent,
                            not args.no_plot)
    device = args.device
    command = " ".join(["python -m benchmarks", *argv])
    meta = device_meta(device)
    meta.update(cpus=os.cpu_count(), args={k: str(v) if isinstance(v, Path) else v
                                          for k, v in vars(args).items()})
    bandwidth = copy_bandwidth_gbs(device) if device == "cuda" else None
    meta["copy_bandwidth_gbs"] = bandwidth
    args.out.mkdir(parents=True, exist_ok=True)
    parity_lines = []
    if not args.no_parity:
        from benchmarks.parity import parity, parity_markdown

        print("parity against the float64 reference ...", flush=True)
        parity_lines = parity_markdown(parity(device))
    cases, skipped = plan(args, device)
    records, deadline = [], time.time() + (args.budget_s or float("inf"))
    if args.resume:  # every case the earlier run measured is kept; this grid adds the rest
        earlier = json.loads(args.resume.read_text())
        records = [r for r in earlier["records"] if "error" not in r]
        kept = {Case(*(r[k] for k in Case.__dataclass_fields__)) for r in records}
        cases = [c for c in cases if c not in kept]
        meta["resumed"] = dict(file=str(args.resume), date=earlier["meta"]["date"],
                               cases_kept=len(records),
                               earlier=earlier["meta"].get("resumed"))
    json_path = args.out / f"bench_{device}.json"
    if args.rounds > 1:
        cases = interleaved(cases)
    schedule = [(r, case) for r in range(args.rounds)
                for case in (cases if r % 2 == 0 else cases[::-1])]
    for r, case in tqdm(schedule, desc=f"benchmarks on {meta['device_name']}", unit="case"):
        if time.time() > deadline:
            if r == 0:
                skipped.append(dict(vars(case), skipped="time budget (--budget-s) spent"))
            continue
        records.append(measure(case, args.repeats) | {"round": r, "measured_at": time.strftime(
            "%Y-%m-%d %H:%M:%S UTC", time.gmtime())})
        json_path.write_text(json.dumps(dict(meta=meta, records=records, skipped=skipped),
                                        indent=1))
    records = combine_rounds(records)
    annotate(records, bandwidth)
    result = dict(meta=meta, records=records, skipped=skipped, parity=parity_lines,
                  command=command)
    json_path.write_text(json.dumps(result, indent=1))
    return write_report(result, args.out, not args.no_plot)


def write_report(result, out, with_plots=True):
    """The Markdown table and the PNGs from a run's JSON; exit status 1 if a case failed."""
    meta, records = result["meta"], result["records"]
    table = markdown(meta, records, result["skipped"], result["parity"], result["command"])
    md_path = out / f"bench_{meta['device']}.md"
    md_path.write_text(table)
    pngs = plot(records, meta, out, max(meta["args"]["n"])) if with_plots else []
    print(table)
    print("wrote", md_path, *pngs)
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
