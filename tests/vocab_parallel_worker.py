"""What each spawned gloo rank runs for tests/test_vocab_parallel.py (and test_data_parallel).

Every rank builds the same inputs from the case's seed, computes the loss on its slice of the
vocabulary with the group, and the single-process loss on the whole rows itself, and writes how
far apart they are; the tests read those numbers back. One spawn runs every case, so the
processes start once.
"""

from __future__ import annotations

import datetime
import faulthandler
import gc
import os
import sys
import tempfile
import traceback
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException

VOCAB = 1000
# Slice boundaries per world size: uneven widths, the last slice ends in -inf padding.
BOUNDS = {2: (0, 613, VOCAB), 3: (0, 410, 743, VOCAB)}
PADDING = 40  # the vocabulary's last columns, -inf in both models (Megatron pads the vocab)
TIED = 8  # equal top teacher logits straddling a slice boundary in some rows
WIDE_TIE = (405, 750)  # a tie group spanning 3 ranks' middle slice whole


def logits(seed, *, teacher_dtype=torch.float32, student_dtype=torch.float32, rows=(2, 5),
           vocab=VOCAB):
    """(student, teacher, labels): random logits with -inf padding, teacher-only -inf
    positions, tie groups across the first boundary of 2 ranks (rows [0, :3]) and of 3 ranks
    (rows [1, :3]), one spanning 3 ranks' middle slice (row [1, 3]), ignored rows."""
    g = torch.Generator().manual_seed(seed)
    student = 2.0 * torch.randn(*rows, vocab, generator=g)
    teacher = 3.0 * torch.randn(*rows, vocab, generator=g)
    student[..., -PADDING:] = float("-inf")
    teacher[..., -PADDING:] = float("-inf")
    teacher[0, 1, 5:9] = float("-inf")  # only the teacher: outside C
    # 2 tied tokens left of a boundary, 6 right of it, holding nearly all the mass: the
    # head (mu = 0.5) takes the first 4 by global index, 2 on each side.
    for batch, world in enumerate((2, 3)[:rows[0]]):
        boundary = BOUNDS[world][1]
        for r in range(min(rows[1], 3)):
            teacher[batch, r, boundary - 2:boundary - 2 + TIED] = 14.0
    if rows[0] > 1 and rows[1] > 3:
        teacher[1, 3, WIDE_TIE[0]:WIDE_TIE[1]] = 14.0
    labels = torch.randint(0, vocab - PADDING, rows, generator=g)
    labels.view(-1)[0] = labels.view(-1)[-2] = -100
    labels.view(-1)[min(3, labels.numel() - 2)] = 7  # what ignore_index=7 ignores
    return student.to(student_dtype), teacher.to(teacher_dtype), labels


def _slice(x, rank, world):
    lo, hi = BOUNDS[world][rank], BOUNDS[world][rank + 1]
    return x[..., lo:hi]


def _gap(a, b):
    """max |a - b| / max |b| (0 when both are 0) where b is not NaN; inf unless a is NaN
    exactly where b is."""
    a, b = a.double(), b.double()
    if not torch.equal(torch.isnan(a), torch.isnan(b)):
        return float("inf")
    a, b = a[~torch.isnan(b)], b[~torch.isnan(b)]
    if b.numel() == 0:
        return 0.0
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / scale if scale > 0 else (a - b).abs().max().item()


def _compare(name, call, inputs, rank, world, group, out, *, gradient=True, reference=None,
             **options):
    """Run ``call`` on the slices with the group and ``reference`` (default: ``call``) on the
    whole rows alone; record the loss's and the gradient's gap."""
    student, teacher, labels = inputs
    whole = student.clone().requires_grad_(gradient)
    part = _slice(student, rank, world).clone().requires_grad_(gradient)
    expected = (reference or call)(whole, teacher, labels, **options)
    got = call(part, _slice(teacher, rank, world), labels, process_group=group, **options)
    result = {"loss": _gap(got, expected)}
    if gradient:
        (expected.sum() if expected.dim() else expected).backward()
        (got.sum() if got.dim() else got).backward()
        result["grad"] = _gap(part.grad, _slice(whole.grad, rank, world))
    out[name] = result


