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


def tiny_cohere(seed):
    """A config with ``logit_scale`` (Cohere's): TRL scales the logits by it."""
    from transformers import CohereConfig, CohereForCausalLM

    torch.manual_seed(seed)
    return CohereForCausalLM(CohereConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, logit_scale=0.5,
        max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=1))


def tiny_gemma2(seed):
    """A config with final soft-capping (Gemma 2's), tight enough to bend these logits."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    model = Gemma2ForCausalLM(Gemma2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16,
        final_logit_softcapping=0.2, max_position_embeddings=64, pad_token_id=0,
        bos_token_id=1, eos_token_id=1))
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # logits of about +-1 against the cap of 0.2
    return model


def distillation(cls, tmp_path, *, beta=1.0, temperature=1.5, bf16=True, models=tiny_gpt2,
                 **options):
    prompts = torch.randint(3, VOCAB, (8, PROMPT), generator=torch.Generator().manual_seed(3))
    dataset = Dataset.from_list([{"prompt": " ".join(f"w{int(x)}" for x in row)}
                                 for row in prompts])
    args = trl.DistillationConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, beta=beta,
        temperature=temperature, report_to=[], use_cpu=True, max_completion_length=COMPLETION,
        save_strategy="no", logging_steps=1, gradient_checkpointing=False, bf16=bf16)
    trainer = cls(model=models(0), teacher_model=models(1), args=args,
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


@pytest.mark.parametrize("models", [tiny_cohere, tiny_gemma2], ids=["logit_scale", "softcap"])
def test_distillation_trainer_keeps_trls_logit_scale_and_softcap(tmp_path, monkeypatch, models):
    """A model that scales its logits (folded into the hidden states here) or soft-caps them
    (the logits path here): the same step as TRL's, and our loss is the one that ran."""
    stock = distillation(trl.DistillationTrainer, tmp_path, beta=0.5, models=models)
    ours = distillation(integration.DistillationTrainer, tmp_path, beta=0.5, models=models)
    calls = []
    original = ours._divergence_loss
    monkeypatch.setattr(ours, "_divergence_loss",
                        lambda *a, **k: calls.append(k) or original(*a, **k))
    batch = next(iter(stock.get_train_dataloader()))
    loss_stock, grad_stock = step_gradients(stock, batch)
    loss_ours, grad_ours = step_gradients(ours, batch)
    assert len(calls) == 1
    scale, cap = calls[0]["student_logit_scale"], calls[0]["student_final_logit_softcapping"]
    assert (scale, cap) == ((0.5, None) if models is tiny_cohere else (1.0, 0.2))
    assert loss_ours.item() == pytest.approx(loss_stock.item(), rel=1e-4)
    assert relative(grad_ours, grad_stock) < 1e-4


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


def test_our_loss_runs_in_trls_place_and_trls_is_restored_after(tmp_path, monkeypatch):
    import sys

    module = sys.modules[trl.DistillationTrainer.__module__]
    original = module._chunked_divergence_loss
    seen = []
    trainer = distillation(integration.DistillationTrainer, tmp_path)
    ours = trainer._divergence_loss

    def spy(*args, **kwargs):
        seen.append(module._chunked_divergence_loss)
        return ours(*args, **kwargs)

    monkeypatch.setattr(trainer, "_divergence_loss", spy)
    step_gradients(trainer, next(iter(trainer.get_train_dataloader())))
    assert seen and seen[0] is spy  # TRL's call went to ours
    assert module._chunked_divergence_loss is original


