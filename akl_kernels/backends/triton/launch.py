"""Launch settings: block sizes and warps per vocabulary size (a documented heuristic instead of
autotuning).

Autotuning would time every configuration on the first call of each new V and sync the host.
These are the settings measured best on an H100 (benchmarks/results/archive/h100-sweep,
N = 16384, V = 128256, bf16; confirmed in archive/h100-final), capped for small V:
- FKL / RKL forward (the statistics sweep alone): 1024-wide chunks, 4 warps (5.2 ms against
  5.6 ms at 2048 x 8 and 6.7 ms at 16 warps);
- AKL forward: 2048-wide chunks at 8 warps for the statistics and gap sweeps, and a head search
  with PIVOTS = 4 over 1024-wide chunks (61 ms against 108 ms with 8 pivots and 69 ms with 2);
- the gradient kernel is elementwise: 2048-wide chunks, 4 warps (flat from 1024 to 8192).
"""

import torch
import triton

from akl_kernels.validation import environment_choice

ROW_BLOCK = 2048
GRAD_BLOCK = 2048  # the elementwise gradient kernels
STATS_ONLY_BLOCK = 1024
SEARCH_BLOCK = 1024
PIVOTS = 4
# The radix passes hold [2**ceil(width/2), RADIX_BLOCK] float16 operands (up to 64 x 256 for
# a float32 teacher's 11-bit digits); not yet measured on a GPU.
RADIX_BLOCK = 256

MIN_BLOCK = 128  # smaller rows run masked: fewer specialisations to compile and to test


# The head search: "pivot" (data-dependent sweeps, measured on the H100) stays the default
# until a GPU run has shown the radix select (a fixed 2 or 3 reads, radix_split.py) faster.
HEAD_SEARCHES = ("pivot", "radix")
DEFAULT_HEAD_SEARCH = "pivot"


def head_search() -> str:
    return environment_choice("AKL_TRITON_HEAD_SEARCH", HEAD_SEARCHES, DEFAULT_HEAD_SEARCH)


def _block(vocab: int, cap: int) -> int:
    return max(MIN_BLOCK, min(cap, triton.next_power_of_2(vocab)))


def _warps(block: int) -> int:
    return 8 if block >= 1024 else 4


def forward_launch(vocab: int, head_split: bool, search: str = DEFAULT_HEAD_SEARCH) -> dict:
    if not head_split:
        launch = dict(BLOCK=_block(vocab, STATS_ONLY_BLOCK), SEARCH_BLOCK=MIN_BLOCK, PIVOTS=PIVOTS,
                      num_warps=4)
    else:
        block = _block(vocab, ROW_BLOCK)
        search_block = RADIX_BLOCK if search == "radix" else _block(vocab, SEARCH_BLOCK)
        launch = dict(BLOCK=block, SEARCH_BLOCK=search_block, PIVOTS=PIVOTS,
                      num_warps=_warps(block))
    return launch


def backward_launch(vocab: int) -> dict:
    return dict(BLOCK=_block(vocab, GRAD_BLOCK), num_warps=4)


def labels_or_dummy(labels, device):
    """The kernels' labels argument: a one-entry int64 tensor where there are none (never read
    without WITH_CE; int64 keeps one compiled signature)."""
    return labels if labels is not None else torch.zeros(1, dtype=torch.int64, device=device)


def topk_launch(vocab: int) -> dict:
    """A sparse teacher's student sweep: the statistics sweep's shape (one read of the row);
    not yet measured on a GPU."""
    return dict(BLOCK=_block(vocab, STATS_ONLY_BLOCK), num_warps=4)


def launch_blocks() -> list[int]:
    """Every power-of-two block a heuristic above can pick."""
    blocks = []
    block = MIN_BLOCK
    while block <= max(ROW_BLOCK, STATS_ONLY_BLOCK, GRAD_BLOCK):
        blocks.append(block)
        block *= 2
    return blocks


def launch_space():
    """Every forward launch the heuristic can produce, as ((head_split, pointwise, search),
    launch), and every backward launch. The pointwise family runs the statistics-only
    launch."""
    blocks = launch_blocks()
    variants = ((False, False, "pivot"), (True, False, "pivot"), (True, False, "radix"),
                (False, True, "pivot"))
    forward = {(variant, tuple(sorted(forward_launch(b, variant[0], variant[2]).items())))
               for b in blocks for variant in variants}
    backward = {tuple(sorted(backward_launch(b).items())) for b in blocks}
    return ([(variant, dict(x)) for variant, x in sorted(forward)],
            [dict(x) for x in sorted(backward)])