def _cases(rank, world, group, out):
    import akl_kernels as ak
    from akl_kernels.config import DIVERGENCES

    base = logits(1)
    for divergence in DIVERGENCES:
        _compare(f"{divergence}", ak.divergence_loss, base, rank, world, group, out,
                 divergence=divergence)
        _compare(f"{divergence}-T2", ak.divergence_loss, logits(2), rank, world, group, out,
                 divergence=divergence, temperature=2.0)
    for reduction in ("sum", "none"):
        for divergence in ("akl", "rkl"):
            _compare(f"{divergence}-{reduction}", ak.divergence_loss, base, rank, world, group,
                     out, divergence=divergence, reduction=reduction)
    _compare("akl-ignore7", ak.akl_loss, base, rank, world, group, out, ignore_index=7)
    for name, options in {"akl-crossing": dict(include_crossing=True),
                          "akl-mu0.2": dict(mu=0.2), "akl-mu1": dict(mu=1.0),
                          "akl-mu0.9-crossing": dict(mu=0.9, include_crossing=True)}.items():
        _compare(name, ak.akl_loss, base, rank, world, group, out, **options)
    bf16 = logits(3, teacher_dtype=torch.bfloat16, student_dtype=torch.bfloat16)
    _compare("akl-bf16", ak.akl_loss, bf16, rank, world, group, out)
    _compare("fkl-bf16", ak.fkl_loss, bf16, rank, world, group, out)
    _compare("akl-bf16-teacher", ak.akl_loss, logits(3, teacher_dtype=torch.bfloat16),
             rank, world, group, out)
    all_ignored = (base[0], base[1], torch.full_like(base[2], -100))
    _compare("akl-all-ignored", ak.akl_loss, all_ignored, rank, world, group, out)
    # NaN in an ignored row, in rank 0's slice only: every rank's gradient of that row is 0
    # (the other slices are finite: their statistics are NaN, their coefficient 0).
    nan_ignored = tuple(x.clone() for x in base)
    nan_ignored[0][0, 0, 100] = float("nan")
    for divergence in ("fkl", "akl", "jsd", "tvd"):
        _compare(f"{divergence}-nan-in-an-ignored-row", ak.divergence_loss, nan_ignored, rank,
                 world, group, out, divergence=divergence)
    # +inf in a scored row's teacher, in the last rank's slice: the loss is NaN and so is
    # that row's gradient on every rank, as in one process.
    inf_scored = tuple(x.clone() for x in base)
    inf_scored[1][1, 2, 900] = float("inf")
    _compare("akl-inf-in-a-scored-row", ak.akl_loss, inf_scored, rank, world, group, out,
             reduction="none")
    # A row whose logits are all -inf in one slice (but not the others).
    dark = tuple(x.clone() for x in base)
    dark[0][0, 4, :BOUNDS[world][1]] = float("-inf")
    dark[1][1, 4, :BOUNDS[world][1]] = float("-inf")
    _compare("akl-a-slice-all-neg-inf", ak.akl_loss, dark, rank, world, group, out)
    for kd_ratio in (0.0, 0.5, 1.0):
        _compare(f"distillation-{kd_ratio}", ak.distillation_loss, base, rank, world, group,
                 out, kd_ratio=kd_ratio)
    _compare("distillation-jsd-T2", ak.distillation_loss, logits(4), rank, world, group, out,
             divergence="jsd", beta=0.3, temperature=2.0)
    parts = lambda *a, **k: torch.stack(ak.distillation_loss(*a, return_parts=True, **k))  # noqa
    _compare("distillation-parts", parts, base, rank, world, group, out)
    module = lambda s, t, labels, process_group=None: ak.DistillationLoss(  # noqa: E731
        "akl", kd_ratio=0.7, process_group=process_group)(s, t, labels)
    _compare("module-distillation", module, base, rank, world, group, out)
    _heads(rank, world, group, out)
    _errors(rank, world, group, out)
    _fused_linear(rank, world, group, out)
    _collectives(rank, world, group, out)
    _dtensor(rank, world, out)
    _triton(rank, world, group, out)


def _heads(rank, world, group, out):
    import akl_kernels as ak

    for name, dtype, options in (("heads", torch.float32, {}),
                                 ("heads-crossing", torch.float32, dict(include_crossing=True)),
                                 ("heads-bf16", torch.bfloat16, dict(mu=0.7))):
        student, teacher, _ = logits(5, teacher_dtype=dtype)
        expected = ak.head_tail_stats(student, teacher, **options)
        got = ak.head_tail_stats(_slice(student, rank, world), _slice(teacher, rank, world),
                                 process_group=group, **options)
        out[name] = {"counts_equal": bool(torch.equal(got.head_count, expected.head_count)),
                     "tied_rows_head": got.head_count[:, :3].tolist(),
                     "wide_tie_head": int(got.head_count[1, 3]),
                     "weights": _gap(got.head_weight, expected.head_weight),
                     "mass": _gap(got.head_mass, expected.head_mass)}