class _TeacherServer:
    """Stands in for TRL's VLLMClient: ``get_sequence_logprobs`` answers from a local teacher
    model as the vLLM server would (top-k log-probabilities of each completion token, sorted,
    -inf padded; the actual token's log-probability), so the server trainer runs offline."""

    teacher = None

    def __init__(self, base_url=None, connection_timeout=None, **_):
        self.base_url = base_url

    def get_sequence_logprobs(self, sequences, prompt_lengths, top_logprobs=1, temperature=1.0,
                              **_):
        out = {"logprobs": [], "logprob_token_ids": [], "actual_logprobs": [],
               "actual_token_ids": []}
        for sequence, prompt_length in zip(sequences, prompt_lengths, strict=True):
            ids = torch.tensor([sequence])
            with torch.no_grad():
                log_p = torch.log_softmax(self.teacher(ids).logits[0].float() / temperature, -1)
            rows = log_p[prompt_length - 1:len(sequence) - 1]  # row i scores token i + 1
            top = rows.topk(top_logprobs, dim=-1)
            actual = torch.tensor(sequence[prompt_length:])
            out["logprobs"].append(top.values.tolist())
            out["logprob_token_ids"].append(top.indices.tolist())
            out["actual_logprobs"].append(rows.gather(1, actual[:, None]).tolist())
            out["actual_token_ids"].append(actual[:, None].tolist())
        return out


def server_distillation(cls, tmp_path, monkeypatch, *, beta, top_k, tail, **options):
    import trl.generation.vllm_client as client
    from trl.experimental.server_distillation import ServerDistillationConfig

    _TeacherServer.teacher = tiny_gpt2(1).eval()
    monkeypatch.setattr(client, "VLLMClient", _TeacherServer)
    prompts = torch.randint(3, VOCAB, (8, PROMPT), generator=torch.Generator().manual_seed(4))
    dataset = Dataset.from_list([{"prompt": " ".join(f"w{int(x)}" for x in row)}
                                 for row in prompts])
    args = ServerDistillationConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=1, beta=beta,
        temperature=1.0, loss_top_k=top_k, loss_add_tail=tail, report_to=[], use_cpu=True,
        max_completion_length=COMPLETION, save_strategy="no", logging_steps=1,
        gradient_checkpointing=False, bf16=False,
        teacher_model_server_url="http://teacher.invalid:8000")
    trainer = cls(model=tiny_gpt2(0), args=args, train_dataset=dataset,
                  processing_class=tokenizer(), **options)
    trainer.current_gradient_accumulation_steps = 1
    return trainer


@pytest.mark.parametrize("beta,top_k,tail", [(0.0, 5, True), (0.0, 5, False),
                                             (0.5, 1, True), (1.0, 1, True)])
def test_server_distillation_matches_trls_sparse_losses(tmp_path, monkeypatch, beta, top_k,
                                                        tail):
    """The teacher server's top-k (forward KL) or top-1 support (mixed): TRL's sparse losses
    with and without its tail bucket, as this library's TopKTeacher losses."""
    from trl.experimental.server_distillation import ServerDistillationTrainer as Stock

    stock = server_distillation(Stock, tmp_path, monkeypatch, beta=beta, top_k=top_k,
                                tail=tail)
    ours = server_distillation(integration.ServerDistillationTrainer, tmp_path, monkeypatch,
                               beta=beta, top_k=top_k, tail=tail)
    batch = next(iter(stock.get_train_dataloader()))
    loss_stock, grad_stock = step_gradients(stock, batch)
    loss_ours, grad_ours = step_gradients(ours, batch)
    assert loss_stock.item() > 0
    assert loss_ours.item() == pytest.approx(loss_stock.item(), rel=1e-4)
    assert relative(grad_ours, grad_stock) < 1e-4


def test_server_distillation_trains_with_akl_on_the_servers_top_k(tmp_path, monkeypatch):
    trainer = server_distillation(integration.ServerDistillationTrainer, tmp_path, monkeypatch,
                                  beta=0.0, top_k=8, tail=True, divergence="akl",
                                  divergence_options={"mu": 0.5})
    batch = next(iter(trainer.get_train_dataloader()))
    loss, grad = step_gradients(trainer, batch)
    assert math.isfinite(loss.item()) and loss.item() > 0
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
