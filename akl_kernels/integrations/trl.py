"""TRL's distillation trainers on this library's losses (TRL 1.16, the ``trl`` extra's pin).

Drop-in subclasses, named as TRL names them, whose loss is any divergence of this library:

- ``GKDTrainer`` (TRL's ``trl.experimental.gkd.GKDTrainer``: on-policy generation with
  ``lmbda``, ``seq_kd``, ChatML data): ``divergence="jsd"`` (the default) takes TRL's
  ``GKDConfig.beta``; ``divergence="akl"`` (with ``mu``, ``include_crossing`` in
  ``divergence_options``) or any other is one argument away; ``fused_linear=True`` computes it
  from both models' last hidden states and output layers, so no logits exist.
- ``DistillationTrainer`` (TRL's ``trl.DistillationTrainer``: on-policy generation, vLLM,
  tools): its chunked hidden-state JSD replaced by this library's fused linear loss (or, with
  ``fused_linear=False``, the loss on materialised logits).
- ``ServerDistillationTrainer`` (TRL's ``trl.experimental.server_distillation``: a teacher on a
  vLLM server that returns its top-k log-probabilities): the sparse losses on those top-k
  tokens are this library's sparse-teacher losses (``TopKTeacher``, docs/contract.md §6),
  TRL's ``loss_add_tail`` being ``tail="bucket"`` and its absence ``tail="renormalize"``.

Inside each trainer TRL's conventions hold exactly, and differ from this library's defaults
where TRL's do:

- GKD's ``temperature`` is a sampling temperature only: its loss runs at T = 1, as TRL's does.
  The DistillationTrainer divides both models' logits by its ``temperature`` (and, as TRL does,
  applies each model's ``logit_scale`` and final soft-capping first); neither applies a
  ``T**2`` factor (this library never does).
- The reduction is TRL's: the sum over scored tokens divided by ``num_items_in_batch`` when
  the Trainer passes it (the global count of valid tokens: gradient-accumulation and
  data-parallel correct), else the mean over this batch's scored tokens (0 for none).
- GKD scores position i on token i + 1 where ``labels`` is not -100; the DistillationTrainer
  scores the completion tokens of its mask. Hard labels: neither TRL trainer has a
  cross-entropy term, so neither has one here.
- ``beta`` keeps TRL's meaning for ``divergence="jsd"``: 0 is forward KL, 1 reverse KL (the
  same convention as ``akl_kernels.jsd_loss``).
"""

from __future__ import annotations

import contextlib
import sys

import torch
from trl import DistillationTrainer as _TRLDistillationTrainer
from trl.experimental.gkd import GKDTrainer as _TRLGKDTrainer
from trl.experimental.server_distillation import (
    ServerDistillationTrainer as _TRLServerDistillationTrainer,
)

from akl_kernels import validation as checks
from akl_kernels.config import make_config
from akl_kernels.fused_linear_losses import fused_linear_loss
from akl_kernels.integrations.transformers import (
    _check_plain_output_layer,
    _unwrap,
    next_token_labels,
)
from akl_kernels.losses import divergence_loss
from akl_kernels.topk_teacher import TopKTeacher

# TRL's DistillationTrainer calls this module-level function for its loss; ours takes its
# place for the duration of each loss call (``_trl_loss_replaced``), so that everything else
# (the hidden states, the heads' scales, the reductions' counts, the metrics) stays TRL's.
_TRL_DISTILLATION_MODULE = sys.modules[_TRLDistillationTrainer.__module__]
_TRL_LOSS_FUNCTION = "_chunked_divergence_loss"
if not hasattr(_TRL_DISTILLATION_MODULE, _TRL_LOSS_FUNCTION):
    raise ImportError(f"akl_kernels.integrations.trl needs TRL's {_TRL_LOSS_FUNCTION} in "
                      f"{_TRL_DISTILLATION_MODULE.__name__} (TRL 1.16); this TRL has none")
_ENTROPY_CHUNK_BYTES = 256 * 2**20  # float32 logits per chunk of the entropy metric