def _errors(rank, world, group, out):
    """Calls that must fail with a clear error before any collective: (type, message,
    collectives made)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import akl_kernels as ak
    from akl_kernels.vocab_shards import recorded_collectives

    student, teacher, _ = logits(10)
    part_s, part_t = _slice(student, rank, world), _slice(teacher, rank, world)
    sparse = ak.topk_teacher(part_t, 4)
    mesh = init_device_mesh("cpu", (world,))
    d_student = distribute_tensor(student, mesh, [Shard(-1)])
    d_teacher = distribute_tensor(teacher, mesh, [Shard(-1)])
    calls = {
        "topk-with-group": lambda: ak.fkl_loss(part_s, sparse, process_group=group),
        "fused-topk-with-group": lambda: ak.fused_linear_fkl_loss(
            torch.randn(2, 5, 4), torch.randn(part_s.shape[-1], 4), teacher_logits=sparse,
            process_group=group),
        "dtensor-and-group": lambda: ak.fkl_loss(d_student, d_teacher, process_group=group),
        "dtensor-and-tensor": lambda: ak.fkl_loss(d_student, teacher),
        "dtensor-placements-differ": lambda: ak.fkl_loss(
            d_student, distribute_tensor(teacher, mesh, [Shard(0)])),
        "dtensor-sharded-rows": lambda: ak.fkl_loss(
            distribute_tensor(student, mesh, [Shard(0)]),
            distribute_tensor(teacher, mesh, [Shard(0)])),
    }
    for name, call in calls.items():
        with recorded_collectives() as made:
            try:
                call()
                out[f"error-{name}"] = None
            except (TypeError, ValueError) as error:
                out[f"error-{name}"] = (type(error).__name__, str(error), len(made))


def _fused_linear(rank, world, group, out):
    """The column-parallel LM head: weights (and biases) sliced by vocabulary rows, hidden
    states replicated; the hidden states' gradient is each rank's partial sum."""
    import akl_kernels as ak
    from akl_kernels.vocab_shards import recorded_collectives

    g = torch.Generator().manual_seed(9)
    hidden = torch.randn(2, 6, 24, generator=g)
    teacher_hidden = torch.randn(2, 6, 32, generator=g)
    weight = 0.3 * torch.randn(VOCAB, 24, generator=g)
    bias = 0.1 * torch.randn(VOCAB, generator=g)
    teacher_weight = 0.3 * torch.randn(VOCAB, 32, generator=g)
    _, _, labels = logits(9, rows=(2, 6))
    lo, hi = BOUNDS[world][rank], BOUNDS[world][rank + 1]
    for name, call, options in (
            ("fkl", ak.fused_linear_loss, dict(divergence="fkl")),
            ("akl", ak.fused_linear_akl_loss, {}),
            ("distillation", ak.fused_linear_distillation_loss, dict(divergence="jsd")),
            ("akl-chunked", ak.fused_linear_akl_loss, dict(chunk_size=5)),
            ("akl-recompute", ak.fused_linear_akl_loss, dict(chunk_size=5,
                                                            strategy="recompute")),
            ("distillation-recompute", ak.fused_linear_distillation_loss,
             dict(strategy="recompute")),
            ("akl-teacher-logits", ak.fused_linear_akl_loss, {})):
        leaves = [x.clone().requires_grad_() for x in (hidden, weight, bias)]
        mine = [leaves[0].detach().clone().requires_grad_(),
                weight[lo:hi].clone().requires_grad_(), bias[lo:hi].clone().requires_grad_()]
        if name.endswith("teacher-logits"):
            t_logits = teacher_hidden @ teacher_weight.T
            whole_teacher = dict(teacher_logits=t_logits)
            my_teacher = dict(teacher_logits=t_logits[..., lo:hi])
        else:
            whole_teacher = dict(teacher_hidden=teacher_hidden, teacher_weight=teacher_weight)
            my_teacher = dict(teacher_hidden=teacher_hidden,
                              teacher_weight=teacher_weight[lo:hi])
        expected = call(leaves[0], leaves[1], labels, student_bias=leaves[2], **whole_teacher,
                        **options)
        with recorded_collectives() as forward:
            got = call(mine[0], mine[1], labels, student_bias=mine[2], process_group=group,
                       **my_teacher, **options)
        expected.backward()
        with recorded_collectives() as backward:
            got.backward()
        hidden_grad = mine[0].grad.clone()
        dist.all_reduce(hidden_grad, group=group)  # the column-parallel layer's all-reduce
        out[f"fused-{name}"] = {"loss": _gap(got, expected),
                                "grad_weight": _gap(mine[1].grad, leaves[1].grad[lo:hi]),
                                "grad_bias": _gap(mine[2].grad, leaves[2].grad[lo:hi]),
                                "grad_hidden": _gap(hidden_grad, leaves[0].grad),
                                "forward_rounds": len(forward),
                                "backward_rounds": len(backward)}


def _collectives(rank, world, group, out):
    """The collectives of one call, forward and backward apart."""
    import akl_kernels as ak
    from akl_kernels.vocab_shards import recorded_collectives

    for name, teacher_dtype, call, options in (
            ("fkl", torch.float32, ak.fkl_loss, {}),
            ("jsd", torch.float32, ak.jsd_loss, {}),
            ("akl", torch.float32, ak.akl_loss, {}),
            ("akl-bf16", torch.bfloat16, ak.akl_loss, {}),
            ("akl-mu1", torch.float32, ak.akl_loss, dict(mu=1.0)),
            ("distillation", torch.float32, ak.distillation_loss, {})):
        student, teacher, labels = logits(6, teacher_dtype=teacher_dtype)
        part = _slice(student, rank, world).clone().requires_grad_()
        with recorded_collectives() as forward:
            loss = call(part, _slice(teacher, rank, world), labels, process_group=group,
                        **options)
        with recorded_collectives() as backward:
            loss.backward()
        out[f"collectives-{name}"] = {"forward": [tuple(c) for c in forward],
                                      "backward": len(backward), "rows": labels.numel()}


def _dtensor(rank, world, out):
    """The same losses with DTensor logits (Shard(-1), as loss_parallel gives them)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import akl_kernels as ak

    mesh = init_device_mesh("cpu", (world,))
    student, teacher, labels = logits(7)
    for name, call, options in (("fkl", ak.fkl_loss, {}), ("akl", ak.akl_loss, {}),
                                ("distillation", ak.distillation_loss, dict(kd_ratio=0.3)),
                                ("akl-replicated", ak.akl_loss, {})):
        placement = Replicate() if name.endswith("replicated") else Shard(-1)
        whole = student.clone().requires_grad_()
        expected = call(whole, teacher, labels, **options)
        expected.backward()
        s = distribute_tensor(student, mesh, [placement]).requires_grad_()
        t = distribute_tensor(teacher, mesh, [placement])
        got = call(s, t, labels, **options)
        got.backward()
        out[f"dtensor-{name}"] = {
            "loss": _gap(got, expected),
            "grad": _gap(s.grad.full_tensor(), whole.grad),
            "grad_placements": str(s.grad.placements)}


