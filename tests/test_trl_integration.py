"""akl_kernels.integrations.trl against TRL's own trainers (imported: TRL's code is the
reference), on tiny GPT-2 models built from configs and a word-level tokenizer made here."""

from __future__ import annotations

import math
import os
import random

import pytest
import torch

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl = pytest.importorskip("trl")
pytest.importorskip("datasets")

from datasets import Dataset  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast  # noqa: E402
from trl.experimental.gkd import GKDConfig  # noqa: E402
from trl.experimental.gkd import GKDTrainer as StockGKDTrainer  # noqa: E402

from akl_kernels.integrations import trl as integration  # noqa: E402

VOCAB = 64
PROMPT, COMPLETION = 4, 6


def tokenizer():
    words = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left")


def tiny_gpt2(seed):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2,
                                      n_head=2, bos_token_id=1, eos_token_id=1, pad_token_id=0))


def gkd_rows(n=8, seed=0):
    """Prompt + completion token ids in the layout GKD's collator gives (labels -100 on the
    prompt; ``prompts`` for on-policy generation); one row has a shorter completion."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        prompt = torch.randint(3, VOCAB, (PROMPT,), generator=g).tolist()
        completion = torch.randint(3, VOCAB, (COMPLETION,), generator=g).tolist()
        labels = [-100] * PROMPT + completion
        if i == 1:
            labels[-2:] = [-100, -100]
        rows.append(dict(input_ids=prompt + completion, attention_mask=[1] * (PROMPT + COMPLETION),
                         labels=labels, prompts=prompt, prompt_attention_mask=[1] * PROMPT))
    return rows


def collate(batch):
    return {k: torch.tensor([row[k] for row in batch]) for k in batch[0]}


def gkd(cls, tmp_path, *, beta=0.5, lmbda=0.0, bf16=True, **options):
    """A GKD trainer (TRL's defaults: bf16 autocast on this CPU too)."""
    args = GKDConfig(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1,
                     lmbda=lmbda, beta=beta, report_to=[], use_cpu=True, max_new_tokens=5,
                     save_strategy="no", disable_dropout=True, logging_steps=1, bf16=bf16)
    trainer = cls(model=tiny_gpt2(0), teacher_model=tiny_gpt2(1), args=args,
                  train_dataset=Dataset.from_list(gkd_rows()), data_collator=collate,
                  processing_class=tokenizer(), **options)
    trainer.current_gradient_accumulation_steps = 1  # what train() sets before a step
    return trainer


def step_gradients(trainer, batch, num_items_in_batch=None, seed=7):
    """One training step (the Trainer's own ``training_step``) from a fixed RNG state; the
    loss and every parameter's gradient."""
    trainer.model.train()
    trainer.model.zero_grad()
    torch.manual_seed(seed)
    random.seed(seed)
    inputs = dict(batch) if isinstance(batch, dict) else list(batch)
    loss = trainer.training_step(trainer.model, inputs, num_items_in_batch)
    return loss.detach(), torch.cat([p.grad.flatten() for p in trainer.model.parameters()
                                     if p.grad is not None])


def relative(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("num_items_in_batch", [None, 37])
def test_gkd_loss_is_trls_generalized_jsd(tmp_path, beta, num_items_in_batch):
    """Our GKDTrainer's loss equals the stock trainer's, which calls TRL's
    ``generalized_jsd_loss`` (at T = 1, over labels != -100, divided by num_items_in_batch
    when given)."""
    stock, ours = gkd(StockGKDTrainer, tmp_path, beta=beta), gkd(integration.GKDTrainer,
                                                                   tmp_path, beta=beta)
    batch = collate(gkd_rows()[:4])
    count = None if num_items_in_batch is None else torch.tensor(num_items_in_batch)
    expected = stock.compute_loss(stock.model, dict(batch), num_items_in_batch=count)
    got = ours.compute_loss(ours.model, dict(batch), num_items_in_batch=count)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    # The same numbers by hand from TRL's function itself, called as the trainer calls it.
    with torch.no_grad():
        s = ours.model(input_ids=batch["input_ids"]).logits
        t = ours.teacher_model(input_ids=batch["input_ids"]).logits
    direct = StockGKDTrainer.generalized_jsd_loss(s[:, :-1], t[:, :-1], batch["labels"][:, 1:],
                                                  beta=beta, num_items_in_batch=count)
    assert got.item() == pytest.approx(direct.item(), rel=1e-5)


@pytest.mark.parametrize("lmbda", [0.0, 1.0])
def test_gkd_training_step_gradients_match_trls(tmp_path, lmbda):
    """One step of each trainer from the same RNG state: off-policy (lmbda = 0) on the batch,
    on-policy (lmbda = 1) on completions the student generates, the same for both."""
    stock = gkd(StockGKDTrainer, tmp_path, lmbda=lmbda)
    ours = gkd(integration.GKDTrainer, tmp_path, lmbda=lmbda)
    batch = collate(gkd_rows()[:4])
    loss_stock, grad_stock = step_gradients(stock, batch, torch.tensor(20))
    loss_ours, grad_ours = step_gradients(ours, batch, torch.tensor(20))
    assert loss_ours.item() == pytest.approx(loss_stock.item(), rel=1e-5)
    assert relative(grad_ours, grad_stock) < 1e-5


def test_gkd_fused_linear_matches_the_logits_path(tmp_path):
    # Without autocast: under bf16 autocast the logits path's logits are bf16, the fused
    # path's float32 (its GEMMs run with autocast off), and they differ by bf16 rounding.
    options = dict(divergence="akl", divergence_options={"mu": 0.6}, bf16=False)
    logits = gkd(integration.GKDTrainer, tmp_path, **options)
    fused = gkd(integration.GKDTrainer, tmp_path, fused_linear=True, **options)
    batch = collate(gkd_rows()[:4])
    loss_logits, grad_logits = step_gradients(logits, batch)
    loss_fused, grad_fused = step_gradients(fused, batch)
    assert loss_fused.item() == pytest.approx(loss_logits.item(), rel=1e-5)
    assert relative(grad_fused, grad_logits) < 1e-5


def test_gkd_trains_with_akl_and_its_loss_decreases(tmp_path):
    trainer = gkd(integration.GKDTrainer, tmp_path, divergence="akl")
    trainer.args.max_steps, trainer.args.learning_rate = 30, 3e-3
    batch = collate(gkd_rows()[:4])
    before = trainer.compute_loss(trainer.model, dict(batch)).item()
    trainer.train()
    after = trainer.compute_loss(trainer.model, dict(batch)).item()
    assert after < 0.7 * before
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 30 and logged[-1] < logged[0]


def test_options_are_checked_at_construction(tmp_path):
    with pytest.raises(TypeError, match="beta"):
        gkd(integration.GKDTrainer, tmp_path, divergence_options={"beta": 0.3})
    with pytest.raises(TypeError, match="'mu'"):
        gkd(integration.GKDTrainer, tmp_path, divergence="fkl", divergence_options={"mu": 0.3})
    with pytest.raises(TypeError, match="fused_linear"):
        gkd(integration.GKDTrainer, tmp_path, fused_linear="yes")


def distillation(cls, tmp_path, *, beta=1.0, temperature=1.5, bf16=True, **options):
    prompts = torch.randint(3, VOCAB, (8, PROMPT), generator=torch.Generator().manual_seed(3))
    dataset = Dataset.from_list([{"prompt": " ".join(f"w{int(x)}" for x in row)}
                                 for row in prompts])
    args = trl.DistillationConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, beta=beta,
        temperature=temperature, report_to=[], use_cpu=True, max_completion_length=COMPLETION,
        save_strategy="no", logging_steps=1, gradient_checkpointing=False, bf16=bf16)
    trainer = cls(model=tiny_gpt2(0), teacher_model=tiny_gpt2(1), args=args,
                  train_dataset=dataset, processing_class=tokenizer(), **options)
    trainer.current_gradient_accumulation_steps = 1  # what train() sets before a step
    return trainer


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
def test_distillation_trainer_step_matches_trls(tmp_path, beta):
    """TRL's DistillationTrainer (its chunked JSD at T = 1.5 over the completion tokens, on
    completions the student generates) against ours from the same RNG state."""
    stock = distillation(trl.DistillationTrainer, tmp_path, beta=beta)
    ours = distillation(integration.DistillationTrainer, tmp_path, beta=beta)
    batch = next(iter(stock.get_train_dataloader()))
    loss_stock, grad_stock = step_gradients(stock, batch)
    loss_ours, grad_ours = step_gradients(ours, batch)
    # TRL forms FKL as t_gap / t_sum - log Z_t + log Z_s, which cancels where the two are
    # close; this library sums p log(p / q) per token: they agree to float32 rounding.
    assert loss_ours.item() == pytest.approx(loss_stock.item(), rel=1e-4)
    assert relative(grad_ours, grad_stock) < 1e-4
    assert ours._metrics["train"]["entropy"] == pytest.approx(
        stock._metrics["train"]["entropy"], rel=1e-5)


def test_distillation_trainer_akl_fused_and_on_logits_agree(tmp_path):
    options = dict(divergence="akl", divergence_options={"mu": 0.5}, bf16=False)
    fused = distillation(integration.DistillationTrainer, tmp_path, **options)
    logits = distillation(integration.DistillationTrainer, tmp_path, fused_linear=False,
                          log_entropy=False, **options)
    batch = next(iter(fused.get_train_dataloader()))
    loss_fused, grad_fused = step_gradients(fused, batch)
    loss_logits, grad_logits = step_gradients(logits, batch)
    assert loss_fused.item() == pytest.approx(loss_logits.item(), rel=1e-5)
    assert relative(grad_fused, grad_logits) < 1e-5
    assert all(math.isnan(value) for value in logits._metrics["train"]["entropy"])


def test_trls_loss_function_is_restored_after_each_call(tmp_path):
    import sys

    module = sys.modules[trl.DistillationTrainer.__module__]
    original = module._chunked_divergence_loss
    trainer = distillation(integration.DistillationTrainer, tmp_path)
    step_gradients(trainer, next(iter(trainer.get_train_dataloader())))
    assert module._chunked_divergence_loss is original
