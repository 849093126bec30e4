"""Offline distillation on CPU: the teacher's top-k cached once, students at k = 4, 16 and V in
both tail modes next to the online AKL student.

1. The hidden Markov language and the GPT-2 teacher of examples/distill_tiny.py (64 tokens,
   the teacher 2 layers of width 96 trained with the plain ``transformers.Trainer``), with the
   same seeds, data and steps: the online AKL student here is distill_tiny's AKL student.
2. The teacher's top-k is written once, at k = V = 64 (every token, most probable first), with
   ``akl_kernels.topk_cache.write_topk_cache``. The k = 4 and k = 16 caches are cut from it:
   each position's lists are sorted most probable first, so their first k entries are what the
   writer at k would have stored (tests/test_examples.py checks this), and the teacher is not
   run again.
3. Students (1 layer, width 32), all from the same initial weights, on the same batches in the
   same order for the same number of steps, with ``DistillationTrainer`` and AKL (mu = 0.5,
   ``kd_ratio=1``: the teacher's distributions only): online (the teacher model runs on every
   batch) and offline (``teacher_model=None``: the batch's top-k from the cache through
   ``TopKCollator``) at each k with ``topk_tail="bucket"`` (the mass outside the k tokens as
   one more category) and ``"renormalize"`` (both distributions restricted to the k tokens).
   At k = V both tails are the dense loss (docs/contract.md §6), so those two students should
   follow the online one up to rounding: the online teacher's logits are recomputed on the
   step's batch of 32, the cache's were computed in batches of 64.
4. Held-out metrics: KL(teacher || student) per token against the teacher's full distribution,
   next-token accuracy against the data, and each student's training wall time; the cache's
   write time and size once. A Markdown table and a PNG are written to ``--out`` (default
   examples/results).

    python -m examples.distill_offline            # 140 s on 2 CPU cores (2.5 min)
    python -m examples.distill_offline --quick    # 10 s (3 s after the imports): the tests run it
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import PrinterCallback, Trainer
from transformers.utils import logging as hf_logging

from akl_kernels.integrations.transformers import DistillationTrainer
from akl_kernels.topk_cache import KD_COLUMNS, topk_cache_bytes_per_token, write_topk_cache
from akl_kernels.topk_collator import TopKCollator
from examples.distill_tiny import (
    BOS,
    HiddenMarkovLanguage,
    Progress,
    _args,
    as_dataset,
    gpt2,
    teacher_student_kl,
    token_accuracy,
)

# log_head_weight off: the example does not look at AKL's head weight, and computing it takes a
# second head split per step (for the online student, most of a step at this size on CPU).
AKL = dict(divergence="akl", kd_ratio=1.0, mu=0.5, log_head_weight=False)
KS = (4, 16)  # and V, the whole vocabulary
TAILS = ("bucket", "renormalize")
ONLINE = "online AKL"
CACHE_BATCH = 64  # the teacher's batch while the cache is written (it only changes rounding)


def student_plan(vocab):
    """Student name -> (k, tail); k and tail None for the online student."""
    plan = {ONLINE: (None, None)}
    for k in (*KS, vocab):
        for tail in TAILS:
            plan[f"offline k={k}{' (V)' if k == vocab else ''} {tail}"] = (k, tail)
    return plan


def write_cache(teacher, sequences, path, k):
    """The teacher's top-k over ``sequences`` written at ``path``; the cache, its write time
    in seconds and its bytes per token on disk (all files, the input_ids included)."""
    started = time.perf_counter()
    cache = write_topk_cache(teacher, [dict(input_ids=s.tolist()) for s in sequences], path,
                             k=k, batch_size=CACHE_BATCH, progress=False)
    seconds = time.perf_counter() - started
    disk = sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    return cache, seconds, disk / sequences.numel()


def first_k(cache, k):
    """The cache with each position's top-k lists cut to their first ``k`` entries: the most
    probable k, what ``write_topk_cache(..., k=k)`` writes. Cut in Arrow (a slice of each
    fixed-size list, no copy into Python): the cache's ``k`` entries per position stay
    fixed-size lists of ``k``."""
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc

    table = cache.with_format("arrow")[:]
    for name in KD_COLUMNS:
        column = table.column(name).combine_chunks()
        offsets = np.concatenate([[0], np.cumsum(pc.list_value_length(column).to_numpy())])
        positions = pc.list_slice(pc.list_flatten(column), 0, k, return_fixed_size_list=True)
        sliced = pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), positions)
        table = table.set_column(table.schema.get_field_index(name), name, sliced)
    return datasets.Dataset(table)


@torch.no_grad()
def teacher_forward_seconds(teacher, sequences, batch, steps):
    """What the online student's teacher forward passes cost in all: one batch of ``batch``
    sequences timed a few times, times ``steps``. It tells the teacher's share of the online
    student's wall time from the loss's."""
    inputs = sequences[:batch]
    teacher(input_ids=inputs, use_cache=False)  # warm-up
    repeats = 10
    started = time.perf_counter()
    for _ in range(repeats):
        teacher(input_ids=inputs, use_cache=False)
    return (time.perf_counter() - started) / repeats * steps


def train_student(student, teacher, data, args, bar, **options):
    """Train ``student`` with ``DistillationTrainer`` (online with a ``teacher`` model,
    offline on a top-k cache with ``teacher=None``); its wall time in seconds and its logged
    training losses."""
    if teacher is None:
        args.remove_unused_columns = False  # the KD columns must reach the collator
        options["data_collator"] = TopKCollator(pad_token_id=BOS)
    trainer = DistillationTrainer(student, teacher, args, train_dataset=data,
                                  callbacks=[Progress(bar)], **AKL, **options)
    trainer.remove_callback(PrinterCallback)  # its log lines would break up the progress bar
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    losses = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
    return seconds, losses


def run(quick=False, out="examples/results", seed=0):
    hf_logging.set_verbosity_error()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = dict(length=32, n_train=4000, n_eval=256, teacher_steps=600, student_steps=400,
                 batch=32)
    if quick:
        sizes = dict(length=16, n_train=128, n_eval=16, teacher_steps=8, student_steps=6,
                     batch=8)
    language = HiddenMarkovLanguage(seed=seed)
    train_seqs = language.sample(sizes["n_train"], sizes["length"], seed=seed + 1)
    eval_seqs = language.sample(sizes["n_eval"], sizes["length"], seed=seed + 2)
    positions, vocab = sizes["length"], language.vocab
    plan = student_plan(vocab)
    started = time.perf_counter()
    bar = tqdm(total=sizes["teacher_steps"] + len(plan) * sizes["student_steps"],
               desc="teacher", unit="step")
    # The cache and the Trainers' output directories: scratch, not results (the cache of the
    # full run is ~80 MB).
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        teacher = gpt2(vocab, 2, 96, 4, positions, seed)
        trainer = Trainer(teacher, _args(scratch, sizes["teacher_steps"], sizes["batch"], 3e-3,
                                         seed),
                          train_dataset=as_dataset(train_seqs), callbacks=[Progress(bar)])
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        teacher.eval().requires_grad_(False)

        bar.set_description("teacher top-k cache")
        cache, cache_seconds, disk_bytes = write_cache(teacher, train_seqs,
                                                       scratch / "topk", vocab)
        caches = {k: cache if k == vocab else first_k(cache, k) for k in (*KS, vocab)}

        initial = gpt2(vocab, 1, 32, 2, positions, seed + 100)  # every student starts here
        results = {
            "teacher": dict(kl=0.0, accuracy=token_accuracy(teacher, eval_seqs)),
            "untrained student": dict(kl=teacher_student_kl(initial, teacher, eval_seqs),
                                      accuracy=token_accuracy(initial, eval_seqs)),
        }
        losses = {}
        for name, (k, tail) in plan.items():
            bar.set_description(f"student {name}")
            student = gpt2(vocab, 1, 32, 2, positions, seed + 100)
            args = _args(scratch, sizes["student_steps"], sizes["batch"], 3e-3, seed)
            if k is None:
                seconds, losses[name] = train_student(student, teacher, as_dataset(train_seqs),
                                                      args, bar)
            else:
                seconds, losses[name] = train_student(student, None, caches[k], args, bar,
                                                      topk_tail=tail)
            results[name] = dict(kl=teacher_student_kl(student, teacher, eval_seqs),
                                 accuracy=token_accuracy(student, eval_seqs), seconds=seconds)
    bar.close()
    results[ONLINE]["teacher_seconds"] = teacher_forward_seconds(
        teacher, train_seqs, sizes["batch"], sizes["student_steps"])
    cache_info = dict(seconds=cache_seconds, disk_bytes_per_token=disk_bytes,
                      kd_bytes_per_token=topk_cache_bytes_per_token(vocab),
                      tokens=train_seqs.numel())
    elapsed = time.perf_counter() - started
    table = _table(results, plan, losses, cache_info, sizes, elapsed, seed, quick)
    (out / "distill_offline.md").write_text(table)
    _plot(results, plan, losses, vocab, out / "distill_offline.png")
    print(table)
    print(f"wrote {out / 'distill_offline.md'} and {out / 'distill_offline.png'}")
    return results


def loss_gap(losses, name):
    """The largest relative difference between ``name``'s logged training losses and the
    online student's, over the steps both logged."""
    online = dict(losses[ONLINE])
    return max(abs(loss - online[step]) / online[step] for step, loss in losses[name]
               if step in online)