def _triton(rank, world, group, out):
    """backend="triton" on the slices (its backward kernel in the interpreter)."""
    import akl_kernels as ak

    inputs = logits(8, rows=(1, 3), vocab=VOCAB)
    for name, call, options in (("fkl", ak.fkl_loss, {}), ("akl", ak.akl_loss, {}),
                                ("distillation", ak.distillation_loss, {})):
        _compare(f"triton-{name}", call, inputs, rank, world, group, out, backend="triton",
                 **options)


def _tiny_gpt2(seed):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=2,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0,
                        eos_token_id=0)
    return GPT2LMHeadModel(config)


def _batch(unequal):
    """A global batch of 4 sequences: inputs and next-token labels; ``unequal`` ignores
    labels in the first two sequences only (rank 0's half holds fewer valid tokens)."""
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(0, 96, (4, 13), generator=g)
    labels = ids[:, 1:].clone()
    if unequal:
        labels[0, :7] = -100
        labels[1, 3:5] = -100
    return ids[:, :-1], labels


STEPS = 5


def _train(student, teacher, inputs, labels, *, sum_over=None):
    """5 SGD steps of AKL; the loss of each step over the global batch. ``sum_over`` (the
    group's global count of valid labels, data parallel): the loss is the sum divided by it,
    times the world size that DDP / FSDP's gradient averaging divides by again."""
    import akl_kernels as ak

    optimizer = torch.optim.SGD(student.parameters(), lr=0.5)
    curve = []
    for _ in range(STEPS):
        with torch.no_grad():
            teacher_logits = teacher(inputs).logits
        logits = student(inputs).logits
        if sum_over is None:
            loss = ak.akl_loss(logits, teacher_logits, labels)
            reported = loss.detach()
        else:
            total = ak.akl_loss(logits, teacher_logits, labels, reduction="sum")
            loss = total / sum_over * dist.get_world_size()
            summed = total.detach().clone()
            dist.all_reduce(summed)
            reported = summed / sum_over
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        curve.append(float(reported))
    return curve


