"""Vocabulary-parallel losses on gloo ranks: the collectives of one call, and the wall time of
P ranks against one process (docs/vocab_parallel.md).

    python -m benchmarks.vocab_parallel                      # N 4096, V 128256, P 2 and 4
    python -m benchmarks.vocab_parallel --n 512 --vocab 8192 --repeats 1   # a quick look

Each rank holds a contiguous slice of the vocabulary of both models' logits (``make_inputs``
on its slice, seeded by rank: the data is the benchmark's usual flat teacher, sliced) and calls
``fkl_loss`` / ``akl_loss`` with the group. Recorded per loss, for each P:
- the collectives of one forward and one backward call (``vocab_shards.recorded_collectives``:
  each all-reduce's reduction, element count and payload bytes on one rank; a ring all-reduce
  moves about 2 (P - 1) / P times the payload through each rank's link);
- for the P in ``--time-ranks``, the median wall time of forward+backward (every rank waits
  for the others before each call; rank 0's clock) against the same loss in one process on
  the whole rows. On a CPU this is a figure of what the rounds cost on this machine (P ranks
  share its cores), not a speed claim.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import akl_kernels
from akl_kernels.vocab_shards import recorded_collectives
from benchmarks.common import device_meta, fmt, make_inputs

LOSSES = {"fkl": akl_kernels.fkl_loss, "akl": akl_kernels.akl_loss}
TEACHER_DTYPES = ("float32", "bfloat16")


def slice_bounds(vocab, world, rank):
    """Contiguous, as even as can be: widths differ by at most one (never an empty slice
    while V >= P)."""
    return rank * vocab // world, (rank + 1) * vocab // world


def timed_ms(call, repeats, group=None):
    """Median wall time of ``call`` (forward+backward) after a warm-up; with a group every
    rank starts together."""
    call()
    times = []
    for _ in range(repeats):
        if group is not None:
            dist.barrier(group)
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _inputs(n, width, teacher_dtype, seed):
    student, teacher = make_inputs(n, width, torch.float32, "flat", "cpu", seed=seed)
    return student.requires_grad_(), teacher.to(getattr(torch, teacher_dtype))


def _rank(rank, world, init, args, result_dir):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    lo, hi = slice_bounds(args.vocab, world, rank)
    results = {}
    for teacher_dtype in TEACHER_DTYPES:
        student, teacher = _inputs(args.n, hi - lo, teacher_dtype, seed=rank)
        for name, loss_fn in LOSSES.items():
            def call(loss_fn=loss_fn, student=student, teacher=teacher):
                student.grad = None
                loss_fn(student, teacher, process_group=dist.group.WORLD).backward()

            with recorded_collectives() as forward:
                loss = loss_fn(student, teacher, process_group=dist.group.WORLD)
            with recorded_collectives() as backward:
                loss.backward()
            entry = {"forward": [c._asdict() for c in forward],
                     "backward": [c._asdict() for c in backward]}
            if world in args.time_ranks and teacher_dtype == "float32":
                entry["ms"] = timed_ms(call, args.repeats, dist.group.WORLD)
            results[f"{name}-{teacher_dtype}"] = entry
            student.grad = None
    if rank == 0:
        (Path(result_dir) / "rank0.json").write_text(json.dumps(results))
    dist.destroy_process_group()


def run_ranks(world, args):
    with tempfile.TemporaryDirectory() as tmp:
        init = "file://" + os.path.join(tmp, "rendezvous")
        mp.spawn(_rank, args=(world, init, args, tmp), nprocs=world, join=True)
        return json.loads((Path(tmp) / "rank0.json").read_text())


def run_single(args):
    """The same losses in this process on the whole rows."""
    student, teacher = _inputs(args.n, args.vocab, "float32", seed=0)
    out = {}
    for name, loss_fn in LOSSES.items():
        def call(loss_fn=loss_fn):
            student.grad = None
            loss_fn(student, teacher).backward()

        out[name] = timed_ms(call, args.repeats)
    return out


def _mib(nbytes):
    return nbytes / 2**20


def markdown(meta, args, per_world, single) -> str:
    lines = [f"# Vocabulary-parallel losses on gloo ranks ({meta['device_name']})", "",
             f"N {args.n}, V {args.vocab}, float32 student; {meta['date']}, torch "
             f"{meta['torch']}. Payload bytes per rank; a ring all-reduce moves about "
             "2 (P - 1) / P times that through each rank's link.", "",
             "| loss | teacher | P | rounds (forward) | rounds (backward) | payload MiB | "
             "largest round MiB |", "|---|---|---|---|---|---|---|"]
    for world, results in per_world.items():
        for key, entry in results.items():
            name, dtype = key.split("-")
            sizes = [c["bytes"] for c in entry["forward"]]
            lines.append(f"| {name} | {dtype} | {world} | {len(sizes)} | "
                         f"{len(entry['backward'])} | {fmt(_mib(sum(sizes)))} | "
                         f"{fmt(_mib(max(sizes)))} |")
    lines += ["", "Forward+backward wall time, median of "
              f"{args.repeats} after a warm-up (float32 teacher):", "",
              "| loss | 1 process ms | P | P ranks ms | ratio |", "|---|---|---|---|---|"]
    for world, results in per_world.items():
        for name in LOSSES:
            entry = results.get(f"{name}-float32", {})
            if "ms" in entry:
                lines.append(f"| {name} | {fmt(single[name], 4)} | {world} | "
                             f"{fmt(entry['ms'], 4)} | {fmt(entry['ms'] / single[name])} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--time-ranks", type=int, nargs="*", default=[2],
                        help="the P whose wall time is measured (the others: collectives only)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path,
                        default=Path("benchmarks/results/local/cpu-vocab-parallel"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    meta = device_meta("cpu")
    single = run_single(args) if args.time_ranks else {}
    per_world = {world: run_ranks(world, args) for world in args.ranks}
    record = dict(meta=meta, n=args.n, vocab=args.vocab, repeats=args.repeats,
                  single_process_ms=single, ranks=per_world)
    (args.out / "vocab_parallel.json").write_text(json.dumps(record, indent=1))
    text = markdown(meta, args, per_world, single)
    (args.out / "vocab_parallel.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
