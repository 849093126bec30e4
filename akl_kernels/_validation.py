"""Argument checks shared by every public entry point (SPEC section 3).

Every check runs before any work and raises TypeError / ValueError naming the argument; no
input is modified.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass

import torch

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "torch", "triton")
# The KL family is computed from running FKL/RKL sums in the statistics sweep; the pointwise
# family needs a second sweep over sum_i f(p_i, q_i) once the normalisers are known.
KL_FAMILY = ("fkl", "rkl", "akl", "mixed_kl")
POINTWISE = ("jsd", "skew_fkl", "skew_rkl", "tvd")  # the order is the kernels' kind code - 1
DIVERGENCES = KL_FAMILY + POINTWISE


@dataclass(frozen=True)
class LossConfig:
    """Everything a backend needs besides the tensors.

    ``param`` is the divergence's own parameter: JSD's beta, the skew KLs' lambda, the mixed
    KL's lambda (the weight of RKL); unused otherwise. ``normalized`` maps the parameter values
    where a divergence *is* FKL or RKL onto those, so they run the same code exactly.
    """

    kind: str
    mu: float = 0.5
    include_crossing: bool = False
    temperature: float = 1.0
    param: float = 0.0
    # distillation_loss: loss = kd_ratio * divergence + (1 - kd_ratio) * CE(student, labels),
    # the cross-entropy on the unscaled student logits (T = 1), fused into the same passes.
    with_ce: bool = False
    kd_ratio: float = 1.0

    @property
    def needs_head_split(self) -> bool:
        return self.kind == "akl"

    @property
    def fkl_weight(self) -> float:
        """The fixed FKL weight of the KL family (AKL's is computed per row)."""
        return {"fkl": 1.0, "rkl": 0.0, "mixed_kl": 1.0 - self.param}.get(self.kind, 0.0)

    @property
    def pointwise_code(self) -> int:
        """0 for the KL family, else 1 + the divergence's index in POINTWISE."""
        return POINTWISE.index(self.kind) + 1 if self.kind in POINTWISE else 0

    def normalized(self) -> LossConfig:
        # JSD(0) = FKL and JSD(1) = RKL by the TRL / Liger-Kernel convention (the formula
        # itself tends to 0 at both ends); a skew KL with lambda = 0 is the plain KL.
        same_as = {("jsd", 0.0): "fkl", ("jsd", 1.0): "rkl", ("skew_fkl", 0.0): "fkl",
                   ("skew_rkl", 0.0): "rkl", ("mixed_kl", 0.0): "fkl", ("mixed_kl", 1.0): "rkl"}
        kind = same_as.get((self.kind, self.param), self.kind)
        return LossConfig(kind, self.mu, self.include_crossing, self.temperature, self.param,
                          self.with_ce, self.kd_ratio)


def _check_logits(name: str, logits, last: str = "vocabulary dimension (V = 0)") -> None:
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(logits).__name__}")
    if logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{name} must be float32, bfloat16, float16 or float64, got {logits.dtype}"
        )
    if logits.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension (the vocabulary), got a scalar")
    if logits.shape[-1] < 1:
        raise ValueError(f"{name} has an empty {last}")


def check_logit_pair(student_logits, teacher_logits) -> None:
    _check_logits("student_logits", student_logits)
    _check_logits("teacher_logits", teacher_logits)
    if student_logits.shape[-1] != teacher_logits.shape[-1]:
        raise ValueError(
            "student_logits and teacher_logits must share the vocabulary size V, got "
            f"{student_logits.shape[-1]} and {teacher_logits.shape[-1]}"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "teacher_logits must have the shape of student_logits, got "
            f"{tuple(teacher_logits.shape)} and {tuple(student_logits.shape)}"
        )
    if student_logits.device != teacher_logits.device:
        raise ValueError(
            "student_logits and teacher_logits must be on one device, got "
            f"{student_logits.device} and {teacher_logits.device}"
        )
    if teacher_logits.requires_grad and torch.is_grad_enabled():
        raise ValueError(
            "teacher_logits requires grad: the teacher is not differentiated here; pass "
            "teacher_logits.detach() or compute the teacher under torch.no_grad()"
        )