def data_parallel(rank, world, group, out):
    """DDP and FSDP2 (fully_shard) against one process on the global batch, with equal valid
    counts per rank (mean per rank) and unequal ones (sum over the all-reduced count)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    teacher = _tiny_gpt2(1).eval().requires_grad_(False)
    mesh = init_device_mesh("cpu", (world,))
    for unequal in (False, True):
        inputs, labels = _batch(unequal)
        single = _train(_tiny_gpt2(0), teacher, inputs, labels)
        mine = slice(rank * 4 // world, (rank + 1) * 4 // world)
        count = (labels[mine] != -100).sum().to(torch.float32)
        dist.all_reduce(count)
        for wrapper in ("ddp", "fsdp2"):
            student = _tiny_gpt2(0)
            if wrapper == "ddp":
                student = DistributedDataParallel(student)
            else:
                for block in student.transformer.h:
                    fully_shard(block, mesh=mesh)
                fully_shard(student, mesh=mesh)
            curve = _train(student, teacher, inputs[mine], labels[mine],
                           sum_over=count if unequal else None)
            if not unequal:  # the mean per rank: the global mean is the ranks' average
                summed = torch.tensor(curve)
                dist.all_reduce(summed)
                curve = (summed / world).tolist()
            out[f"{wrapper}-{'unequal' if unequal else 'equal'}"] = {
                "single": single, "parallel": curve,
                "valid_here": int((labels[mine] != -100).sum())}
        if unequal:  # what the rule is for: a mean per rank weighs the ranks' tokens unequally
            naive = _train(DistributedDataParallel(_tiny_gpt2(0)), teacher, inputs[mine],
                           labels[mine])
            summed = torch.tensor(naive)
            dist.all_reduce(summed)
            out["ddp-unequal-mean-per-rank"] = {"single": single,
                                                "parallel": (summed / world).tolist()}


_PEER_LOST = ("closed by peer", "reset by peer")  # gloo's words when a peer's socket goes


def _run(rank, world, init, result_dir, target):
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: its CPU interpreter
    # This rank's stderr, C++ included (what gloo prints before it aborts), goes to a file that
    # spawn() puts in its error: pytest's report of a crashed child would show neither.
    with open(os.path.join(result_dir, f"rank{rank}.log"), "w") as log:
        os.dup2(log.fileno(), 2)
    sys.stderr.reconfigure(line_buffering=True)
    faulthandler.enable()  # onto fd 2, open until the process ends (teardown crashes too)
    _run_target(rank, world, init, result_dir, target)


def _run_target(rank, world, init, result_dir, target):
    # A rank left waiting on a dead peer fails in minutes rather than gloo's default 30 (and
    # not before a slow peer's torch.compile is done).
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world,
                            timeout=datetime.timedelta(minutes=5))
    out: dict = {}
    finished = False
    try:
        target(rank, world, dist.group.WORLD, out)
        finished = True
    except BaseException as error:
        traceback.print_exc()
        # A Python error of its own is never retried, even if a peer then aborts first (spawn()
        # reads this); a collective that failed because a peer died is not one.
        if not any(words in str(error) for words in _PEER_LOST):
            open(os.path.join(result_dir, f"rank{rank}.raised"), "w").close()
        raise
    finally:
        if finished:
            saved = os.path.join(result_dir, f"rank{rank}.pt")
            torch.save(out, saved + ".part")
            os.replace(saved + ".part", saved)  # a result file exists only whole
            # DDP and FSDP modules sit in reference cycles: free them while the group exists,
            # and let no rank close its sockets while a peer is still in a collective (gloo
            # aborts the process when a peer's connection resets under it).
            gc.collect()
            dist.barrier()
        dist.destroy_process_group()


def _tail(path, lines=25):
    try:
        with open(path) as f:
            return "".join(f.readlines()[-lines:]) or "(empty)\n"
    except OSError:
        return "(no log)\n"


def spawn(world, target_name, *, attempts=2):
    """Run ``target_name`` (a function of this module) on ``world`` gloo ranks; every rank's
    results, a list of dicts.

    A Python error of a rank's own raises here with every rank's stderr. When no rank raised
    one, a rank died (a signal: gloo aborts the process on a socket error; seen once in CI,
    SIGABRT, cause not shown), and the ranks are started again from scratch once, with a
    warning that carries the crash's stderr; a second crash raises."""
    target = globals()[target_name]
    attempt = 0
    while True:
        attempt += 1
        with tempfile.TemporaryDirectory() as tmp:
            init = "file://" + os.path.join(tmp, "rendezvous")
            results = [os.path.join(tmp, f"rank{r}.pt") for r in range(world)]
            try:
                mp.spawn(_run, args=(world, init, tmp, target), nprocs=world, join=True)
                return [torch.load(path) for path in results]
            except ProcessException as error:
                logs = "".join(f"--- rank {r} stderr ---\n"
                               + _tail(os.path.join(tmp, f"rank{r}.log")) for r in range(world))
                what = f"{target_name} on {world} gloo ranks (attempt {attempt}): {error}"
                if all(os.path.exists(path) for path in results):
                    # Every rank finished and saved what it computed: the crash is in gloo's
                    # teardown, not in what the tests check. Say so, loudly, and go on.
                    warnings.warn(f"{what}, after its results were saved\n{logs}", UserWarning,
                                  stacklevel=2)
                    return [torch.load(path) for path in results]
                # No rank raised an error of its own: one died (a signal; its peers' collectives
                # then fail with "closed by peer", whichever of them spawn reports first).
                crashed = not any(os.path.exists(os.path.join(tmp, f"rank{r}.raised"))
                                  for r in range(world))
                if not crashed or attempt == attempts:
                    raise RuntimeError(f"{what}\n{logs}") from error
                warnings.warn(f"{what}; starting it again\n{logs}", UserWarning, stacklevel=2)


