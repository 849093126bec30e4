"""Batches of sparse-teacher examples: the sequence length and k padded (docs/topk_cache.md).

``TopKCollator`` takes examples of a top-k cache (``akl_kernels.topk_cache``) or of any dataset
in Axolotl's knowledge-distillation format (``input_ids``, optional ``labels`` and
``attention_mask``, and per position ``target_token_ids``, ``target_logprobs``, optionally
``target_mask``) and returns the tensors a training step takes, like a ``transformers`` data
collator; ``topk_teacher_from_batch`` makes the ``TopKTeacher`` of such a batch.

A teacher entry that is padding, or that ``target_mask`` marks invalid, gets log-probability
-inf and index 0, which is how a ``TopKTeacher`` marks padding (docs/contract.md §6). Padding is
on the right.
"""

from __future__ import annotations

import numpy as np
import torch

from akl_kernels import validation as checks
from akl_kernels.topk_cache import (
    ATTENTION_MASK,
    IGNORE_INDEX,
    LABELS,
    TARGET_LOGPROBS,
    TARGET_MASK,
    TARGET_TOKEN_IDS,
)
from akl_kernels.topk_teacher import TopKTeacher

TEACHER_TOPK_INDICES = "teacher_topk_indices"
TEACHER_TOPK_LOGPROBS = "teacher_topk_logprobs"
# "logits": entry i is the teacher's distribution at position i (of token i + 1), where the
# student's logits are; "tokens": entry i is the distribution of token i itself, entry 0 empty.
ALIGNMENTS = ("logits", "tokens")