def check_options(*, mu, include_crossing, temperature) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if isinstance(mu, bool) or not isinstance(mu, numbers.Real):
        raise TypeError(f"mu must be a real number, got {type(mu).__name__}")
    if not (0.0 < mu <= 1.0):
        raise ValueError(f"mu must lie in (0, 1], got {mu}")
    if not isinstance(include_crossing, bool):
        raise TypeError(f"include_crossing must be a bool, got {type(include_crossing).__name__}")


def check_unit_interval(name, value) -> None:
    """A divergence parameter (beta, lam) in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


def check_class_labels(labels, valid, vocab) -> None:
    """Cross-entropy targets: every label that is not ignored must index the vocabulary.

    (One host sync: a bad label would otherwise read out of bounds in a kernel.)"""
    bad = valid & ((labels.reshape(-1) < 0) | (labels.reshape(-1) >= vocab))
    if bool(bad.any()):
        first = int(labels.reshape(-1)[bad.nonzero()[0, 0]])
        raise ValueError(
            f"labels must lie in [0, {vocab}) where they are not ignore_index, got {first}"
        )


# The options each divergence takes by keyword beyond the shared ones, and the default of its
# parameter (beta for JSD, lam for the skew and mixed KLs).
DIVERGENCE_OPTIONS = {"akl": {"mu", "include_crossing"}, "jsd": {"beta"}, "skew_fkl": {"lam"},
                      "skew_rkl": {"lam"}, "mixed_kl": {"lam"}, "fkl": set(), "rkl": set(),
                      "tvd": set()}
PARAM_DEFAULTS = {"jsd": 0.5, "skew_fkl": 0.1, "skew_rkl": 0.1, "mixed_kl": 0.5}


def divergence_config(divergence, options, *, temperature, with_ce=False, kd_ratio=1.0):
    """The LossConfig of ``divergence`` with its keyword ``options`` (e.g. ``mu``, ``beta``),
    every value checked; used wherever the divergence is chosen by name."""
    if divergence not in DIVERGENCE_OPTIONS:
        raise ValueError(
            f"divergence must be one of {tuple(DIVERGENCE_OPTIONS)}, got {divergence!r}")
    unknown = set(options) - DIVERGENCE_OPTIONS[divergence]
    if unknown:
        raise TypeError(f"divergence={divergence!r} takes no option {sorted(unknown)[0]!r}")
    mu = options.get("mu", 0.5)
    include_crossing = options.get("include_crossing", False)
    param_name = "beta" if divergence == "jsd" else "lam"
    param = options.get(param_name, PARAM_DEFAULTS.get(divergence, 0.0))
    check_unit_interval(param_name, param)
    check_options(mu=mu, include_crossing=include_crossing, temperature=temperature)
    return LossConfig(divergence, float(mu), include_crossing, float(temperature), float(param),
                      with_ce, float(kd_ratio)).normalized()


def check_reduction(reduction) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_labels(labels, student_logits, ignore_index) -> None:
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(student_logits.shape[:-1]):
        raise ValueError(
            "labels must have the leading shape of the logits "
            f"{tuple(student_logits.shape[:-1])}, got {tuple(labels.shape)}"
        )
    if labels.device != student_logits.device:
        raise ValueError(
            f"labels must be on the logits' device {student_logits.device}, got {labels.device}"
        )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")


def _check_hidden(name, hidden, teacher):
    _check_logits(name, hidden, "hidden dimension (H = 0)")
    if teacher and hidden.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name} requires grad: the teacher is not differentiated here; pass "
                         f"{name}.detach() or compute it under torch.no_grad()")


def _check_weight(name, weight, hidden_name, hidden, teacher):
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] < 1:
        raise ValueError(f"{name} must have shape [V, {hidden.shape[-1]}] (V >= 1, the hidden "
                         f"size of {hidden_name}), got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"{name} must have the dtype of {hidden_name} ({hidden.dtype}), got "
                        f"{weight.dtype}")
    if weight.device != hidden.device:
        raise ValueError(f"{name} must be on the device of {hidden_name} ({hidden.device}), got "
                         f"{weight.device}")
    if teacher and weight.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name} requires grad: the teacher is not differentiated here; pass "
                         f"{name}.detach() or call teacher.requires_grad_(False)")


def _check_bias(name, bias, weight_name, weight, teacher=False):
    if bias is None:
        return
    if not isinstance(bias, torch.Tensor) or not bias.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point torch.Tensor or None")
    if teacher and bias.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name} requires grad: the teacher is not differentiated here; pass "
                         f"{name}.detach() or call teacher.requires_grad_(False)")
    if tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{name} must have shape [{weight.shape[0]}] (the rows of "
                         f"{weight_name}), got {tuple(bias.shape)}")
    if bias.device != weight.device:
        raise ValueError(f"{name} must be on the device of {weight_name} ({weight.device}), "
                         f"got {bias.device}")


def check_linear_inputs(student_hidden, student_weight, student_bias, teacher_hidden,
                        teacher_weight, teacher_bias, teacher_logits) -> None:
    """The fused linear losses' tensors: a student head, and a teacher head or logits."""
    _check_hidden("student_hidden", student_hidden, False)
    _check_weight("student_weight", student_weight, "student_hidden", student_hidden, False)
    _check_bias("student_bias", student_bias, "student_weight", student_weight)
    vocab, lead = student_weight.shape[0], tuple(student_hidden.shape[:-1])
    head_given = teacher_hidden is not None or teacher_weight is not None
    if head_given == (teacher_logits is not None):
        raise ValueError("pass the teacher either as teacher_hidden and teacher_weight or as "
                         "teacher_logits (exactly one of the two)")
    if teacher_logits is not None:
        if teacher_bias is not None:
            raise ValueError("teacher_bias goes with teacher_weight, not with teacher_logits")
        _check_logits("teacher_logits", teacher_logits)
        if tuple(teacher_logits.shape) != lead + (vocab,):
            raise ValueError(f"teacher_logits must have shape {lead + (vocab,)} (the student's "
                             f"rows and V), got {tuple(teacher_logits.shape)}")
        if teacher_logits.requires_grad and torch.is_grad_enabled():
            raise ValueError("teacher_logits requires grad: the teacher is not differentiated "
                             "here; pass teacher_logits.detach()")
        if teacher_logits.device != student_hidden.device:
            raise ValueError("teacher_logits must be on the device of student_hidden "
                             f"({student_hidden.device}), got {teacher_logits.device}")
        return
    if teacher_hidden is None or teacher_weight is None:
        raise ValueError("teacher_hidden and teacher_weight go together")
    _check_hidden("teacher_hidden", teacher_hidden, True)
    if tuple(teacher_hidden.shape[:-1]) != lead:
        raise ValueError(f"teacher_hidden must have the student's leading shape {lead}, got "
                         f"{tuple(teacher_hidden.shape[:-1])}")
    if teacher_hidden.device != student_hidden.device:
        raise ValueError("teacher_hidden must be on the device of student_hidden "
                         f"({student_hidden.device}), got {teacher_hidden.device}")
    _check_weight("teacher_weight", teacher_weight, "teacher_hidden", teacher_hidden, True)
    if teacher_weight.shape[0] != vocab:
        raise ValueError(f"teacher_weight must have the student's vocabulary size V = {vocab} "
                         f"rows, got {teacher_weight.shape[0]}")
    _check_bias("teacher_bias", teacher_bias, "teacher_weight", teacher_weight, teacher=True)


def check_chunk_size(chunk_size) -> None:
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(f"chunk_size must be a positive int or None, got "
                        f"{type(chunk_size).__name__}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend, student_logits, teacher_logits) -> str:
    """'auto' -> 'triton' for CUDA tensors of float32/bf16/fp16, else 'torch'."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    triton_dtypes_ok = (
        student_logits.dtype != torch.float64 and teacher_logits.dtype != torch.float64
    )
    if backend == "auto":
        return "triton" if student_logits.is_cuda and triton_dtypes_ok else "torch"
    if backend == "triton":
        if not triton_dtypes_ok:
            raise TypeError(
                "backend='triton' takes float32, bfloat16 or float16 logits; float64 runs on "
                "backend='torch'"
            )
        if not student_logits.is_cuda and not triton_interpreter_enabled():
            raise ValueError(
                "backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the CPU "
                f"interpreter), got tensors on {student_logits.device}"
            )
    return backend