def cases(rank, world, group, out):
    _cases(rank, world, group, out)


def aborts_once(rank, world, group, out):
    """The last rank aborts (as gloo does on a socket error) unless the file named by
    AKL_ABORT_MARKER exists, which it creates first: spawn() starts it again."""
    marker = os.environ["AKL_ABORT_MARKER"]
    if rank == world - 1 and not os.path.exists(marker):
        open(marker, "w").close()
        os.abort()
    dist.barrier(group)
    out["attempt"] = "second"


def fails_on_the_last_rank(rank, world, group, out):
    """What spawn() reports when a rank fails (tests/test_vocab_parallel.py)."""
    if rank == world - 1:
        raise ValueError(f"rank {rank} fails on purpose")
    dist.barrier(group)


def compiled(rank, world, group, out):
    """The losses with a group inside ``torch.compile(fullgraph=True)`` (a graph break would
    raise) against the single-process eager loss."""
    import akl_kernels as ak

    for name, loss in (("fkl", ak.fkl_loss), ("akl", ak.akl_loss)):
        torch._dynamo.reset()
        _compare(f"compiled-{name}", torch.compile(loss, fullgraph=True), logits(4), rank,
                 world, group, out, reference=loss)
    # The column-parallel head, fused: the hidden states' gradient is this rank's partial sum.
    g = torch.Generator().manual_seed(5)
    hidden, teacher_hidden = (torch.randn(2, 6, width, generator=g) for width in (24, 32))
    weight, teacher_weight = (0.3 * torch.randn(VOCAB, width, generator=g) for width in (24, 32))
    _, _, labels = logits(5, rows=(2, 6))
    lo, hi = BOUNDS[world][rank], BOUNDS[world][rank + 1]
    whole = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
    mine = [hidden.clone().requires_grad_(), weight[lo:hi].clone().requires_grad_()]
    expected = ak.fused_linear_akl_loss(*whole, labels, teacher_hidden=teacher_hidden,
                                        teacher_weight=teacher_weight)
    torch._dynamo.reset()
    got = torch.compile(ak.fused_linear_akl_loss, fullgraph=True)(
        *mine, labels, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight[lo:hi],
        process_group=group)
    expected.backward()
    got.backward()
    hidden_grad = mine[0].grad.clone()
    dist.all_reduce(hidden_grad, group=group)
    out["compiled-fused-akl"] = {"loss": _gap(got, expected),
                                 "grad_weight": _gap(mine[1].grad, whole[1].grad[lo:hi]),
                                 "grad_hidden": _gap(hidden_grad, whole[0].grad)}
