"""Argument checks shared by every public entry point (docs/contract.md §3).

Every check runs before any work and raises TypeError / ValueError naming the argument; no
input is modified. Checks that need the tensors' values (and so a host sync) are the exception:
they run inside the custom operators, and only with ``check_values=True``.
"""

from __future__ import annotations

import math
import numbers
import os

import torch

from akl_kernels.topk_teacher import LOGPROB_SLACK, MASS_SLACK, TAILS, TopKTeacher

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "torch", "triton")
_INT64_RANGE = (-(2**63), 2**63 - 1)


def _check_dense(name, x) -> None:
    """A strided tensor holding data (sparse and meta tensors are refused up front)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got layout {x.layout}")
    if x.device.type == "meta":
        raise ValueError(f"{name} is on the meta device: it holds no values to compute with")


def check_float_tensor(name: str, x, last: str = "vocabulary dimension (V = 0)") -> None:
    _check_dense(name, x)
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{name} must have at least one dimension (the vocabulary), got a scalar")
    if x.shape[-1] < 1:
        raise ValueError(f"{name} has an empty {last}")


def check_logit_pair(student_logits, teacher_logits) -> None:
    check_float_tensor("student_logits", student_logits)
    check_float_tensor("teacher_logits", teacher_logits)
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


def _check_real(name, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")


def check_bool(name, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def check_temperature(temperature) -> None:
    _check_real("temperature", temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")


def check_tail(tail) -> None:
    if not isinstance(tail, str):
        raise TypeError(f"tail must be a str, one of {TAILS}, got {type(tail).__name__}")
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")


def check_topk_teacher_ungrouped(teacher, process_group) -> None:
    if process_group is not None and isinstance(teacher, TopKTeacher):
        raise ValueError("a TopKTeacher takes no process_group: sparse teachers over "
                         "vocabulary slices are not supported")


def check_topk_teacher(teacher, student_logits) -> None:
    """A TopKTeacher's shapes, dtypes and device against the student's logits (no values)."""
    _check_dense("teacher_logits.indices", teacher.indices)
    _check_dense("teacher_logits.logprobs", teacher.logprobs)
    if teacher.indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"teacher_logits.indices must be int32 or int64, got "
                        f"{teacher.indices.dtype}")
    if teacher.logprobs.dtype not in SUPPORTED_DTYPES:
        raise TypeError("teacher_logits.logprobs must be float32, bfloat16, float16 or float64, "
                        f"got {teacher.logprobs.dtype}")
    check_tail(teacher.tail)
    if teacher.indices.shape != teacher.logprobs.shape:
        raise ValueError("teacher_logits.indices and teacher_logits.logprobs must have one "
                         f"shape, got {tuple(teacher.indices.shape)} and "
                         f"{tuple(teacher.logprobs.shape)}")
    if teacher.indices.dim() < 1 or teacher.indices.shape[-1] < 1:
        raise ValueError("a TopKTeacher needs k >= 1 entries per row, got shape "
                         f"{tuple(teacher.indices.shape)}")
    if tuple(teacher.indices.shape[:-1]) != tuple(student_logits.shape[:-1]):
        raise ValueError("a TopKTeacher must have the leading shape of the student's logits "
                         f"{tuple(student_logits.shape[:-1])}, got "
                         f"{tuple(teacher.indices.shape[:-1])}")
    for name, x in (("indices", teacher.indices), ("logprobs", teacher.logprobs)):
        if x.device != student_logits.device:
            raise ValueError(f"teacher_logits.{name} must be on the student's device "
                             f"{student_logits.device}, got {x.device}")
    if teacher.logprobs.requires_grad and torch.is_grad_enabled():
        raise ValueError("teacher_logits.logprobs requires grad: the teacher is not "
                         "differentiated here; pass a detached TopKTeacher")


def check_topk_values(indices, logprobs, vocab) -> None:
    """The values of [N, k] top-k rows: indices in [0, V) and distinct within a row where the
    entry is not padding, log-probabilities <= 0 and a mass <= 1 (both up to rounding).

    One host sync, so it runs only with ``check_values=True``."""
    present = logprobs != float("-inf")
    bad = present & ((indices < 0) | (indices >= vocab))
    sorted_idx = torch.where(present, indices, -1 - torch.arange(
        indices.shape[1], device=indices.device)).sort(dim=1).values
    repeated = (sorted_idx[:, 1:] == sorted_idx[:, :-1]) & (sorted_idx[:, 1:] >= 0)
    above = present & (logprobs.float() > LOGPROB_SLACK)
    nan = torch.isnan(logprobs)
    mass = torch.where(present, logprobs.double().exp(), 0.0).sum(dim=1)
    flags = torch.stack([bad.any(), repeated.any(), above.any() | nan.any(),
                         (mass > 1.0 + MASS_SLACK).any()]).tolist()
    if flags[0]:
        first = int(indices[bad][0])
        raise ValueError(f"teacher_logits.indices must lie in [0, {vocab}) where the entry is "
                         f"not padding, got {first}")
    if flags[1]:
        row = int(repeated.any(dim=1).nonzero()[0, 0])
        raise ValueError(f"teacher_logits.indices repeat a token within a row (row {row}); "
                         "each row's indices must be distinct")
    if flags[2]:
        raise ValueError("teacher_logits.logprobs must be log-probabilities: <= 0 (up to "
                         f"{LOGPROB_SLACK}) and not NaN; -inf marks padding")
    if flags[3]:
        row = int((mass > 1.0 + MASS_SLACK).nonzero()[0, 0])
        raise ValueError(f"teacher_logits.logprobs hold a mass of {float(mass[row]):.6f} > 1 in "
                         f"row {row}: they must be log-probabilities of one distribution")


def check_split_options(*, mu, include_crossing) -> None:
    """AKL's head/tail split: mu in (0, 1] and the boundary rule."""
    _check_real("mu", mu)
    if not (0.0 < mu <= 1.0):
        raise ValueError(f"mu must lie in (0, 1], got {mu}")
    check_bool("include_crossing", include_crossing)


