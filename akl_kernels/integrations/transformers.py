"""Hugging Face ``transformers`` integration: distil a teacher into a causal LM.

- ``causal_lm_distillation_loss``: the loss of one batch for a custom loop: next-token labels,
  a teacher whose padded vocabulary differs, the loss parts for logging.
- ``DistillationTrainer``: a ``transformers.Trainer`` whose loss is that (or its fused linear
  form, straight from the last hidden states), with the teacher in eval mode without gradients
  and the parts logged through the Trainer's logging.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
from transformers import Trainer

from akl_kernels import validation as checks
from akl_kernels.config import make_config
from akl_kernels.fused_linear_losses import fused_linear_distillation_loss, fused_linear_loss
from akl_kernels.losses import distillation_loss, divergence_loss, head_tail_stats
from akl_kernels.row_results import mix_terms
from akl_kernels.topk_collator import (
    TEACHER_TOPK_INDICES,
    TEACHER_TOPK_LOGPROBS,
    topk_teacher_from_batch,
)
from akl_kernels.topk_teacher import TopKTeacher

logger = logging.getLogger(__name__)


class CausalLMDistillation(NamedTuple):
    """One batch's loss and its parts (each the mean over predicted tokens; no gradient on the
    parts). ``head_weight`` is AKL's mean ``w_head`` (None for other divergences or when not
    asked for)."""

    loss: torch.Tensor
    cross_entropy: torch.Tensor
    divergence: torch.Tensor
    head_weight: torch.Tensor | None


def next_token_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """``labels`` shifted left by one along the sequence (position i is scored on token i + 1),
    the last position ignored. Shifting the labels instead of the logits keeps the logits
    unsliced, so no copy of them is made."""
    shifted = torch.full_like(labels, ignore_index)
    shifted[..., :-1] = labels[..., 1:]
    return shifted


def shared_vocabulary(student_size: int, teacher_size: int, warn_once: list | None = None) -> int:
    """The leading vocabulary both models have: a teacher (or student) padded to a larger
    vocabulary (e.g. a multiple of 64) is cut to the other's size, said once per ``warn_once``
    list (an empty list the first time)."""
    shared = min(student_size, teacher_size)
    if student_size != teacher_size and (warn_once is None or not warn_once):
        logger.warning("student vocabulary %d != teacher vocabulary %d: distilling on the shared "
                       "leading %d entries", student_size, teacher_size, shared)
        if warn_once is not None:
            warn_once.append(True)
    return shared


def _with_student_only_tokens(divergence_part, cross_entropy_part, kd_ratio):
    """The loss of a student with tokens the teacher lacks: the divergence on the shared
    vocabulary, the cross-entropy on the student's whole vocabulary (computed apart)."""
    return CausalLMDistillation(mix_terms(divergence_part, cross_entropy_part, kd_ratio),
                                cross_entropy_part.detach(), divergence_part.detach(), None)


def causal_lm_distillation_loss(student_logits, teacher_logits, labels, *, divergence="akl",
                                kd_ratio=0.5, temperature=1.0, ignore_index=-100,
                                with_head_weight=True, backend="auto", warn_once=None,
                                **divergence_options) -> CausalLMDistillation:
    """``distillation_loss`` for causal LM outputs ``[B, L, V]`` and the batch's unshifted
    ``labels`` ``[B, L]``: ``(1 - kd_ratio) CE + kd_ratio divergence`` on next-token
    positions. ``kd_ratio = 1`` is pure distillation.

    The cross-entropy takes the student's whole vocabulary; the divergence compares the two
    models on the leading vocabulary both have, each distribution renormalised there (tokens
    only one model has take no part in it). ``teacher_logits`` may be a ``TopKTeacher``
    aligned with the logits (row i: the teacher's distribution of token i + 1); its indices
    are the student's token ids."""
    # The vocabularies are compared before distillation_loss checks the rest.
    checks.check_float_tensor("student_logits", student_logits)
    if not isinstance(teacher_logits, TopKTeacher):
        checks.check_float_tensor("teacher_logits", teacher_logits)
    teacher_vocab = (student_logits.shape[-1] if isinstance(teacher_logits, TopKTeacher)
                     else teacher_logits.shape[-1])
    vocab = shared_vocabulary(student_logits.shape[-1], teacher_vocab, warn_once)
    shared_student = student_logits[..., :vocab]
    if not isinstance(teacher_logits, TopKTeacher):
        teacher_logits = teacher_logits[..., :vocab]
    targets = next_token_labels(labels, ignore_index)
    options = dict(divergence=divergence, temperature=temperature, ignore_index=ignore_index,
                   backend=backend, **divergence_options)
    if vocab == student_logits.shape[-1]:  # one fused pass: CE and divergence together
        out = distillation_loss(student_logits, teacher_logits, targets, kd_ratio=kd_ratio,
                                return_parts=True, **options)
        out = CausalLMDistillation(out.loss, out.cross_entropy, out.divergence, None)
    else:
        out = _with_student_only_tokens(
            divergence_loss(shared_student, teacher_logits, targets, **options),
            distillation_loss(student_logits, None, targets, kd_ratio=0.0, **options),
            kd_ratio)
    head_weight = None
    if with_head_weight and divergence == "akl":
        split = {k: v for k, v in divergence_options.items() if k in ("mu", "include_crossing")}
        stats = head_tail_stats(shared_student.detach(), teacher_logits, temperature=temperature,
                                backend=backend, **split)
        valid = targets != ignore_index
        # No scored position: no head weight to report (None, not a sum over nothing).
        head_weight = stats.head_weight[valid].mean() if bool(valid.any()) else None
    return out._replace(head_weight=head_weight)


