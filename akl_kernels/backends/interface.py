"""The backends a user picks with ``backend=``: their interface, and the one place that picks
a backend by name.

- ``"torch"`` (``backends/torch/``): exact chunked PyTorch, any device, any float dtype.
- ``"triton"`` (``backends/triton/``): fused kernels on CUDA (on CPU in Triton's interpreter
  with ``TRITON_INTERPRET=1``).
- ``"auto"``: Triton for CUDA tensors (float64 excepted), the torch backend otherwise.

Both compute a loss in two steps with the same structure: ``forward`` gives each row's loss and
statistics, ``backward`` the gradient from those statistics, elementwise (``topk_forward`` and
``topk_backward`` the same for a sparse teacher). The custom operators
of ``akl_kernels/divergence_op.py`` and ``akl_kernels/fused_linear_op.py`` call them.
"""

from __future__ import annotations

import importlib
import os
from typing import Protocol

import torch

from akl_kernels.config import LossConfig
from akl_kernels.row_results import RowResult
from akl_kernels.validation import check_backend_name


class Backend(Protocol):
    def forward(self, student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor,
                cfg: LossConfig, *, labels: torch.Tensor | None = None,
                head_stats: bool = False) -> RowResult:
        """Rows [N, V] (any row stride) -> each row's loss (0 where ``valid`` is False) and
        statistics; ``labels`` ([N] int64) are the cross-entropy's targets when
        ``cfg.with_ce``; ``head_stats`` asks for AKL's ``HeadTailStats``."""

    def backward(self, student: torch.Tensor, teacher: torch.Tensor, row_stats: torch.Tensor,
                 coef: torch.Tensor, cfg: LossConfig, *, labels: torch.Tensor | None = None,
                 grad_dtype: torch.dtype | None = None,
                 out: torch.Tensor | None = None) -> torch.Tensor:
        """``grad[i] = coef[i] * d loss_i / d student_i`` in ``grad_dtype`` (default the
        student's), exactly 0 where ``coef[i] == 0``. Elementwise given the row statistics,
        so the rows may be a block of the vocabulary's columns (labels then shifted by the
        block's start: a label outside the block has no one-hot entry). ``out`` (contiguous,
        of the gradient's shape and dtype) receives it, and may be the student's rows
        themselves when they are not needed after (the fused linear tiles)."""

    def topk_forward(self, student: torch.Tensor, indices: torch.Tensor,
                     logprobs: torch.Tensor, valid: torch.Tensor, cfg: LossConfig, *,
                     labels: torch.Tensor | None = None,
                     head_stats: bool = False) -> RowResult:
        """``forward`` for a sparse teacher (docs/contract.md §6): [N, k] vocabulary
        ``indices`` (int64) and their ``logprobs``, -inf marking padding; ``cfg.tail``
        chooses the rest bucket or renormalisation."""

    def topk_backward(self, student: torch.Tensor, indices: torch.Tensor,
                      logprobs: torch.Tensor, row_stats: torch.Tensor, coef: torch.Tensor,
                      cfg: LossConfig, *, labels: torch.Tensor | None = None,
                      grad_dtype: torch.dtype | None = None,
                      category_grad: torch.Tensor | None = None,
                      column_offset: int = 0) -> torch.Tensor:
        """``backward`` for a sparse teacher. With ``category_grad`` (the loss's gradient
        with respect to the k + 1 categories' logits for a unit ``grad_output``:
        ``backends/torch/topk.py: unit_category_gradient``) the rows may be the block of the
        vocabulary's columns from ``column_offset`` on (labels shifted by it), as the fused
        linear losses sweep them."""


_MODULES = {"torch": "akl_kernels.backends.torch", "triton": "akl_kernels.backends.triton"}


def triton_interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve_backend(backend, *tensors: torch.Tensor) -> str:
    """The backend's name for these tensors: "auto" -> "triton" for CUDA tensors of float32,
    bf16 or fp16, else "torch"; "triton" is checked to be able to run them."""
    check_backend_name(backend)
    triton_dtypes = all(t.dtype != torch.float64 for t in tensors)
    on_cuda = tensors[0].is_cuda
    if backend == "auto":
        return "triton" if on_cuda and triton_dtypes else "torch"
    if backend == "triton":
        if not triton_dtypes:
            raise TypeError("backend='triton' takes float32, bfloat16 or float16 tensors; "
                            "float64 runs on backend='torch'")
        if not on_cuda and not triton_interpreter_enabled():
            raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for the "
                             f"CPU interpreter), got tensors on {tensors[0].device}")
    return backend


def get_backend(name: str) -> Backend:
    """The backend module called ``name`` ("torch" or "triton"; imported on first use, so
    Triton is not imported where it is not used)."""
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {tuple(_MODULES)} here, got {name!r}")
    return importlib.import_module(_MODULES[name])