class TopKCollator:
    """Pads a list of examples into a batch of tensors:

    - ``input_ids`` [B, L] int64, padded with ``pad_token_id``;
    - ``attention_mask`` [B, L] int64 (the example's, else 1 on its tokens; 0 on padding);
    - ``labels`` [B, L] int64, unshifted (the example's, else its ``input_ids``), -100 on
      padding;
    - ``teacher_topk_indices`` [B, L, k] int64 and ``teacher_topk_logprobs`` [B, L, k] float32,
      aligned with the student's logits (entry i is the teacher's distribution of token i + 1),
      ``k`` the largest of the batch; a padded entry, an entry with ``target_mask`` 0 and every
      entry of a position without teacher data are -inf with index 0.

    ``L`` is the longest example, rounded up to ``pad_to_multiple_of``. ``alignment`` says how
    the examples store the teacher: "logits" (as ``write_topk_cache`` and Axolotl's trainer do)
    or "tokens" (entry i is the distribution of token i, as raw vLLM or SGLang prompt
    log-probabilities are; each entry is then moved one position earlier).
    """

    def __init__(self, pad_token_id: int, *, pad_to_multiple_of: int | None = None,
                 alignment: str = "logits", input_column: str = "input_ids"):
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int):
            raise TypeError(f"pad_token_id must be an int, got {type(pad_token_id).__name__}")
        if pad_to_multiple_of is not None and (
                isinstance(pad_to_multiple_of, bool) or not isinstance(pad_to_multiple_of, int)
                or pad_to_multiple_of < 1):
            raise ValueError(f"pad_to_multiple_of must be None or an int >= 1, got "
                             f"{pad_to_multiple_of!r}")
        if alignment not in ALIGNMENTS:
            raise ValueError(f"alignment must be one of {ALIGNMENTS}, got {alignment!r}")
        if not isinstance(input_column, str):
            raise TypeError(f"input_column must be a str, got {type(input_column).__name__}")
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.alignment = alignment
        self.input_column = input_column

    def __call__(self, examples) -> dict[str, torch.Tensor]:
        if not isinstance(examples, (list, tuple)) or not examples:
            raise ValueError("examples must be a non-empty list of dicts")
        rows = [self._example(example, number) for number, example in enumerate(examples)]
        length = max(ids.shape[0] for ids, *_ in rows)
        if self.pad_to_multiple_of is not None:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        k = max(1, *(indices.shape[1] for *_, indices, _ in rows))
        batch = len(rows)
        input_ids = torch.full((batch, length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(batch, length, dtype=torch.long)
        labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
        teacher_indices = torch.zeros(batch, length, k, dtype=torch.long)
        teacher_logprobs = torch.full((batch, length, k), float("-inf"), dtype=torch.float32)
        for b, (ids, attention, label, indices, logprobs) in enumerate(rows):
            n, positions, width = ids.shape[0], indices.shape[0], indices.shape[1]
            input_ids[b, :n], attention_mask[b, :n], labels[b, :n] = ids, attention, label
            teacher_indices[b, :positions, :width] = indices
            teacher_logprobs[b, :positions, :width] = logprobs
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
                TEACHER_TOPK_INDICES: teacher_indices, TEACHER_TOPK_LOGPROBS: teacher_logprobs}

    def _example(self, example, number):
        """One example's ids, attention mask and labels [n], teacher indices and logprobs
        [positions <= n, k_example], padding already -inf with index 0."""
        if not isinstance(example, dict):
            raise TypeError(f"example {number} must be a dict, got {type(example).__name__}")
        for column in (self.input_column, TARGET_TOKEN_IDS, TARGET_LOGPROBS):
            if column not in example:
                raise ValueError(f"example {number} has no {column!r} column")
        ids = _tokens(example[self.input_column], f"example {number}'s {self.input_column!r}")
        attention = torch.ones_like(ids)
        if example.get(ATTENTION_MASK) is not None:
            attention = _tokens(example[ATTENTION_MASK], f"example {number}'s attention_mask")
        if example.get(LABELS) is not None:
            label = _tokens(example[LABELS], f"example {number}'s labels")
        else:
            label = ids.masked_fill(attention == 0, IGNORE_INDEX)
        for name, values in ((ATTENTION_MASK, attention), (LABELS, label)):
            if values.shape != ids.shape:
                raise ValueError(f"example {number}'s {name} has {values.shape[0]} entries for "
                                 f"{ids.shape[0]} tokens")
        indices = _rows(example[TARGET_TOKEN_IDS], torch.long, 0,
                        f"example {number}'s {TARGET_TOKEN_IDS!r}")
        logprobs = _rows(example[TARGET_LOGPROBS], torch.float32, float("-inf"),
                         f"example {number}'s {TARGET_LOGPROBS!r}")
        if indices.shape != logprobs.shape:
            raise ValueError(f"example {number}'s {TARGET_TOKEN_IDS!r} and {TARGET_LOGPROBS!r} "
                             f"differ in shape: {tuple(indices.shape)} and "
                             f"{tuple(logprobs.shape)}")
        if example.get(TARGET_MASK) is not None:
            valid = _rows(example[TARGET_MASK], torch.long, 0,
                          f"example {number}'s {TARGET_MASK!r}")
            if valid.shape != logprobs.shape:
                raise ValueError(f"example {number}'s {TARGET_MASK!r} has shape "
                                 f"{tuple(valid.shape)}, its logprobs {tuple(logprobs.shape)}")
            # Axolotl pads with -1e9 (not -inf) under mask 0: the mask is what says padding.
            logprobs = logprobs.masked_fill(valid == 0, float("-inf"))
        if self.alignment == "tokens":
            logprobs, indices = logprobs[1:], indices[1:]
        if logprobs.shape[0] > ids.shape[0]:
            raise ValueError(f"example {number} has teacher data for {logprobs.shape[0]} "
                             f"positions but {ids.shape[0]} tokens")
        indices = indices.masked_fill(logprobs == float("-inf"), 0)
        return ids, attention, label, indices, logprobs


def topk_teacher_from_batch(batch, tail: str = "bucket") -> TopKTeacher:
    """The ``TopKTeacher`` of a ``TopKCollator`` batch (``tail``: "bucket" or "renormalize").
    The batch is not changed: leave its two ``teacher_topk_*`` entries out of the student's
    forward call."""
    checks.check_tail(tail)
    missing = [key for key in (TEACHER_TOPK_INDICES, TEACHER_TOPK_LOGPROBS) if key not in batch]
    if missing:
        raise ValueError(f"batch has no {missing} entries (made by TopKCollator)")
    return TopKTeacher(batch[TEACHER_TOPK_INDICES], batch[TEACHER_TOPK_LOGPROBS], tail)


def _tokens(values, name) -> torch.Tensor:
    """A 1-D int64 tensor from a list, array or tensor of integers."""
    tensor = torch.as_tensor(np.asarray(values))
    if tensor.dim() != 1 or tensor.dtype.is_floating_point or tensor.dtype == torch.bool:
        raise ValueError(f"{name} must be a 1-D sequence of integers, got shape "
                         f"{tuple(tensor.shape)} of {tensor.dtype}")
    return tensor.long()


def _rows(values, dtype, fill, name) -> torch.Tensor:
    """A [positions, k] tensor from per-position lists; positions with fewer entries (Axolotl
    allows it) are filled with ``fill`` up to the longest."""
    if isinstance(values, torch.Tensor):
        tensor = values
    else:
        try:
            tensor = torch.as_tensor(np.asarray(values))
        except ValueError:  # ragged: positions with different k
            width = max(len(row) for row in values)
            tensor = torch.full((len(values), width), fill, dtype=dtype)
            for position, row in enumerate(values):
                tensor[position, :len(row)] = torch.as_tensor(np.asarray(row), dtype=dtype)
    if tensor.dim() == 1 and tensor.numel() == 0:
        tensor = tensor.reshape(0, 0)  # a sequence without teacher data
    if tensor.dim() != 2:
        raise ValueError(f"{name} must hold one list of k entries per position, got shape "
                         f"{tuple(tensor.shape)}")
    return tensor.to(dtype)
