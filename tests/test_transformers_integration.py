"""DistillationTrainer and causal_lm_distillation_loss on tiny GPT-2 models, on CPU."""

from __future__ import annotations

import logging

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import GPT2Config, GPT2LMHeadModel, TrainingArguments  # noqa: E402

import akl_kernels  # noqa: E402
from akl_kernels.integrations.transformers import (  # noqa: E402
    DistillationTrainer,
    causal_lm_distillation_loss,
    next_token_labels,
)


def _gpt2(layers, vocab, width=32, seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_positions=32, n_embd=width, n_layer=layers, n_head=2)
    return GPT2LMHeadModel(config)


def _data(rng, vocab=64, n=4, length=16):
    ids = torch.randint(0, vocab, (n, length), generator=rng)
    labels = ids.clone()
    labels[:, :3] = -100  # a prompt that is not scored
    return [dict(input_ids=ids[i], labels=labels[i]) for i in range(n)]


def _trainer(tmp_path, student, teacher, data, steps=6, **options):
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps,
                             per_device_train_batch_size=len(data), learning_rate=1e-2,
                             logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                             disable_tqdm=True)
    return DistillationTrainer(student, teacher, args, train_dataset=data, **options)


def _logs(trainer):
    return [entry for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.parametrize("divergence, options", [
    ("akl", {}), ("fkl", {}), ("rkl", {}), ("jsd", {"divergence_options": {"beta": 0.3}}),
    ("tvd", {}), ("skew_fkl", {}), ("skew_rkl", {}), ("mixed_kl", {}),
])
def test_trainer_learns_and_logs_parts_that_add_up(tmp_path, rng, divergence, options):
    student, teacher = _gpt2(1, 64), _gpt2(2, 64, seed=1)
    teacher_before = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer = _trainer(tmp_path, student, teacher, _data(rng), divergence=divergence,
                       kd_ratio=0.4, temperature=1.5, **options)
    trainer.train()
    logs = _logs(trainer)
    assert len(logs) == 6
    assert logs[-1]["loss"] < logs[0]["loss"]
    for entry in logs:  # the total is (1 - kd) CE + kd D, each a token mean
        parts = 0.6 * entry["cross_entropy"] + 0.4 * entry["kd_divergence"]
        assert entry["loss"] == pytest.approx(parts, rel=1e-5)
        assert ("akl_head_weight" in entry) == (divergence == "akl")
        if divergence == "akl":
            assert 0.0 <= entry["akl_head_weight"] <= 1.0
    # the teacher is frozen, in eval mode, and unchanged
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name])


def test_teacher_with_a_larger_padded_vocabulary(tmp_path, rng, caplog):
    student, teacher = _gpt2(1, 64), _gpt2(2, 72, seed=1)
    trainer = _trainer(tmp_path, student, teacher, _data(rng), steps=3)
    with caplog.at_level(logging.WARNING, logger="akl_kernels.integrations.transformers"):
        trainer.train()
    warnings = [r for r in caplog.records if "shared leading 64 entries" in r.getMessage()]
    assert len(warnings) == 1  # said once
    batch = {k: torch.stack([d[k] for d in _data(rng)]) for k in ("input_ids", "labels")}
    with torch.no_grad():
        s = student(input_ids=batch["input_ids"]).logits
        t = teacher(input_ids=batch["input_ids"]).logits
    out = causal_lm_distillation_loss(s, t, batch["labels"], kd_ratio=1.0)
    expected = akl_kernels.akl_loss(s, t[..., :64], next_token_labels(batch["labels"]))
    assert torch.allclose(out.loss, expected, rtol=1e-6)


def test_plain_function_is_the_shifted_distillation_loss(rng):
    s = torch.randn(2, 7, 50, generator=rng)
    t = torch.randn(2, 7, 50, generator=rng)
    labels = torch.randint(0, 50, (2, 7), generator=rng)
    labels[0, :2] = -100
    out = causal_lm_distillation_loss(s, t, labels, divergence="akl", kd_ratio=0.3, mu=0.6)
    ref = akl_kernels.distillation_loss(s[:, :-1], t[:, :-1], labels[:, 1:], kd_ratio=0.3, mu=0.6,
                                        return_parts=True)
    assert torch.allclose(out.loss, ref.loss, rtol=1e-6)
    assert torch.allclose(out.cross_entropy, ref.cross_entropy, rtol=1e-6)
    assert torch.allclose(out.divergence, ref.divergence, rtol=1e-6)
    stats = akl_kernels.head_tail_stats(s[:, :-1], t[:, :-1], mu=0.6)
    valid = labels[:, 1:] != -100
    assert torch.allclose(out.head_weight, stats.head_weight[valid].mean())


def test_fused_linear_mode_matches_the_logits_mode(tmp_path, rng):
    student, teacher = _gpt2(1, 64), _gpt2(2, 64, seed=1, width=48)
    data = _data(rng)
    batch = {k: torch.stack([d[k] for d in data]) for k in ("input_ids", "labels")}
    losses = []
    for fused in (False, True):
        trainer = _trainer(tmp_path, student, teacher, data, divergence="rkl", fused_linear=fused)
        loss = trainer.compute_loss(student, batch)
        (grad,) = torch.autograd.grad(loss, student.transformer.wte.weight)  # tied to lm_head
        losses.append((loss.detach(), grad))
    assert torch.allclose(losses[0][0], losses[1][0], rtol=1e-5)
    assert (losses[0][1] - losses[1][1]).norm() <= 1e-4 * losses[0][1].norm()
    trainer = _trainer(tmp_path, student, teacher, data, steps=3, fused_linear=True)
    trainer.train()
    assert len(_logs(trainer)) == 3
    metrics = trainer.evaluate(eval_dataset=data)  # the evaluation path returns outputs too
    assert metrics["eval_loss"] > 0


