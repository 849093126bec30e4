"""Tensor-parallel distillation on CPU: both models' LM heads split by vocabulary across ranks.

    torchrun --nproc-per-node 2 -m examples.vocab_parallel     # 2 gloo ranks
    python -m examples.vocab_parallel                          # one process: the same run

Each rank holds the same tiny GPT-2 bodies (replicated here; a real tensor-parallel model would
split those too) and its contiguous slice of the rows of both models' output layers: the
column-parallel LM head of Megatron-LM. Every step computes AKL from the student's hidden
states with ``fused_linear_akl_loss(..., process_group=group)``: no rank ever holds the whole
vocabulary's logits, and none are gathered. As in Megatron, the hidden states enter the
column-parallel region through an identity whose backward all-reduces their gradient (each
rank's is a partial sum). Rank 0 prints the loss curve; with one process it is the same curve
to float32 rounding (tests/test_examples.py checks it).
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

import akl_kernels

VOCAB = 1001  # odd: the two slices differ in width
HIDDEN = 32


class _ToParallelRegion(torch.autograd.Function):
    """Identity forward; backward all-reduces the gradient over the tensor-parallel group
    (Megatron's ``copy_to_tensor_model_parallel_region``)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


def _body(seed):
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(seed)
    return GPT2Model(GPT2Config(vocab_size=VOCAB, n_positions=32, n_embd=HIDDEN, n_layer=2,
                                n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                bos_token_id=0, eos_token_id=0))


def _head(seed):
    return 0.2 * torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(seed))


def vocab_slice(rank, world):
    """Rank ``rank``'s rows of the vocabulary: contiguous, the widths differing by one."""
    base, extra = divmod(VOCAB, world)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def run(steps=20, seed=0):
    """Train the student's body and its head slice; the loss of every step (the whole
    vocabulary's, the same on every rank)."""
    group = dist.group.WORLD if dist.is_initialized() else None
    rank, world = (dist.get_rank(), dist.get_world_size()) if group else (0, 1)
    mine = vocab_slice(rank, world)
    teacher, student = _body(seed + 1).requires_grad_(False), _body(seed + 2)
    teacher_head = _head(seed + 3)[mine]
    student_head = torch.nn.Parameter(_head(seed + 4)[mine].clone())
    optimizer = torch.optim.SGD([*student.parameters(), student_head], lr=0.5)
    data = torch.Generator().manual_seed(seed)
    curve = []
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (4, 17), generator=data)  # the same batch on every rank
        inputs, labels = ids[:, :-1], ids[:, 1:]
        hidden = student(inputs).last_hidden_state
        if group is not None:
            hidden = _ToParallelRegion.apply(hidden, group)
        loss = akl_kernels.fused_linear_akl_loss(
            hidden, student_head, labels, teacher_hidden=teacher(inputs).last_hidden_state,
            teacher_weight=teacher_head, process_group=group)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        curve.append(loss.item())
    return curve


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args(argv)
    if "WORLD_SIZE" in os.environ:  # launched by torchrun
        dist.init_process_group("gloo")
    curve = run(args.steps)
    if not dist.is_initialized() or dist.get_rank() == 0:
        world = dist.get_world_size() if dist.is_initialized() else 1
        print(f"{world} rank(s), vocabulary {VOCAB} in slices of "
              f"{[vocab_slice(r, world).stop - vocab_slice(r, world).start for r in range(world)]}")
        for step, value in enumerate(curve):
            print(f"step {step:2d}  AKL {value:.7f}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
