"""Losses over a vocabulary split across the ranks of a process group (docs/contract.md §7,
docs/vocab_parallel.md): how a call names its group, the collectives the passes make (each
one recorded, so tests and users can count them), and DTensor logits.

With tensor parallelism each rank holds a contiguous slice of the vocabulary columns of both
models' logits, in rank order; slices may differ in size. A loss given ``process_group`` (or
logits as DTensors sharded on the last dimension) returns on every rank the loss of the whole
vocabulary, and each rank's gradient is its slice of the whole gradient.
"""

from __future__ import annotations

import contextlib
import sys
from typing import NamedTuple

import torch
import torch.distributed as dist


def group_name(process_group) -> str:
    """The name the custom operators carry a group by ("" for none: one process)."""
    if process_group is None:
        return ""
    if not isinstance(process_group, dist.ProcessGroup):
        raise TypeError("process_group must be a torch.distributed.ProcessGroup or None, got "
                        f"{type(process_group).__name__}")
    return process_group.group_name


def resolve_group(name: str):
    return dist.distributed_c10d._resolve_process_group(name)


class Collective(NamedTuple):
    """One all-reduce a loss made: its reduction, its element count and its bytes."""

    op: str
    numel: int
    bytes: int


_RECORDERS: list[list[Collective]] = []


@contextlib.contextmanager
def recorded_collectives():
    """``with recorded_collectives() as calls:`` lists every collective the losses make on
    this rank inside the block (``Collective`` each)."""
    calls: list[Collective] = []
    _RECORDERS.append(calls)
    try:
        yield calls
    finally:
        _RECORDERS.remove(calls)


def all_reduce_(tensor: torch.Tensor, op: str, group) -> torch.Tensor:
    """In-place all-reduce of ``tensor`` over ``group``, ``op`` "sum" or "max"."""
    for calls in _RECORDERS:
        calls.append(Collective(op, tensor.numel(), tensor.numel() * tensor.element_size()))
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX,
                    group=group)
    return tensor


class SliceLayout(NamedTuple):
    """Where this rank's columns lie in the vocabulary."""

    offset: int  # the global index of this rank's first column
    vocab: int  # the whole vocabulary
    widest: int  # the widest slice (what tiles sized alike on every rank are sized by)


def layout_from_sizes(sizes: torch.Tensor, rank: int) -> SliceLayout:
    """The layout from every rank's slice width, [P] in rank order."""
    widths = [int(x) for x in sizes.tolist()]
    return SliceLayout(sum(widths[:rank]), sum(widths), max(widths))


def slice_layout(width: int, group, device) -> SliceLayout:
    """This rank's layout, from one MAX all-reduce of the [P] slice widths."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    sizes = torch.zeros(world, dtype=torch.int64, device=device)
    sizes[rank] = width
    return layout_from_sizes(all_reduce_(sizes, "max", group), rank)


def _is_dtensor(x) -> bool:
    # Without torch.distributed.tensor imported there is no DTensor (and no import here).
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(x, module.DTensor)


def _dtensor_group(name, x):
    """The group a DTensor's last dimension is sharded over (None: replicated)."""
    from torch.distributed.tensor import Replicate, Shard

    last = x.ndim - 1
    group = None
    for mesh_dim, placement in enumerate(x.placements):
        if isinstance(placement, Shard) and placement.dim in (last, -1) and group is None:
            group = x.device_mesh.get_group(mesh_dim)
        elif not isinstance(placement, Replicate):
            raise ValueError(f"{name} as a DTensor must be sharded on its last dimension "
                             f"(Shard(-1)) or replicated, got placements {x.placements}")
    return group


def local_inputs(student_logits, teacher_logits, labels, process_group):
    """DTensor inputs as this rank's local tensors, and the group their vocabulary is sharded
    over: (student, teacher, labels, process_group). Plain tensors pass through."""
    if not _is_dtensor(student_logits) and not _is_dtensor(teacher_logits):
        if _is_dtensor(labels):
            raise TypeError("labels is a DTensor but the logits are not")
        group_name(process_group)  # checks its type
        return student_logits, teacher_logits, labels, process_group
    if process_group is not None:
        raise ValueError("process_group must be None when the logits are DTensors: their "
                         "device mesh names the group")
    if not (_is_dtensor(student_logits) and _is_dtensor(teacher_logits)):
        raise TypeError("student_logits and teacher_logits must both be DTensors or neither")
    group = _dtensor_group("student_logits", student_logits)
    if (student_logits.device_mesh != teacher_logits.device_mesh
            or student_logits.placements != teacher_logits.placements):
        raise ValueError("teacher_logits must be placed as student_logits is: got "
                         f"{teacher_logits.placements} and {student_logits.placements}")
    if _is_dtensor(labels):
        labels = labels.full_tensor()
    return student_logits.to_local(), teacher_logits.to_local(), labels, group