class _LibraryLoss:
    """The divergence a trainer computes with this library: its name and options, checked
    once; ``beta`` is TRL's, used when the divergence is the JSD."""

    def __init__(self, divergence, divergence_options, *, beta, temperature, fused_linear,
                 backend):
        options = dict(divergence_options or {})
        if divergence == "jsd":
            if "beta" in options:
                raise TypeError("divergence='jsd' takes TRL's beta (the config's beta), not "
                                "divergence_options['beta']")
            options["beta"] = beta
        make_config(divergence, options, temperature=temperature)
        checks.check_bool("fused_linear", fused_linear)
        checks.check_backend_name(backend)
        self.divergence, self.options = divergence, options
        self.fused_linear, self.backend = fused_linear, backend

    def __call__(self, student, second, labels, *, temperature, num_items_in_batch,
                 beta=None, **fused):
        """TRL's reduction of the divergence: ``sum / num_items_in_batch`` when given, else the
        mean over the scored tokens. ``beta``: TRL's value at this call (the JSD's).
        ``student`` and ``second`` are the two models' logits, or with ``fused``
        (``teacher_hidden``, ``teacher_weight``, biases) the student's hidden states and
        weight."""
        reduction = "mean" if num_items_in_batch is None else "sum"
        options = dict(self.options)
        if beta is not None and self.divergence == "jsd":
            options["beta"] = beta
        options = dict(divergence=self.divergence, temperature=temperature,
                       reduction=reduction, backend=self.backend, **options)
        if fused:
            loss = fused_linear_loss(student, second, labels, **fused, **options)
        else:
            loss = divergence_loss(student, second, labels, **options)
        if num_items_in_batch is not None:
            loss = loss / torch.as_tensor(num_items_in_batch, device=loss.device)
        return loss


