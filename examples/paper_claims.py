"""The AKL paper's two analytical findings, on a toy problem (Wu et al., COLING 2025, section 3).

A fixed teacher distribution per row (Zipf-like: p_k ~ 1 / k^1.2 over V tokens, a random token
order per row) and a learnable student (one free logit per token and row), trained by plain
gradient descent with FKL or with RKL from the same random start:

(a) FKL and RKL reach the same optimum: both students converge to the teacher, and so to each
    other;
(b) early in training FKL closes the gap on the teacher's head (its top tokens up to
    cumulative mass mu = 0.5) and RKL the gap on the tail: measured with ``head_tail_stats``
    as the head and tail gaps (sum |p - q| over each part) and as the head's share of each
    loss's gap reduction so far.

    python examples/paper_claims.py            # writes docs/paper_claims_*.png, prints a table

``tests/test_paper_claims.py`` asserts the numbers behind both claims in a smaller run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import akl_kernels


def zipf_teacher(rows: int, vocab: int, exponent: float = 1.2, seed: int = 0) -> torch.Tensor:
    """Teacher logits: log of a Zipf law, its token order shuffled per row."""
    gen = torch.Generator().manual_seed(seed)
    log_p = -exponent * torch.log(torch.arange(1, vocab + 1, dtype=torch.float64))
    order = torch.stack([torch.randperm(vocab, generator=gen) for _ in range(rows)])
    return log_p[order].float()


def train(kind: str, teacher: torch.Tensor, *, steps: int, lr: float, seed: int = 1,
          mu: float = 0.5, record: tuple[int, ...] = ()) -> dict:
    """Gradient descent on the student's logits with ``kind`` ("fkl" or "rkl") summed over
    rows. Returns the head/tail gaps (row means), FKL and RKL per step (``record`` steps, or
    every step), and the final student logits."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(teacher.shape, generator=gen).requires_grad_(True)
    optimizer = torch.optim.SGD([student], lr=lr)
    loss_fn = {"fkl": akl_kernels.fkl_loss, "rkl": akl_kernels.rkl_loss}[kind]
    history = {"step": [], "head_gap": [], "tail_gap": [], "fkl": [], "rkl": []}
    for step in range(steps + 1):
        if not record or step in record:
            logits = student.detach()
            stats = akl_kernels.head_tail_stats(logits, teacher, mu=mu)
            history["step"].append(step)
            history["head_gap"].append(stats.head_gap.mean().item())
            history["tail_gap"].append(stats.tail_gap.mean().item())
            history["fkl"].append(akl_kernels.fkl_loss(logits, teacher).item())
            history["rkl"].append(akl_kernels.rkl_loss(logits, teacher).item())
        if step < steps:
            optimizer.zero_grad()
            loss_fn(student, teacher, reduction="sum").backward()
            optimizer.step()
    history["student"] = student.detach()
    return history


def head_share(history: dict) -> list[float]:
    """The head's share of the gap reduction since step 0, per recorded step (NaN at step 0)."""
    head0, tail0 = history["head_gap"][0], history["tail_gap"][0]
    shares = []
    for head, tail in zip(history["head_gap"], history["tail_gap"], strict=True):
        closed = (head0 - head) + (tail0 - tail)
        shares.append((head0 - head) / closed if closed > 0 else float("nan"))
    return shares


def total_variation(a_logits: torch.Tensor, b_logits: torch.Tensor) -> float:
    """Mean over rows of 0.5 sum |softmax(a) - softmax(b)|."""
    a, b = torch.softmax(a_logits.double(), -1), torch.softmax(b_logits.double(), -1)
    return (0.5 * (a - b).abs().sum(-1)).mean().item()


