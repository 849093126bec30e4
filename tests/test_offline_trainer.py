"""DistillationTrainer's offline mode: the teacher's top-k read from the batch
(docs/contract.md §6), from a cache written once, every divergence, both tail rules."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("datasets")

from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments

import akl_kernels
from akl_kernels.integrations.transformers import (
    DistillationTrainer,
    causal_lm_distillation_loss,
    next_token_labels,
)
from akl_kernels.topk_cache import load_topk_cache, write_topk_cache
from akl_kernels.topk_collator import TopKCollator, topk_teacher_from_batch

VOCAB = 64


def _gpt2(layers, seed, width=32):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=width,
                                      n_layer=layers, n_head=2))


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A teacher's top-16 over 8 sequences of mixed lengths, written once."""
    gen = torch.Generator().manual_seed(0)
    sequences = [dict(input_ids=torch.randint(0, VOCAB, (int(n),), generator=gen).tolist())
                 for n in torch.randint(6, 14, (8,), generator=gen)]
    teacher = _gpt2(2, seed=1)
    path = tmp_path_factory.mktemp("cache") / "topk"
    write_topk_cache(teacher, sequences, path, k=16, temperature=1.0, progress=False)
    return teacher, load_topk_cache(path)


def _trainer(tmp_path, student, data, steps=6, **options):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps,
                             per_device_train_batch_size=4, learning_rate=1e-2,
                             logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True, remove_unused_columns=False)
    return DistillationTrainer(student, None, args, train_dataset=data,
                               data_collator=TopKCollator(pad_token_id=0), **options)


def _batch(data, n=4):
    return TopKCollator(pad_token_id=0)([data[i] for i in range(n)])


@pytest.mark.parametrize("divergence", ["akl", "fkl", "rkl", "jsd", "tvd"])
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_offline_trainer_trains_and_its_loss_is_the_function(tmp_path, cache, divergence, tail):
    _, data = cache
    student = _gpt2(1, seed=2)
    trainer = _trainer(tmp_path, student, data, divergence=divergence, kd_ratio=0.7,
                       temperature=1.0, topk_tail=tail)
    batch = _batch(data)
    student.eval()  # no dropout: the same logits twice
    loss = trainer.compute_loss(student, batch)
    with torch.no_grad():
        logits = student(input_ids=batch["input_ids"],
                         attention_mask=batch["attention_mask"]).logits
    want = causal_lm_distillation_loss(logits, topk_teacher_from_batch(batch, tail=tail),
                                       batch["labels"], divergence=divergence, kd_ratio=0.7)
    assert loss.item() == pytest.approx(want.loss.item(), rel=1e-5)
    sparse = topk_teacher_from_batch(batch, tail=tail)
    direct = akl_kernels.distillation_loss(logits, sparse, next_token_labels(batch["labels"]),
                                           divergence=divergence, kd_ratio=0.7)
    assert loss.item() == pytest.approx(direct.item(), rel=1e-5)
    student.train()
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 6 and logs[-1]["loss"] < logs[0]["loss"]
    for entry in logs:
        parts = 0.3 * entry["cross_entropy"] + 0.7 * entry["kd_divergence"]
        assert entry["loss"] == pytest.approx(parts, rel=1e-5)


def test_the_cached_teacher_is_the_online_teacher(tmp_path, cache):
    """With k = 16 of 64 tokens in bucket mode the offline loss differs from the online one,
    but both train toward the same teacher: the cache holds the teacher's own top-k."""
    teacher, data = cache
    batch = _batch(data)
    teacher.eval()  # as the cache writer ran it (no dropout)
    with torch.no_grad():
        t = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    built = akl_kernels.topk_teacher(t, 16)
    scored = next_token_labels(batch["labels"]) != -100
    cached = topk_teacher_from_batch(batch)
    assert torch.equal(cached.indices[scored], built.indices[scored])
    assert torch.allclose(cached.logprobs[scored], built.logprobs[scored], atol=1e-5)


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_offline_fused_linear_matches_the_logits_mode(tmp_path, cache, tail):
    _, data = cache
    student = _gpt2(1, seed=3)
    student.eval()
    batch = _batch(data)
    results = []
    for fused in (False, True):
        trainer = _trainer(tmp_path, student, data, divergence="akl", fused_linear=fused,
                           topk_tail=tail)
        loss = trainer.compute_loss(student, batch)
        (grad,) = torch.autograd.grad(loss, student.transformer.wte.weight)
        results.append((loss.detach(), grad))
    assert torch.allclose(results[0][0], results[1][0], rtol=1e-5)
    assert (results[0][1] - results[1][1]).norm() <= 1e-4 * results[0][1].norm()
    student.train()
    trainer = _trainer(tmp_path, student, data, steps=3, fused_linear=True, topk_tail=tail)
    trainer.train()


def test_topk_tail_is_checked(tmp_path, cache):
    with pytest.raises(ValueError, match="tail"):
        _trainer(tmp_path, _gpt2(1, seed=2), cache[1], topk_tail="drop")
