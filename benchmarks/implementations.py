"""The implementations the benchmark compares, each built as ``fn(student, teacher) -> loss``.

Every implementation computes the same quantity on the same inputs: the token mean of FKL, RKL
or AKL over all rows at temperature 1 (the suite records each loss value so that a peer
computing something else shows up). Peers that take log-probabilities (Liger-Kernel's JSD and
KL-divergence losses, ``torch.nn.functional.kl_div``) get ``log_softmax`` of both logits in the
inputs' dtype, and that ``log_softmax`` is part of what is timed: a user has to run it too.
Keeping it in the input dtype (bf16 stays bf16) is the cheapest choice for those peers.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import akl_kernels
import reference

KINDS = ("fkl", "rkl", "akl")
# The rest of this library's losses, at their default parameters; "distill_akl" is
# distillation_loss: 0.5 * CE(labels) + 0.5 * AKL with the cross-entropy fused in.
FAMILY = ("jsd", "skew_fkl", "skew_rkl", "tvd", "mixed_kl", "distill_akl")


@dataclass(frozen=True)
class Implementation:
    name: str
    kinds: tuple[str, ...]
    devices: tuple[str, ...]
    build: Callable[[str], Callable]  # kind -> fn(student, teacher) -> scalar loss
    # Peak bytes it adds per logit element beyond the inputs, gradient included, as a function
    # of the inputs' element size. Rough upper bounds from measured peaks; they only decide
    # whether a case fits in memory.
    bytes_per_element: Callable[[int], float]
    needs: str | None = None  # module that must be importable
    note: str = ""

    def unavailable(self, device: str) -> str | None:
        """Why it cannot run here, or None."""
        if device not in self.devices:
            return f"{self.name} runs on {'/'.join(self.devices)} only"
        if self.needs and importlib.util.find_spec(self.needs) is None:
            return f"{self.needs} is not installed"
        return None


@functools.lru_cache(maxsize=4)
def _labels(n, vocab, device):
    return torch.randint(0, vocab, (n,), generator=torch.Generator().manual_seed(0)).to(device)


def _library(backend):
    def build(kind):
        if kind == "distill_akl":
            return lambda s, t: akl_kernels.distillation_loss(
                s, t, _labels(s.shape[0], s.shape[1], s.device), divergence="akl",
                backend=backend)
        fn = getattr(akl_kernels, f"{kind}_loss")
        return functools.partial(fn, backend=backend)

    return build


def _official(kind):
    return getattr(reference, f"official_{kind}")


def _official_compiled(kind):
    # What a user would write: the default mode, shapes specialised by torch as usual.
    return torch.compile(_official(kind))


def _log_probs(student, teacher):
    return F.log_softmax(student, dim=-1), F.log_softmax(teacher, dim=-1)


def _liger_jsd(kind):
    from liger_kernel.transformers import LigerJSD

    # Liger's generalised JSD is FKL at beta = 0 and RKL at beta = 1 (student log-probs first).
    jsd = LigerJSD(beta={"fkl": 0.0, "rkl": 1.0, "jsd": 0.5}[kind])
    return lambda s, t: jsd(*_log_probs(s, t))


def _liger_kldiv(kind):
    from liger_kernel.transformers import LigerKLDIVLoss

    kl = LigerKLDIVLoss(reduction="batchmean", log_target=True)
    return lambda s, t: kl(*_log_probs(s, t))


def _torch_kl_div(kind):
    return lambda s, t: F.kl_div(*_log_probs(s, t), reduction="batchmean", log_target=True)


def _peer_bytes(size):  # two log-softmax copies, the peer's own gradient, their gradients
    return 6 * size + 8


def _official_bytes(size):  # ~11 float32 N x V temporaries, measured on CPU
    return 48.0


IMPLEMENTATIONS = {
    impl.name: impl
    for impl in [
        Implementation("official", KINDS, ("cpu", "cuda"), _official, _official_bytes,
                       note="reference.official_*: the paper's algorithm restated, eager"),
        Implementation("official+compile", KINDS, ("cpu", "cuda"), _official_compiled,
                       _official_bytes, note="the same under torch.compile (default mode)"),
        Implementation("torch", KINDS + FAMILY, ("cpu", "cuda"), _library("torch"),
                       lambda size: size + 1, note="this library, chunked PyTorch backend"),
        Implementation("triton", KINDS + FAMILY, ("cuda",), _library("triton"),
                       lambda size: size + 0.1, note="this library, Triton kernels"),
        Implementation("liger_jsd", ("fkl", "rkl", "jsd"), ("cuda",), _liger_jsd, _peer_bytes,
                       needs="liger_kernel",
                       note="Liger-Kernel LigerJSD, beta = 0 (FKL), 1 (RKL) or 0.5 (JSD), on "
                       "log_softmax"),
        Implementation("liger_kldiv", ("fkl",), ("cuda",), _liger_kldiv, _peer_bytes,
                       needs="liger_kernel",
                       note="Liger-Kernel LigerKLDIVLoss(log_target=True) on log_softmax"),
        Implementation("kl_div", ("fkl",), ("cpu", "cuda"), _torch_kl_div, _peer_bytes,
                       note="torch.nn.functional.kl_div(log_target=True) on log_softmax"),
    ]
}
LIBRARY = ("torch", "triton")
