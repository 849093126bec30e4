"""The command line of a loss x implementation benchmark (sparse teachers, fused linear).

A benchmark module describes itself with a ``Grid`` and calls ``main(grid, argv)``, which parses
the options they share, measures every (loss, implementation) case side by side in one run
(``measure.measure_case``: on CPU a fresh process per case), and writes ``<name>.json`` after
every case, so that a time-limited GPU run keeps what it measured, and ``<name>.md`` at the end.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import copy_bandwidth_gbs, device_meta
from benchmarks.measure import measure_case


@dataclass(frozen=True)
class Grid:
    name: str  # the module benchmarks.<name> and the files <name>.json and <name>.md
    doc: str  # the module's docstring: its first line is the --help description
    case: type  # a dataclass with fields impl, kind, *shape, dtype, device
    shape: tuple[str, ...]  # the --shape metavars, in the order of case's fields
    default_shapes: dict  # device -> (*shape, dtype)
    impls: tuple[str, ...]
    run_case: Callable  # (case, repeats) -> record, in this process
    unavailable: Callable  # (impl, kind, device) -> why the case cannot run, or None
    markdown: Callable  # (meta, records) -> the report
    kinds: tuple[str, ...] | None = None  # the losses it can measure (None: every divergence)
    floor: bool = False  # measure the copy bandwidth on CUDA (meta["copy_bandwidth_gbs"])

    def default_out(self, device: str) -> str:
        return f"benchmarks/results/local/{device}-{self.name.replace('_', '-')}"

    def measure(self, case, repeats: int) -> dict:
        return measure_case(case, repeats, self.run_case, (f"benchmarks.{self.name}", "--case"))


def parse_args(grid: Grid, argv):
    parser = argparse.ArgumentParser(description=grid.doc.splitlines()[0])
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--shape", type=int, nargs=len(grid.shape), metavar=grid.shape)
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--kinds", nargs="+", default=["fkl", "akl"], choices=grid.kinds)
    parser.add_argument("--impls", nargs="+", default=list(grid.impls), choices=grid.impls)
    parser.add_argument("--repeats", type=int, default=3, help="CPU repeats (CUDA: adaptive)")
    parser.add_argument("--out", default=None,
                        help=f"directory (default {grid.default_out('<device>')})")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: one CPU case
    return parser.parse_args(argv)


def main(grid: Grid, argv=None) -> int:
    """0 when every case measured without error, else 1."""
    args = parse_args(grid, argv)
    if args.case:
        fields, repeats = json.loads(args.case)
        print(json.dumps(grid.run_case(grid.case(**fields), repeats)))
        return 0
    device = args.device if args.device != "auto" else (
        "cuda" if torch.cuda.is_available() else "cpu")
    *shape, dtype = grid.default_shapes[device]
    shape = args.shape or shape
    dtype = args.dtype or dtype
    out = Path(args.out or grid.default_out(device))
    out.mkdir(parents=True, exist_ok=True)
    meta = device_meta(device)
    if grid.floor:
        meta["copy_bandwidth_gbs"] = copy_bandwidth_gbs(device) if device == "cuda" else None
    records = []
    for kind in args.kinds:
        for impl in args.impls:
            why = grid.unavailable(impl, kind, device)
            if why:
                print(f"skip {impl} {kind}: {why}", flush=True)
                continue
            records.append(grid.measure(grid.case(impl, kind, *shape, dtype, device),
                                        args.repeats))
            print(json.dumps(records[-1]), flush=True)
            (out / f"{grid.name}.json").write_text(json.dumps(dict(meta=meta, records=records),
                                                              indent=1))
    if records:
        (out / f"{grid.name}.md").write_text(grid.markdown(meta, records))
        print((out / f"{grid.name}.md").read_text())
    return 0 if records and all("error" not in r for r in records) else 1