class GKDTrainer(_TRLGKDTrainer):
    """TRL's ``GKDTrainer`` with this library's loss (the module docstring says what is kept).

    ``divergence`` (default "jsd", with the config's ``beta``), ``divergence_options`` (e.g.
    ``{"mu": 0.5}`` for AKL), ``fused_linear`` (from the last hidden states: no logits) and
    ``loss_backend`` ("auto", "torch", "triton") are keyword arguments; everything else is
    TRL's. The loss is TRL's ``generalized_jsd_loss`` for ``divergence="jsd"``, at T = 1."""

    def __init__(self, *args, divergence="jsd", divergence_options=None, fused_linear=False,
                 loss_backend="auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.library_loss = _LibraryLoss(divergence, divergence_options, beta=self.beta,
                                         temperature=1.0, fused_linear=fused_linear,
                                         backend=loss_backend)
        if fused_linear:
            for role, net in (("model", self.model), ("teacher_model", self.teacher_model)):
                _check_plain_output_layer(role, _unwrap(net))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        model_inputs = dict(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        # Position i is scored on token i + 1 (TRL slices the logits; shifting the labels
        # instead scores the same positions without copying the logits).
        labels = next_token_labels(inputs["labels"])
        self.teacher_model.eval()
        if self.library_loss.fused_linear:
            # The student's logits of one position only, unless the caller wants its outputs
            # (evaluation): then they are whole, as TRL returns them.
            keep = {} if return_outputs else {"logits_to_keep": 1}
            outputs = model(**model_inputs, output_hidden_states=True, **keep)
            with torch.no_grad():
                teacher = self.teacher_model(**model_inputs, output_hidden_states=True,
                                             logits_to_keep=1)
            hidden, teacher_hidden = outputs.hidden_states[-1], teacher.hidden_states[-1]
            student_head = _unwrap(model).get_output_embeddings()
            teacher_head = _unwrap(self.teacher_model).get_output_embeddings()
            loss = self.library_loss(
                hidden, _plain(student_head.weight, hidden), labels, temperature=1.0,
                num_items_in_batch=num_items_in_batch,
                student_bias=_plain(student_head.bias, hidden), teacher_hidden=teacher_hidden,
                teacher_weight=_detached(_plain(teacher_head.weight, teacher_hidden)),
                teacher_bias=_detached(_plain(teacher_head.bias, teacher_hidden)))
        else:
            outputs = model(**model_inputs)
            with torch.no_grad():
                teacher_logits = self.teacher_model(**model_inputs).logits
            loss = self.library_loss(outputs.logits, teacher_logits, labels, temperature=1.0,
                                     num_items_in_batch=num_items_in_batch)
        return (loss, outputs) if return_outputs else loss


def _detached(x):
    return None if x is None else x.detach()


def _plain(x, hidden):
    """An output layer's weight or bias as a plain tensor in the hidden states' dtype: an
    FSDP2-sharded head's DTensor gathered whole, and under mixed precision its float32 master
    copy cast to the compute dtype (as TRL's own loss does)."""
    if x is None:
        return None
    if type(x).__name__ == "DTensor":
        x = x.full_tensor()
    return x.to(hidden.dtype)


class DistillationTrainer(_TRLDistillationTrainer):
    """TRL's ``DistillationTrainer`` with this library's loss (the module docstring says what
    is kept): ``divergence`` (default "jsd" with the config's ``beta``, whose default is 1:
    reverse KL), ``divergence_options``, ``fused_linear`` (default True: TRL's trainer never
    materialises logits either), ``loss_backend`` and ``log_entropy`` (TRL logs the student's
    mean entropy; computing it costs one more pass over the student's output layer, which
    ``log_entropy=False`` skips: the metric is then NaN, which TRL's ``log`` reports as None)
    are keyword arguments."""

    def __init__(self, *args, divergence="jsd", divergence_options=None, fused_linear=True,
                 loss_backend="auto", log_entropy=True, **kwargs):
        checks.check_bool("log_entropy", log_entropy)
        super().__init__(*args, **kwargs)
        self.library_loss = _LibraryLoss(divergence, divergence_options, beta=self.beta,
                                         temperature=self.temperature,
                                         fused_linear=fused_linear, backend=loss_backend)
        self.log_entropy = log_entropy

    def _compute_loss(self, unwrapped_student, inputs, num_items_in_batch):
        with _trl_loss_replaced(self._divergence_loss):
            return super()._compute_loss(unwrapped_student, inputs, num_items_in_batch)

    def _divergence_loss(self, student_hidden_states, teacher_hidden_states,
                         student_lm_head_weight, teacher_lm_head_weight, completion_mask, beta,
                         num_items_in_batch=None, student_lm_head_bias=None,
                         teacher_lm_head_bias=None, student_logit_scale=1.0,
                         teacher_logit_scale=1.0, student_final_logit_softcapping=None,
                         teacher_final_logit_softcapping=None, temperature=1.0):
        """What TRL's chunked loss returns, (loss, student entropy sum, scored tokens), with
        this library's divergence (called by TRL's ``_compute_loss`` with its arguments)."""
        valid = completion_mask.reshape(-1) != 0
        labels = torch.where(valid, 0, -100).reshape(completion_mask.shape)
        s_hidden, t_hidden = student_hidden_states, teacher_hidden_states
        student = _OutputLayer(s_hidden, _plain(student_lm_head_weight, s_hidden),
                               _plain(student_lm_head_bias, s_hidden), student_logit_scale,
                               student_final_logit_softcapping)
        # TRL differentiates the student only (its teacher's parameters may still ask for grad).
        teacher = _OutputLayer(t_hidden, _detached(_plain(teacher_lm_head_weight, t_hidden)),
                               _detached(_plain(teacher_lm_head_bias, t_hidden)),
                               teacher_logit_scale, teacher_final_logit_softcapping)
        loss_options = dict(temperature=temperature, num_items_in_batch=num_items_in_batch,
                            beta=beta)
        if self.library_loss.fused_linear and not (student.softcap or teacher.softcap):
            s_hidden, s_weight, s_bias = student.linear()
            t_hidden, t_weight, t_bias = teacher.linear()
            loss = self.library_loss(s_hidden, s_weight, labels, student_bias=s_bias,
                                     teacher_hidden=t_hidden, teacher_weight=t_weight,
                                     teacher_bias=t_bias, **loss_options)
        else:  # soft-capping is not linear: the logits are formed (or fused_linear=False)
            with torch.no_grad():
                teacher_logits = teacher.logits()
            loss = self.library_loss(student.logits(), teacher_logits, labels, **loss_options)
        entropy = (student.entropy_sum(valid, temperature) if self.log_entropy
                   else torch.tensor(float("nan"), device=loss.device))
        return loss, entropy, valid.sum()


class ServerDistillationTrainer(_TRLServerDistillationTrainer):
    """TRL's ``ServerDistillationTrainer`` with this library's sparse-teacher losses on the
    teacher server's tokens: the top-k of the forward path (``beta = 0``, ``loss_top_k``
    tokens) and the top-1 support of the mixed path (the teacher's top token and the sampled
    one), each with TRL's tail rule (``loss_add_tail``: the rest of the vocabulary as one
    bucket; without it, both distributions renormalised on the support) and TRL's reduction
    (the mean over scored tokens). ``divergence`` (default "jsd", TRL's ``beta``),
    ``divergence_options`` and ``loss_backend`` are keyword arguments; with
    ``divergence="akl"`` the head is chosen among the server's tokens. The student's mass
    outside the support is taken from its whole distribution, not as ``1 - sum_k q`` (which
    cancels when the support holds nearly all of it)."""

    def __init__(self, *args, divergence="jsd", divergence_options=None, loss_backend="auto",
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.library_loss = _LibraryLoss(divergence, divergence_options, beta=self.beta,
                                         temperature=1.0, fused_linear=False,
                                         backend=loss_backend)

    def _compute_server_forward_kl_loss(self, teacher_result, student_log_probs, labels):
        return self._support_loss(student_log_probs, teacher_result["topk_token_ids"],
                                  teacher_result["topk_logprobs"], labels)

    def _compute_sparse_top_1_divergence_loss(self, student_log_probs, teacher_top1_token_ids,
                                              teacher_top1_logprobs, reverse_token_ids,
                                              reverse_teacher_logprobs, labels,
                                              num_items_in_batch=None):
        del num_items_in_batch  # TRL's server path reduces locally (its mean), as here
        if self.beta == 1:  # reverse KL: the sampled token alone
            ids, logprobs = reverse_token_ids[..., None], reverse_teacher_logprobs[..., None]
        else:  # the teacher's top token and the sampled one, counted once when they agree
            ids = torch.stack([teacher_top1_token_ids, reverse_token_ids], dim=-1)
            logprobs = torch.stack([teacher_top1_logprobs, reverse_teacher_logprobs], dim=-1)
            same = reverse_token_ids == teacher_top1_token_ids
            logprobs[..., 1] = torch.where(same, float("-inf"), logprobs[..., 1])
        return self._support_loss(student_log_probs, ids, logprobs, labels)

    def _support_loss(self, student_log_probs, ids, logprobs, labels):
        """The divergence on the server's support: ``student_log_probs`` [B, T, V] (TRL's
        ``log_softmax(logits / T)``, so the loss runs at T = 1 on them), ``ids`` and
        ``logprobs`` [B, T, k] (-inf: padding), ``labels`` -100 where not scored."""
        scored = labels != -100
        # Rows not scored may carry no token at all: one certain token stands in (their loss
        # and gradient are 0 either way), so that every row is a valid distribution.
        stand_in = torch.full_like(logprobs, float("-inf"))
        stand_in[..., 0] = 0.0
        logprobs = torch.where(scored[..., None], logprobs, stand_in)
        teacher = TopKTeacher(ids, logprobs, tail="bucket" if self.loss_add_tail
                              else "renormalize")
        return self.library_loss(student_log_probs, teacher, labels, temperature=1.0,
                                 num_items_in_batch=None, beta=self.beta)


class _OutputLayer:
    """A model's output layer as TRL's DistillationTrainer applies it: ``scale * (h @ W.T + b)``,
    then ``softcap * tanh(x / softcap)`` when the model soft-caps its logits."""

    def __init__(self, hidden, weight, bias, scale, softcap):
        self.hidden, self.weight, self.bias = hidden, weight, bias
        self.scale, self.softcap = scale, softcap

    def linear(self):
        """(hidden, weight, bias) of the same logits without a scale: a scale folds into the
        hidden states and the bias exactly (no soft-capping here)."""
        if self.scale == 1.0:
            return self.hidden, self.weight, self.bias
        bias = None if self.bias is None else self.bias * self.scale
        return self.hidden * self.scale, self.weight, bias

    def logits(self, hidden=None):
        hidden = self.hidden if hidden is None else hidden
        logits = torch.nn.functional.linear(hidden, self.weight, self.bias).float() * self.scale
        if self.softcap:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits

    @torch.no_grad()
    def entropy_sum(self, valid, temperature):
        """The sum over the scored tokens of the student's entropy at ``temperature``, the
        metric TRL logs; in row chunks of float32 logits."""
        rows = self.hidden.reshape(-1, self.hidden.shape[-1])[valid]
        step = max(1, _ENTROPY_CHUNK_BYTES // (4 * self.weight.shape[0]))
        total = torch.zeros((), dtype=torch.float32, device=rows.device)
        for start in range(0, rows.shape[0], step):
            log_q = torch.log_softmax(self.logits(rows[start:start + step]) / temperature, -1)
            total += -(log_q.exp() * log_q).sum()
        return total


@contextlib.contextmanager
def _trl_loss_replaced(loss_function):
    original = getattr(_TRL_DISTILLATION_MODULE, _TRL_LOSS_FUNCTION)
    setattr(_TRL_DISTILLATION_MODULE, _TRL_LOSS_FUNCTION, loss_function)
    try:
        yield
    finally:
        setattr(_TRL_DISTILLATION_MODULE, _TRL_LOSS_FUNCTION, original)
