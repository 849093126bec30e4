"""End-to-end distillation on CPU in a few minutes: SFT, FKL, RKL and AKL students compared.

1. A procedurally generated language (a hidden Markov model over 64 tokens: half its states emit
   one token with probability 0.85, half a Zipf law over 20 tokens, so next-token distributions
   have a head and a long tail) gives train and held-out sequences; nothing is downloaded.
2. A GPT-2-style teacher (2 layers, width 96) built from a config learns it with the plain
   ``transformers.Trainer``.
3. Smaller students (1 layer, width 32), all from the same initial weights, are trained for the
   same number of steps on the same batches with ``DistillationTrainer``: SFT (cross-entropy on
   the data only, ``kd_ratio=0``), FKL, RKL and AKL (``kd_ratio=1``: the teacher's distributions
   only).
4. Held-out metrics: teacher-to-student KL per token, next-token accuracy against the data, and
   Rouge-L (F1 of the longest common subsequence) of greedy continuations of 8-token prompts
   against the reference continuations. A Markdown table and a PNG of the training curves are
   written to ``--out`` (default examples/results).

    python examples/distill_tiny.py            # 80-110 s on 2 CPU cores
    python examples/distill_tiny.py --quick    # seconds: a smoke run (the tests run it)
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)
from transformers.utils import logging as hf_logging

import akl_kernels
from akl_kernels.integrations.transformers import DistillationTrainer

BOS = 0
STUDENTS = {  # name -> DistillationTrainer options
    "SFT": dict(divergence="fkl", kd_ratio=0.0),
    "FKL": dict(divergence="fkl", kd_ratio=1.0),
    "RKL": dict(divergence="rkl", kd_ratio=1.0),
    "AKL": dict(divergence="akl", kd_ratio=1.0, mu=0.5),
}


class HiddenMarkovLanguage:
    """Sequences from a sparse hidden Markov model; token 0 is the begin-of-sequence mark."""

    def __init__(self, vocab=64, states=16, seed=0):
        gen = torch.Generator().manual_seed(seed)
        words = vocab - 1
        self.emission = torch.zeros(states, vocab)
        for s in range(states):
            order = torch.randperm(words, generator=gen) + 1
            if s % 2 == 0:  # near-deterministic: one token, a little noise on 8 others
                self.emission[s, order[0]] = 0.85
                self.emission[s, order[1:9]] = 0.15 / 8
            else:  # a Zipf law over 20 tokens: a head and a tail
                ranks = torch.arange(1, 21, dtype=torch.float32)
                self.emission[s, order[:20]] = ranks.pow(-1.1) / ranks.pow(-1.1).sum()
        self.transition = torch.zeros(states, states)
        for s in range(states):
            successors = torch.randperm(states, generator=gen)[:3]
            self.transition[s, successors] = torch.tensor([0.75, 0.2, 0.05])
        self.vocab, self.states = vocab, states

    def sample(self, n, length, seed):
        gen = torch.Generator().manual_seed(seed)
        state = torch.randint(0, self.states, (n,), generator=gen)
        tokens = [torch.full((n,), BOS)]
        for _ in range(length - 1):
            tokens.append(torch.multinomial(self.emission[state], 1, generator=gen)[:, 0])
            state = torch.multinomial(self.transition[state], 1, generator=gen)[:, 0]
        return torch.stack(tokens, dim=1)


def gpt2(vocab, layers, width, heads, positions, seed):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=positions, n_embd=width,
                                      n_layer=layers, n_head=heads, bos_token_id=BOS,
                                      eos_token_id=BOS, pad_token_id=BOS))


def as_dataset(sequences):
    return [dict(input_ids=s, labels=s.clone()) for s in sequences]


class Progress(TrainerCallback):
    """One tqdm bar over every training step of the example, and held-out KL every few steps."""

    def __init__(self, bar, curve=None, evaluate=None, every=25):
        self.bar, self.curve, self.evaluate, self.every = bar, curve, evaluate, every

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.bar.update(1)
        if self.evaluate is not None and state.global_step % self.every == 0:
            self.curve.append((state.global_step, self.evaluate(model)))


def _args(out, steps, batch, lr, seed):
    return TrainingArguments(output_dir=str(out / "trainer"), max_steps=steps,
                             per_device_train_batch_size=batch, learning_rate=lr,
                             lr_scheduler_type="cosine", warmup_steps=max(1, steps // 20),
                             logging_steps=max(1, steps // 50), report_to=[], use_cpu=True,
                             save_strategy="no", disable_tqdm=True, seed=seed, data_seed=seed)


@torch.no_grad()
def teacher_student_kl(student, teacher, sequences, reverse=False):
    """Mean per-token KL(teacher || student) on the sequences (every next-token position);
    KL(student || teacher) with ``reverse``."""
    student.eval()
    s, t = student(input_ids=sequences).logits, teacher(input_ids=sequences).logits
    student.train()
    kl = akl_kernels.rkl_loss if reverse else akl_kernels.fkl_loss
    return kl(s[:, :-1], t[:, :-1]).item()


@torch.no_grad()
def token_accuracy(model, sequences):
    model.eval()
    predicted = model(input_ids=sequences).logits[:, :-1].argmax(-1)
    return (predicted == sequences[:, 1:]).float().mean().item()


def rouge_l(candidate, reference):
    """F1 of the longest common subsequence of two token lists."""
    lcs = [[0] * (len(reference) + 1) for _ in range(len(candidate) + 1)]
    for i, a in enumerate(candidate):
        for j, b in enumerate(reference):
            lcs[i + 1][j + 1] = lcs[i][j] + 1 if a == b else max(lcs[i][j + 1], lcs[i + 1][j])
    common = lcs[-1][-1]
    if common == 0:
        return 0.0
    precision, recall = common / len(candidate), common / len(reference)
    return 2 * precision * recall / (precision + recall)


@torch.no_grad()
def greedy_rouge_l(model, sequences, prompt=8):
    model.eval()
    continuation = sequences.shape[1] - prompt
    generated = model.generate(sequences[:, :prompt], attention_mask=torch.ones_like(
        sequences[:, :prompt]), max_new_tokens=continuation, min_new_tokens=continuation,
        do_sample=False, pad_token_id=BOS)[:, prompt:]
    return sum(rouge_l(g.tolist(), r.tolist())
               for g, r in zip(generated, sequences[:, prompt:], strict=True)) / len(sequences)


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
    positions = sizes["length"]
    total_steps = sizes["teacher_steps"] + len(STUDENTS) * sizes["student_steps"]
    started = time.perf_counter()
    bar = tqdm(total=total_steps, desc="teacher", unit="step")

    teacher = gpt2(language.vocab, 2, 96, 4, positions, seed)
    Trainer(teacher, _args(out, sizes["teacher_steps"], sizes["batch"], 3e-3, seed),
            train_dataset=as_dataset(train_seqs), callbacks=[Progress(bar)]).train()
    teacher.eval().requires_grad_(False)

    results = {"teacher": dict(kl=0.0, reverse_kl=0.0, accuracy=token_accuracy(teacher, eval_seqs),
                               rouge_l=greedy_rouge_l(teacher, eval_seqs))}
    curves, losses = {}, {}
    for name, options in STUDENTS.items():
        bar.set_description(f"student {name}")
        student = gpt2(language.vocab, 1, 32, 2, positions, seed + 100)  # same start for all
        curves[name] = [(0, teacher_student_kl(student, teacher, eval_seqs))]
        progress = Progress(bar, curves[name],
                            lambda m: teacher_student_kl(m, teacher, eval_seqs),
                            every=max(1, sizes["student_steps"] // 16))
        trainer = DistillationTrainer(
            student, teacher, _args(out, sizes["student_steps"], sizes["batch"], 3e-3, seed),
            train_dataset=as_dataset(train_seqs), callbacks=[progress], **options)
        trainer.train()
        losses[name] = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]
        results[name] = dict(kl=teacher_student_kl(student, teacher, eval_seqs),
                             reverse_kl=teacher_student_kl(student, teacher, eval_seqs, True),
                             accuracy=token_accuracy(student, eval_seqs),
                             rouge_l=greedy_rouge_l(student, eval_seqs))
    bar.close()
    elapsed = time.perf_counter() - started
    table = _table(results, sizes, elapsed, seed)
    (out / "distill_tiny.md").write_text(table)
    _plot(curves, losses, out / "distill_tiny.png")
    print(table)
    print(f"wrote {out / 'distill_tiny.md'} and {out / 'distill_tiny.png'}")
    return results


def _table(results, sizes, elapsed, seed):
    command = "python examples/distill_tiny.py" + (f" --seed {seed}" if seed else "")
    lines = [
        "# distill_tiny: held-out metrics",
        "",
        f"`{command}`: {sizes['n_train']} training sequences of "
        f"{sizes['length']} tokens, teacher {sizes['teacher_steps']} steps, each student "
        f"{sizes['student_steps']} steps of batch {sizes['batch']} from the same initial "
        f"weights; {sizes['n_eval']} held-out sequences; {elapsed:.0f} s in all on "
        f"{torch.get_num_threads()} CPU threads.",
        "",
        "| model | KL(teacher ‖ model) per token | KL(model ‖ teacher) | next-token accuracy "
        "| Rouge-L of greedy continuations |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        lines.append(f"| {name} | {r['kl']:.4f} | {r['reverse_kl']:.4f} | {r['accuracy']:.4f} "
                     f"| {r['rouge_l']:.4f} |")
    students = [n for n in results if n != "teacher"]
    lines.append("")
    for metric, label, best in (("kl", "KL(teacher ‖ model)", min),
                                ("reverse_kl", "KL(model ‖ teacher)", min),
                                ("accuracy", "next-token accuracy", max),
                                ("rouge_l", "Rouge-L", max)):
        top = best(results[n][metric] for n in students)
        winners = " and ".join(n for n in students if results[n][metric] == top)
        lines.append(f"- best {label}: {winners}")
    return "\n".join(lines) + "\n"


def _plot(curves, losses, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, points in curves.items():
        axes[0].plot(*zip(*points, strict=True), label=name)
        if losses[name]:
            axes[1].plot(*zip(*losses[name], strict=True), label=name)
    axes[0].set(xlabel="step", ylabel="held-out KL(teacher || student) per token",
                title="distance to the teacher", yscale="log")
    axes[1].set(xlabel="step", ylabel="training loss (each student's own objective)",
                title="training loss")
    for ax in axes:
        ax.legend()
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