def test_fused_linear_refuses_rescaled_logits(tmp_path):
    student = _gpt2(1, 64)
    student.config.logit_scale = 0.25  # as Cohere's models rescale their logits
    with pytest.raises(ValueError, match="logit_scale"):
        _trainer(tmp_path, student, _gpt2(1, 64, seed=1), [], fused_linear=True)
    _trainer(tmp_path, student, _gpt2(1, 64, seed=1), [])  # on logits it is kept: fine


def test_no_scored_position_reports_no_head_weight(rng):
    s, t = torch.randn(2, 5, 30, generator=rng), torch.randn(2, 5, 30, generator=rng)
    out = causal_lm_distillation_loss(s, t, torch.full((2, 5), -100))
    assert out.loss.item() == 0.0 and out.head_weight is None


def test_causal_lm_loss_names_a_missing_or_integer_argument(rng):
    s = torch.randn(2, 5, 30, generator=rng)
    labels = torch.zeros(2, 5, dtype=torch.long)
    with pytest.raises(TypeError, match="teacher_logits"):
        causal_lm_distillation_loss(s, None, labels)
    with pytest.raises(TypeError, match="student_logits"):
        causal_lm_distillation_loss(s.long(), s, labels)


def test_compiled_student(tmp_path, rng):
    student, teacher = _gpt2(1, 64), _gpt2(1, 64, seed=1)
    student.compile(backend="aot_eager")  # torch.compile in place; no C++ toolchain needed
    trainer = _trainer(tmp_path, student, teacher, _data(rng), steps=3)
    trainer.train()
    logs = _logs(trainer)
    assert len(logs) == 3 and logs[-1]["loss"] < logs[0]["loss"]


def test_without_a_teacher_the_batch_must_carry_its_top_k(tmp_path, rng):
    trainer = _trainer(tmp_path, _gpt2(1, 64), None, _data(rng))
    batch = {k: torch.stack([d[k] for d in _data(rng)]) for k in ("input_ids", "labels")}
    with pytest.raises(ValueError, match="teacher_topk_indices"):
        trainer.compute_loss(trainer.model, batch)


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused_linear"])
def test_student_with_a_larger_vocabulary(tmp_path, rng, fused):
    """The cross-entropy takes the student's whole vocabulary (the model's own loss), the
    divergence the shared leading one; a label among the student's extra tokens trains."""
    student, teacher = _gpt2(1, 72), _gpt2(2, 64, seed=1)
    data = _data(rng)
    data[0]["labels"][5] = 70  # a token only the student has
    batch = {k: torch.stack([d[k] for d in data]) for k in ("input_ids", "labels")}
    trainer = _trainer(tmp_path, student, teacher, data, steps=2, kd_ratio=0.5,
                       fused_linear=fused)
    student.eval()  # no dropout: every call below sees the same logits
    loss = trainer.compute_loss(student, batch)
    (grad,) = torch.autograd.grad(loss, student.lm_head.weight)
    own_ce = student(**batch).loss  # the model's own shifted cross-entropy, full vocabulary
    with torch.no_grad():
        s, t = student(batch["input_ids"]).logits, teacher(batch["input_ids"]).logits
    out = causal_lm_distillation_loss(s, t, batch["labels"], kd_ratio=0.5)
    assert out.cross_entropy == pytest.approx(own_ce.item(), rel=1e-5)
    divergence = akl_kernels.akl_loss(s[..., :64], t, next_token_labels(batch["labels"]))
    assert out.divergence == pytest.approx(divergence.item(), rel=1e-5)
    assert loss.item() == pytest.approx(out.loss.item(), rel=1e-4)
    assert grad[64:].abs().sum() > 0  # the extra tokens learn, from the cross-entropy
    trainer.train()  # and training does not stop at the extra label
    assert len(_logs(trainer)) == 2


@pytest.mark.parametrize("options,error,name", [
    (dict(divergence="kl"), ValueError, "divergence"),
    (dict(divergence=["akl"]), TypeError, "divergence"),
    (dict(kd_ratio=1.5), ValueError, "kd_ratio"),
    (dict(mu=0.0), ValueError, "mu"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(divergence="jsd", divergence_options={"lam": 0.1}), TypeError, "lam"),
    (dict(loss_backend="gpu"), ValueError, "backend"),
    (dict(fused_linear="yes"), TypeError, "fused_linear"),
], ids=repr)
def test_trainer_options_are_checked_when_it_is_built(tmp_path, options, error, name):
    with pytest.raises(error, match=name):
        _trainer(tmp_path, _gpt2(1, 64), _gpt2(1, 64, seed=1), [], **options)


def test_a_batch_without_labels_is_a_clear_error(tmp_path, rng):
    trainer = _trainer(tmp_path, _gpt2(1, 64), _gpt2(1, 64, seed=1), _data(rng))
    ids = torch.stack([d["input_ids"] for d in _data(rng)])
    with pytest.raises(ValueError, match="labels"):
        trainer.compute_loss(trainer.model, {"input_ids": ids})