def _table(results, plan, losses, cache_info, sizes, elapsed, seed, quick):
    command = ("python -m examples.distill_offline" + (" --quick" if quick else "")
               + (f" --seed {seed}" if seed else ""))
    vocab = max(k for k, _ in plan.values() if k is not None)
    lines = [
        "# distill_offline: held-out metrics",
        "",
        f"`{command}`: {sizes['n_train']} training sequences of {sizes['length']} tokens over "
        f"V = {vocab} tokens, teacher {sizes['teacher_steps']} steps, each student "
        f"{sizes['student_steps']} steps of batch {sizes['batch']} with AKL (mu = 0.5, "
        f"kd_ratio 1) from the same initial weights on the same batches; "
        f"{sizes['n_eval']} held-out sequences; {elapsed:.0f} s in all on "
        f"{torch.get_num_threads()} CPU threads.",
        "",
        f"Teacher top-k cache, written once at k = V = {vocab} for {cache_info['tokens']} "
        f"tokens: {cache_info['seconds']:.1f} s, {cache_info['disk_bytes_per_token']:.0f} bytes "
        f"per token on disk ({cache_info['kd_bytes_per_token']} of them the KD columns, "
        "`topk_cache_bytes_per_token`); the k = "
        + " and k = ".join(str(k) for k in KS)
        + " caches are its first k entries per position.",
        "",
        "| model | teacher signal | k | tail | KL(teacher ‖ model) per token "
        "| next-token accuracy | training wall time (s) |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for name, r in results.items():
        k, tail = plan.get(name, (None, None))
        signal = ("online (teacher model)" if name == ONLINE
                  else "offline (cache)" if name in plan else "")
        seconds = f"{r['seconds']:.1f}" if "seconds" in r else ""
        lines.append(f"| {name} | {signal} | {k or ''} | {tail or ''} | {r['kl']:.4f} "
                     f"| {r['accuracy']:.4f} | {seconds} |")
    lines.append("")
    offline = [n for n in plan if n != ONLINE]
    best = min(offline, key=lambda n: results[n]["kl"])
    lines.append(f"- lowest held-out KL among the offline students: {best}")
    full = f"offline k={vocab} (V) bucket"
    online_s, teacher_s = results[ONLINE]["seconds"], results[ONLINE]["teacher_seconds"]
    rest = online_s - teacher_s - results[full]["seconds"]
    lines.append(f"- wall time: {ONLINE} {online_s:.1f} s, of which about {teacher_s:.1f} s the "
                 f"teacher's forward passes (one batch timed, times the steps); {full} "
                 f"{results[full]['seconds']:.1f} s for the same loss values from the cached "
                 "lists (the sparse loss code and the collator)"
                 + (f"; the other {rest:.1f} s of the difference is the loss code: dense AKL "
                    f"over V = {vocab} logits against sparse AKL over k = V entries"
                    if rest > 0 else ""))
    for name in offline:
        if plan[name][0] == vocab:
            lines.append(f"- {name} against online AKL: held-out KL {results[name]['kl']:.4f} "
                         f"vs {results[ONLINE]['kl']:.4f}; training losses at most "
                         f"{loss_gap(losses, name):.1e} apart (relative) over the logged steps")
    return "\n".join(lines) + "\n"


def _plot(results, plan, losses, vocab, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ks = (*KS, vocab)
    for tail in TAILS:
        names = [n for n in plan if plan[n][1] == tail]
        axes[0].plot(ks, [results[n]["kl"] for n in names], marker="o",
                     label=f"offline, {tail}")
    axes[0].axhline(results[ONLINE]["kl"], color="k", linestyle="--", label=ONLINE)
    axes[0].set(xscale="log", xticks=ks, xticklabels=[*map(str, KS), f"{vocab} (V)"],
                xlabel="k (teacher tokens kept per position)",
                ylabel="held-out KL(teacher || student) per token",
                title=f"distance to the teacher (untrained: "
                      f"{results['untrained student']['kl']:.2f})")
    axes[0].minorticks_off()
    # Colour by tail as in the other panels, line style by k; the online curve on top, dashed,
    # so that the k = V curves it coincides with show through.
    styles = {**dict(zip(KS, (":", "-."), strict=True)), vocab: "-"}
    for name, points in losses.items():
        if not points:
            continue
        k, tail = plan[name]
        style = (dict(color="k", linestyle="--", zorder=3) if name == ONLINE
                 else dict(color=f"C{TAILS.index(tail)}", linestyle=styles[k]))
        axes[1].plot(*zip(*points, strict=True), label=name, **style)
    axes[1].set(xlabel="step", ylabel="training loss (each student's own objective)",
                title="training loss", yscale="log")
    names = list(plan)
    axes[2].barh(names, [results[n]["seconds"] for n in names],
                 color=["k" if n == ONLINE else f"C{TAILS.index(plan[n][1])}" for n in names])
    axes[2].invert_yaxis()
    axes[2].set(xlabel="training wall time (s)", title="training time")
    for ax in axes[:2]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run of a few seconds")
    parser.add_argument("--out", default="examples/results")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    results = run(args.quick, args.out, args.seed)
    return 0 if all(math.isfinite(v) for r in results.values() for v in r.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