class DistillationTrainer(Trainer):
    """A ``transformers.Trainer`` that distils ``teacher_model`` into ``model`` (both causal LMs
    taking the same ``input_ids``), MiniLLM / AKL-paper style:
    ``loss = (1 - kd_ratio) CE(labels) + kd_ratio divergence(student, teacher)`` per predicted
    token, the batch's ``labels`` unshifted (as for the model's own loss).

    ``divergence`` is any of this library's ("akl" by default, with ``mu``); further options
    (``beta``, ``lam``, ``include_crossing``) go in ``divergence_options``. With
    ``fused_linear=True`` the loss is computed from both models' last hidden states and output
    embeddings, so neither model's logits are stored (``fused_linear_distillation_loss``; the
    models are called with ``output_hidden_states=True, logits_to_keep=1``, and models whose
    config rescales or soft-caps the logits are refused); the head weight is then not logged.
    Logged with the loss: ``cross_entropy``, ``kd_divergence`` and, for AKL on logits,
    ``akl_head_weight``, each averaged over the logging interval. The loss is each
    micro-batch's token mean; with gradient accumulation the Trainer averages those means.

    Offline distillation: with ``teacher_model=None`` the teacher is the top-k
    log-probabilities every batch carries as ``teacher_topk_indices`` and
    ``teacher_topk_logprobs`` (``[B, L, k]``, row i the teacher's distribution of token i + 1,
    -inf at padding: what ``akl_kernels.topk_collator.TopKCollator`` gives from a cache written
    by ``akl_kernels.topk_cache.write_topk_cache``), with ``topk_tail`` ("bucket" or
    "renormalize") for the mass outside the k tokens (docs/contract.md §6). A batch of an
    online run may carry them too: they are then ignored (and not passed to the models).
    """

    def __init__(self, model=None, teacher_model=None, args=None, *, divergence="akl",
                 kd_ratio=0.5, mu=0.5, temperature=1.0, divergence_options=None,
                 fused_linear=False, log_head_weight=True, loss_backend="auto",
                 topk_tail="bucket", **kwargs):
        options = dict(divergence_options or {})
        if divergence == "akl":
            options.setdefault("mu", mu)
        # Every option is checked here, before any model is moved or any step is taken.
        make_config(divergence, options, temperature=temperature, kd_ratio=kd_ratio)
        checks.check_backend_name(loss_backend)
        for name, value in (("fused_linear", fused_linear), ("log_head_weight", log_head_weight)):
            checks.check_bool(name, value)
        checks.check_tail(topk_tail)
        if fused_linear:
            for role, net in (("model", model), ("teacher_model", teacher_model)):
                if net is not None:
                    _check_plain_output_layer(role, net)
        super().__init__(model=model, args=args, **kwargs)
        self.loss_options = dict(divergence=divergence, kd_ratio=kd_ratio,
                                 temperature=temperature, backend=loss_backend, **options)
        self.fused_linear = fused_linear
        self.log_head_weight = log_head_weight
        self.topk_tail = topk_tail
        self.teacher = (None if teacher_model is None
                        else teacher_model.to(self.args.device).eval().requires_grad_(False))
        # The loss is a per-token mean of each micro-batch; the Trainer divides it by the
        # gradient accumulation steps (as for any loss that takes no num_items_in_batch).
        self.model_accepts_loss_kwargs = False
        self._parts: dict[str, list[torch.Tensor]] = {}
        self._vocab_warned: list = []

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if "labels" not in inputs:
            raise ValueError(
                "DistillationTrainer needs a 'labels' entry in every batch (the token ids, "
                "unshifted, -100 where not scored; e.g. DataCollatorForLanguageModeling(mlm="
                f"False) adds them); this batch has {sorted(inputs)}")
        labels = inputs["labels"]
        batch_only = ("labels", TEACHER_TOPK_INDICES, TEACHER_TOPK_LOGPROBS)
        model_inputs = {k: v for k, v in inputs.items() if k not in batch_only}
        sparse = self._sparse_teacher(inputs)
        if self.fused_linear:
            out, outputs = self._fused_linear_loss(model, model_inputs, labels, sparse)
        else:
            outputs = model(**model_inputs)
            teacher_logits = sparse if sparse is not None else self._teacher(model_inputs).logits
            out = causal_lm_distillation_loss(
                outputs.logits, teacher_logits, labels, warn_once=self._vocab_warned,
                with_head_weight=self.log_head_weight and model.training, **self.loss_options)
        if model.training:
            self._record(out)
        return (out.loss, outputs) if return_outputs else out.loss

    def _sparse_teacher(self, inputs):
        """The batch's top-k teacher in offline mode (None with a teacher model)."""
        if self.teacher is not None:
            return None
        missing = [k for k in (TEACHER_TOPK_INDICES, TEACHER_TOPK_LOGPROBS) if k not in inputs]
        if missing:
            raise ValueError(
                "DistillationTrainer without teacher_model reads the teacher's top-k from the "
                f"batch: it needs {missing} (e.g. from akl_kernels.topk_collator.TopKCollator "
                f"over a cache of akl_kernels.topk_cache.write_topk_cache); this batch has "
                f"{sorted(inputs)}")
        return topk_teacher_from_batch(inputs, tail=self.topk_tail)

    def _teacher(self, model_inputs):
        """The teacher's outputs: no gradient, no KV cache, under the mixed precision the
        Trainer gives the student (``accelerator.autocast``: bf16/fp16 when asked for)."""
        with torch.no_grad(), self.accelerator.autocast():
            return self.teacher(**model_inputs, use_cache=False)

    def _fused_linear_loss(self, model, model_inputs, labels, sparse=None):
        # Through the (possibly wrapped: DDP, autocast, compiled) model itself, asking for the
        # last hidden states and the logits of one position only.
        hidden_inputs = dict(model_inputs, output_hidden_states=True, logits_to_keep=1)
        outputs = model(**hidden_inputs)
        hidden = outputs.hidden_states[-1]
        student_head = _unwrap(model).get_output_embeddings()
        targets = next_token_labels(labels)
        options = dict(self.loss_options)
        kd_ratio = options.pop("kd_ratio")
        if sparse is not None:  # offline: the top-k teacher over the student's vocabulary
            out = fused_linear_distillation_loss(
                hidden, student_head.weight, targets, student_bias=student_head.bias,
                kd_ratio=kd_ratio, return_parts=True, teacher_logits=sparse, **options)
            return CausalLMDistillation(out.loss, out.cross_entropy, out.divergence,
                                        None), outputs
        teacher_hidden = self._teacher(hidden_inputs).hidden_states[-1]
        teacher_head = self.teacher.get_output_embeddings()
        vocab = shared_vocabulary(student_head.weight.shape[0], teacher_head.weight.shape[0],
                                  self._vocab_warned)
        bias = lambda head: None if head.bias is None else head.bias[:vocab]  # noqa: E731
        teacher = dict(teacher_hidden=teacher_hidden, teacher_weight=teacher_head.weight[:vocab],
                       teacher_bias=bias(teacher_head))
        if vocab == student_head.weight.shape[0]:
            out = fused_linear_distillation_loss(
                hidden, student_head.weight, targets, student_bias=student_head.bias,
                kd_ratio=kd_ratio, return_parts=True, **teacher, **options)
            out = CausalLMDistillation(out.loss, out.cross_entropy, out.divergence, None)
        else:  # as causal_lm_distillation_loss: the CE over the student's whole vocabulary
            out = _with_student_only_tokens(
                fused_linear_loss(hidden, student_head.weight[:vocab], targets,
                                  student_bias=bias(student_head), **teacher, **options),
                fused_linear_distillation_loss(hidden, student_head.weight, targets,
                                               student_bias=student_head.bias, kd_ratio=0.0,
                                               **options),
                kd_ratio)
        return out, outputs

    def _record(self, out: CausalLMDistillation):
        parts = {"cross_entropy": out.cross_entropy, "kd_divergence": out.divergence,
                 "akl_head_weight": out.head_weight}
        for name, value in parts.items():
            if value is not None:  # kept on the device: no host sync per micro-batch
                self._parts.setdefault(name, []).append(value.detach())

    def log(self, logs, *args, **kwargs):
        if "loss" in logs and self._parts:  # a training log: add the parts' interval means
            logs = {**logs, **{name: torch.stack(v).mean().item()
                               for name, v in self._parts.items()}}
            self._parts = {}
        super().log(logs, *args, **kwargs)


# Output-layer transforms that `hidden @ W.T + b` would silently drop (Cohere's logit_scale,
# Gemma 2/3's final soft-capping, Granite's logits_scaling).
_LOGIT_TRANSFORMS = ("logit_scale", "final_logit_softcapping", "logits_scaling")


def _check_plain_output_layer(role, model):
    config = getattr(model, "config", None)
    for name in _LOGIT_TRANSFORMS:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise ValueError(
                f"fused_linear=True computes {role}'s logits as hidden @ weight.T + bias, but its "
                f"config sets {name}={value!r}, which that would drop; use fused_linear=False")


def _unwrap(model):
    """The model under torch.compile's or a wrapper's ``_orig_mod`` / ``module``."""
    for attribute in ("_orig_mod", "module"):
        model = getattr(model, attribute, model)
    return model
