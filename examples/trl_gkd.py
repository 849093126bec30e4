"""TRL's GKDTrainer, stock and on this library's losses: the same tiny model, batch and steps.

    python -m examples.trl_gkd            # V 32000: time per step and peak memory per trainer
    python -m examples.trl_gkd --quick    # seconds: a smoke run (tests/test_examples.py)

A GPT-2-style student and teacher are built from configs (a small body under a 32000-token
vocabulary, so the loss is a real share of a step, as it is for LLMs) with a word-level
tokenizer made here; the data are random token sequences with a prompt part (labels -100).
Each case trains 6 off-policy steps, 3 with ``--quick`` (``lmbda = 0``: generation would cost
every case the same), in a fresh process, so that its peak resident memory is its own:

- ``stock``: ``trl.experimental.gkd.GKDTrainer``, generalized JSD (beta 0.5);
- ``jsd``: ``akl_kernels.integrations.trl.GKDTrainer``, the same loss;
- ``jsd-fused``: the same from the last hidden states (``fused_linear=True``: no logits);
- ``akl``, ``akl-fused``: AKL (mu 0.5) on logits and from hidden states.

Reported per case: the median time of a training step after the first, the peak resident
memory above the process's before training, and the last step's loss. Results:
``examples/results/trl_gkd.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

CASES = {"stock": {}, "jsd": {}, "jsd-fused": dict(fused_linear=True),
         "akl": dict(divergence="akl", divergence_options={"mu": 0.5}),
         "akl-fused": dict(divergence="akl", divergence_options={"mu": 0.5}, fused_linear=True)}
RESULTS = Path(__file__).resolve().parent / "results"


def _tokenizer(vocab):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left")


def _model(seed, vocab, width):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=256, n_embd=width,
                                      n_layer=2, n_head=4, bos_token_id=1, eos_token_id=1,
                                      pad_token_id=0))


def _rows(n, vocab, prompt, completion, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (prompt + completion,), generator=g).tolist()
        rows.append(dict(input_ids=ids, attention_mask=[1] * len(ids),
                         labels=[-100] * prompt + ids[prompt:], prompts=ids[:prompt],
                         prompt_attention_mask=[1] * prompt))
    return rows


def _collate(batch):
    import torch

    return {k: torch.tensor([row[k] for row in batch]) for k in batch[0]}


def run_case(name, *, steps, vocab, width, batch, prompt, completion):
    """Train one case in this process; its measurements."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig
    from trl.experimental.gkd import GKDTrainer as StockGKDTrainer

    from akl_kernels.integrations.trl import GKDTrainer
    from benchmarks.measure import release_freed_memory, reset_peak_rss, rss_bytes

    torch.set_num_threads(os.cpu_count() or 1)
    cls = StockGKDTrainer if name == "stock" else GKDTrainer
    args = GKDConfig(output_dir=tempfile.mkdtemp(prefix="trl_gkd_"),
                     per_device_train_batch_size=batch, max_steps=steps, lmbda=0.0, beta=0.5,
                     report_to=[], use_cpu=True, bf16=False, save_strategy="no",
                     logging_steps=1, disable_dropout=True, learning_rate=1e-3, seed=0)
    times = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            times.append(time.perf_counter() - self.start)

    trainer = cls(model=_model(0, vocab, width), teacher_model=_model(1, vocab, width),
                  args=args, train_dataset=Dataset.from_list(
                      _rows(batch * steps, vocab, prompt, completion)),
                  data_collator=_collate, processing_class=_tokenizer(vocab),
                  callbacks=[StepTimer()], **CASES[name])
    release_freed_memory()
    base = rss_bytes("VmRSS")
    reset_peak_rss()
    trainer.train()
    peak = rss_bytes("VmHWM") - base
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return dict(case=name, step_ms=1e3 * statistics.median(times[1:] or times),
                peak_mib=peak / 2**20, first_loss=losses[0], last_loss=losses[-1])


def _markdown(records, settings):
    stock = next(r for r in records if r["case"] == "stock")
    lines = ["# TRL GKDTrainer: stock against akl_kernels' losses", "",
             f"{settings['device']}; student and teacher GPT-2 (2 layers, width "
             f"{settings['width']}), V {settings['vocab']}, batch {settings['batch']} x "
             f"{settings['prompt'] + settings['completion']} tokens "
             f"({settings['completion']} scored), {settings['steps']} off-policy steps, "
             f"float32, {settings['date']}.", "",
             "| trainer | step ms (median) | x stock | peak MiB above start | x stock | "
             "first loss | last loss |", "|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['case']} | {r['step_ms']:.0f} | {r['step_ms'] / stock['step_ms']:.2f} "
                     f"| {r['peak_mib']:.0f} | {r['peak_mib'] / stock['peak_mib']:.2f} | "
                     f"{r['first_loss']:.5f} | {r['last_loss']:.5f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--case", choices=tuple(CASES), help="run one case here (internal)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    settings = (dict(steps=3, vocab=512, width=32, batch=2, prompt=4, completion=12)
                if args.quick else
                dict(steps=6, vocab=32000, width=128, batch=8, prompt=16, completion=112))
    if args.case:  # a child process: one case, its record on stdout
        record = run_case(args.case, **settings)
        print(json.dumps(record))
        return 0
    from benchmarks.common import device_meta

    records = []
    for name in CASES:
        done = subprocess.run([sys.executable, "-m", "examples.trl_gkd", "--case", name,
                               "--out", str(args.out), *(["--quick"] if args.quick else [])],
                              capture_output=True, text=True, check=False,
                              cwd=Path(__file__).resolve().parents[1])
        if done.returncode != 0:
            raise RuntimeError(f"case {name} failed:\n{done.stderr[-3000:]}")
        records.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(records[-1])
    meta = device_meta("cpu")
    settings.update(device=meta["device_name"], date=meta["date"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "trl_gkd.json").write_text(json.dumps(dict(settings=settings, records=records),
                                                      indent=1))
    text = _markdown(records, settings)
    (args.out / "trl_gkd.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