def check_unit_interval(name, value) -> None:
    """A divergence parameter (beta, lam) or kd_ratio in [0, 1]."""
    _check_real(name, value)
    if not (0.0 <= value <= 1.0):
        raise ValueError(f"{name} must lie in [0, 1], got {value}")


def check_reduction(reduction) -> None:
    if not isinstance(reduction, str) or reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_backend_name(backend) -> None:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_ignore_index(ignore_index) -> None:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not _INT64_RANGE[0] <= ignore_index <= _INT64_RANGE[1]:
        raise ValueError(f"ignore_index must fit in int64 (labels are int64), got {ignore_index}")


def check_labels(labels, student_logits, ignore_index) -> None:
    check_ignore_index(ignore_index)
    if labels is None:
        return
    _check_dense("labels", labels)
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


def check_class_labels(labels, valid, vocab) -> None:
    """Cross-entropy targets: every label that is not ignored must index the vocabulary.

    One host sync (a bad label would otherwise read out of bounds in a kernel), so it runs only
    with ``check_values=True``."""
    bad = valid & ((labels < 0) | (labels >= vocab))
    if bool(bad.any()):
        first = int(labels[bad.nonzero()[0, 0]])
        raise ValueError(
            f"labels must lie in [0, {vocab}) where they are not ignore_index, got {first}"
        )


def environment_megabytes(variable: str, default: float) -> float:
    """A positive size in MiB from the environment variable ``variable``, else ``default``."""
    text = os.environ.get(variable)
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"the environment variable {variable} must be a positive number of "
                         f"MiB, got {text!r}")
    return value


def environment_choice(variable: str, choices: tuple[str, ...], default: str) -> str:
    """One of ``choices`` from the environment variable ``variable``, else ``default``."""
    text = os.environ.get(variable, default)
    if text not in choices:
        raise ValueError(f"the environment variable {variable} must be one of {choices}, "
                         f"got {text!r}")
    return text


def _check_hidden(name, hidden, teacher):
    check_float_tensor(name, hidden, "hidden dimension (H = 0)")
    if teacher and hidden.requires_grad and torch.is_grad_enabled():
        raise ValueError(f"{name} requires grad: the teacher is not differentiated here; pass "
                         f"{name}.detach() or compute it under torch.no_grad()")


def _check_weight(name, weight, hidden_name, hidden, teacher):
    _check_dense(name, weight)
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
    _check_dense(name, bias)
    if not bias.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point torch.Tensor or None, got {bias.dtype}")
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
                        teacher_weight, teacher_bias, teacher_logits, *,
                        teacher_optional=False) -> None:
    """The fused linear losses' tensors: a student head, and a teacher head or logits (or, with
    ``teacher_optional``, no teacher at all)."""
    _check_hidden("student_hidden", student_hidden, False)
    _check_weight("student_weight", student_weight, "student_hidden", student_hidden, False)
    _check_bias("student_bias", student_bias, "student_weight", student_weight)
    vocab, lead = student_weight.shape[0], tuple(student_hidden.shape[:-1])
    head_given = teacher_hidden is not None or teacher_weight is not None
    if not head_given and teacher_logits is None and teacher_optional:
        if teacher_bias is not None:
            raise ValueError("teacher_bias goes with teacher_weight")
        return
    if head_given == (teacher_logits is not None):
        raise ValueError("pass the teacher either as teacher_hidden and teacher_weight or as "
                         "teacher_logits (exactly one of the two)")
    if teacher_logits is not None:
        if teacher_bias is not None:
            raise ValueError("teacher_bias goes with teacher_weight, not with teacher_logits")
        if isinstance(teacher_logits, TopKTeacher):
            check_topk_teacher(teacher_logits, student_hidden)
            return
        check_float_tensor("teacher_logits", teacher_logits)
        if tuple(teacher_logits.shape) != (*lead, vocab):
            raise ValueError(f"teacher_logits must have shape {(*lead, vocab)} (the student's "
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


FUSED_LINEAR_STRATEGIES = ("auto", "forward_gradient", "recompute")


def check_strategy(strategy) -> None:
    if not isinstance(strategy, str) or strategy not in FUSED_LINEAR_STRATEGIES:
        raise ValueError(f"strategy must be one of {FUSED_LINEAR_STRATEGIES}, got {strategy!r}")


def check_positive_int(name, value, *, optional=False) -> None:
    """``value`` an int >= 1 (or None where ``optional``)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        expected = "a positive int or None" if optional else "a positive int"
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def check_chunk_size(chunk_size) -> None:
    check_positive_int("chunk_size", chunk_size, optional=True)