def _plot(runs: dict, teacher: torch.Tensor, out: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"fkl": "tab:blue", "rkl": "tab:red"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for kind, h in runs.items():
        axes[0].semilogy(h["step"], h["fkl"], color=colors[kind], label=f"trained with {kind}: FKL")
        axes[0].semilogy(h["step"], h["rkl"], color=colors[kind], ls="--",
                         label=f"trained with {kind}: RKL")
    axes[0].set(xlabel="step", ylabel="divergence to the teacher (row mean)",
                title="(a) both reach the teacher")
    axes[0].legend(fontsize=8)
    # The end point, one row: teacher and both students, tokens in the teacher's order.
    teacher_p = torch.softmax(teacher[0].double(), -1)
    order = torch.argsort(teacher_p, descending=True)
    axes[1].semilogy(teacher_p[order], color="black", lw=3, alpha=0.4, label="teacher p")
    for kind, h in runs.items():
        q = torch.softmax(h["student"][0].double(), -1)[order]
        axes[1].semilogy(q, color=colors[kind], ls=":" if kind == "rkl" else "-",
                         label=f"student trained with {kind}")
    tv = total_variation(runs["fkl"]["student"], runs["rkl"]["student"])
    axes[1].set(xlabel="token (teacher's order)", ylabel="probability",
                title=f"after {runs['fkl']['step'][-1]} steps: students' TV distance {tv:.1e}")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "paper_claims_convergence.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for kind, h in runs.items():
        early = [i for i, s in enumerate(h["step"]) if s <= 200]
        steps = [h["step"][i] for i in early]
        axes[0].plot(steps, [h["head_gap"][i] for i in early], color=colors[kind], label=kind)
        axes[1].plot(steps, [h["tail_gap"][i] for i in early], color=colors[kind], label=kind)
        share = head_share(h)
        axes[2].plot(steps[1:], [share[i] for i in early[1:]], color=colors[kind], label=kind)
    axes[0].set(xlabel="step", ylabel="head gap: sum over head |p - q|", title="head gap")
    axes[1].set(xlabel="step", ylabel="tail gap: sum over tail |p - q|", title="tail gap")
    axes[2].set(xlabel="step", ylabel="head share of the gap closed so far",
                title="(b) where each loss spends its progress")
    for ax in axes:
        ax.legend()
    fig.tight_layout()
    fig.savefig(out / "paper_claims_head_tail.png", dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=200)
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=2.0)
    parser.add_argument("--out", default="docs")
    args = parser.parse_args(argv)
    teacher = zipf_teacher(args.rows, args.vocab)
    record = tuple(range(0, 201, 5)) + tuple(range(250, args.steps, 50)) + (args.steps,)
    runs = {kind: train(kind, teacher, steps=args.steps, lr=args.lr, record=record)
            for kind in ("fkl", "rkl")}
    head_count = akl_kernels.head_tail_stats(teacher, teacher).head_count.float().mean().item()
    print(f"teacher: {args.rows} rows, V = {args.vocab}, head (mu = 0.5) = {head_count:.1f} "
          f"tokens on average; SGD lr {args.lr}")
    print("| step | head gap FKL | head gap RKL | tail gap FKL | tail gap RKL "
          "| head share FKL | head share RKL |")
    print("|---|---|---|---|---|---|---|")
    shares = {kind: head_share(h) for kind, h in runs.items()}
    for i, step in enumerate(runs["fkl"]["step"]):
        if step in (0, 10, 20, 50, 100, 200, 1000, args.steps):
            f, r = runs["fkl"], runs["rkl"]
            print(f"| {step} | {f['head_gap'][i]:.4f} | {r['head_gap'][i]:.4f} "
                  f"| {f['tail_gap'][i]:.4f} | {r['tail_gap'][i]:.4f} "
                  f"| {shares['fkl'][i]:.2f} | {shares['rkl'][i]:.2f} |")
    print(f"final: FKL-trained FKL {runs['fkl']['fkl'][-1]:.2e}, RKL-trained RKL "
          f"{runs['rkl']['rkl'][-1]:.2e}, total variation between the students "
          f"{total_variation(runs['fkl']['student'], runs['rkl']['student']):.2e}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _plot(runs, teacher, out)
    print(f"wrote {out / 'paper_claims_convergence.png'} and {out / 'paper_claims_head_tail.png'}")


if __name__ == "__main__":
    main()
