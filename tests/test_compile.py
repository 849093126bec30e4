"""``torch.compile(fullgraph=True)`` over every public loss: one graph, no break, the same values
and gradients as eager (docs/contract.md §8); a compiled training step; ``check_values``."""

import pytest
import torch

import akl_kernels
from tests.conftest import BACKENDS, DEVICE, HAS_CUDA

LEAD, V, H = (2, 12), 1000, 16
FAMILY_OPTIONS = {"jsd": dict(beta=0.3), "skew_fkl": dict(lam=0.2), "skew_rkl": dict(lam=0.2),
                  "mixed_kl": dict(lam=0.4), "akl": dict(mu=0.6)}


def _logits(gen, dtype=torch.float32):
    s = (torch.randn(*LEAD, V, generator=gen) * 2).to(dtype).to(DEVICE)
    t = (torch.randn(*LEAD, V, generator=gen) * 2).to(dtype).to(DEVICE)
    labels = torch.randint(0, V, LEAD, generator=gen).to(DEVICE)
    labels[0, :3] = -100
    return s.requires_grad_(True), t, labels


def _heads(gen):
    hidden = torch.randn(*LEAD, H, generator=gen).to(DEVICE).requires_grad_(True)
    weight = (torch.randn(V, H, generator=gen) * 0.3).to(DEVICE).requires_grad_(True)
    teacher_hidden = torch.randn(*LEAD, 8, generator=gen).to(DEVICE)
    teacher_weight = (torch.randn(V, 8, generator=gen) * 0.5).to(DEVICE)
    return hidden, weight, teacher_hidden, teacher_weight


# Every public entry point on logits, as f(student, teacher, labels) -> loss (a tensor).
def _logit_entries(backend):
    entries = {}
    for kind in ("fkl", "rkl", "akl", "jsd", "skew_fkl", "skew_rkl", "tvd", "mixed_kl"):
        fn = getattr(akl_kernels, f"{kind}_loss")
        options = dict(FAMILY_OPTIONS.get(kind, {}), backend=backend, temperature=1.5)
        entries[f"{kind}_loss"] = lambda s, t, y, fn=fn, o=options: fn(s, t, y, **o)
    entries["divergence_loss"] = lambda s, t, y: akl_kernels.divergence_loss(
        s, t, y, divergence="jsd", beta=0.7, backend=backend)
    entries["distillation_loss"] = lambda s, t, y: akl_kernels.distillation_loss(
        s, t, y, divergence="akl", kd_ratio=0.3, backend=backend)
    entries["distillation_loss(return_parts)"] = lambda s, t, y: sum(
        akl_kernels.distillation_loss(s, t, y, backend=backend, return_parts=True,
                                      check_values=False))
    entries["head_tail_stats"] = lambda s, t, y: akl_kernels.head_tail_stats(
        s, t, backend=backend).head_weight.sum()
    modules = {"FKLLoss": akl_kernels.FKLLoss(), "RKLLoss": akl_kernels.RKLLoss(),
               "AKLLoss": akl_kernels.AKLLoss(mu=0.4), "JSDLoss": akl_kernels.JSDLoss(0.2),
               "SkewFKLLoss": akl_kernels.SkewFKLLoss(), "SkewRKLLoss": akl_kernels.SkewRKLLoss(),
               "TVDLoss": akl_kernels.TVDLoss(), "MixedKLLoss": akl_kernels.MixedKLLoss(),
               "DivergenceLoss": akl_kernels.DivergenceLoss("skew_rkl", lam=0.3),
               "DistillationLoss": akl_kernels.DistillationLoss("rkl", kd_ratio=0.6)}
    for name, module in modules.items():
        module.options["backend"] = backend
        entries[name] = module
    return entries


def _linear_entries(backend):
    def teacher(th, tw):
        return dict(teacher_hidden=th, teacher_weight=tw, backend=backend)

    return {
        "fused_linear_loss": lambda h, w, th, tw, y: akl_kernels.fused_linear_loss(
            h, w, y, divergence="tvd", **teacher(th, tw)),
        "fused_linear_akl_loss": lambda h, w, th, tw, y: akl_kernels.fused_linear_akl_loss(
            h, w, y, chunk_size=7, **teacher(th, tw)),
        "fused_linear_fkl_loss": lambda h, w, th, tw, y: akl_kernels.fused_linear_fkl_loss(
            h, w, y, **teacher(th, tw)),
        "fused_linear_rkl_loss": lambda h, w, th, tw, y: akl_kernels.fused_linear_rkl_loss(
            h, w, y, **teacher(th, tw)),
        "fused_linear_distillation_loss": lambda h, w, th, tw, y:
            akl_kernels.fused_linear_distillation_loss(h, w, y, **teacher(th, tw)),
        "fused_linear_loss(teacher_logits)": lambda h, w, th, tw, y:
            akl_kernels.fused_linear_loss(h, w, y, teacher_logits=(th @ tw.T).detach(),
                                          backend=backend),
        "FusedLinearLoss": lambda h, w, th, tw, y: akl_kernels.FusedLinearLoss(
            "jsd", backend=backend)(h, w, y, teacher_hidden=th, teacher_weight=tw),
        "FusedLinearAKLLoss": lambda h, w, th, tw, y: akl_kernels.FusedLinearAKLLoss(
            backend=backend)(h, w, y, teacher_hidden=th, teacher_weight=tw),
        "FusedLinearFKLLoss": lambda h, w, th, tw, y: akl_kernels.FusedLinearFKLLoss(
            backend=backend)(h, w, y, teacher_hidden=th, teacher_weight=tw),
        "FusedLinearRKLLoss": lambda h, w, th, tw, y: akl_kernels.FusedLinearRKLLoss(
            backend=backend)(h, w, y, teacher_hidden=th, teacher_weight=tw),
        "FusedLinearDistillationLoss": lambda h, w, th, tw, y:
            akl_kernels.FusedLinearDistillationLoss(kd_ratio=0.2, backend=backend)(
                h, w, y, teacher_hidden=th, teacher_weight=tw),
    }


LOGIT_ENTRIES = sorted(_logit_entries("torch"))
LINEAR_ENTRIES = sorted(_linear_entries("torch"))


def _graphs(fn, *args):
    torch._dynamo.reset()
    explained = torch._dynamo.explain(fn)(*args)
    return explained.graph_count, explained.graph_break_count, explained.break_reasons


@pytest.mark.parametrize("entry", LOGIT_ENTRIES)
def test_logit_losses_trace_as_one_graph(rng, entry):
    s, t, y = _logits(rng)
    count, breaks, reasons = _graphs(_logit_entries("torch")[entry], s, t, y)
    assert (count, breaks) == (1, 0), reasons


@pytest.mark.parametrize("entry", LINEAR_ENTRIES)
def test_fused_linear_losses_trace_as_one_graph(rng, entry):
    h, w, th, tw = _heads(rng)
    y = torch.randint(0, V, LEAD, generator=rng).to(DEVICE)
    count, breaks, reasons = _graphs(_linear_entries("torch")[entry], h, w, th, tw, y)
    assert (count, breaks) == (1, 0), reasons


@pytest.mark.interpreter
@pytest.mark.parametrize("entry", ["akl_loss", "distillation_loss", "tvd_loss"])
def test_triton_losses_trace_as_one_graph(rng, entry):
    s, t, y = _logits(rng)
    count, breaks, reasons = _graphs(_logit_entries("triton")[entry], s, t, y)
    assert (count, breaks) == (1, 0), reasons


def _loss_and_grad(fn, leaves, *rest):
    loss = fn(*leaves, *rest)
    return loss.detach(), torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("entry", LOGIT_ENTRIES)
def test_compiled_logit_losses_equal_eager(rng, entry):
    s, t, y = _logits(rng, torch.bfloat16)
    fn = _logit_entries("torch")[entry]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    if entry == "head_tail_stats":  # no gradient: values only
        assert torch.equal(compiled(s, t, y), fn(s, t, y))
        return
    eager_loss, (eager_grad,) = _loss_and_grad(fn, [s], t, y)
    loss, (grad,) = _loss_and_grad(compiled, [s], t, y)
    assert torch.equal(loss, eager_loss) and torch.equal(grad, eager_grad)


@pytest.mark.parametrize("entry", LINEAR_ENTRIES)
def test_compiled_fused_linear_losses_equal_eager(rng, entry):
    h, w, th, tw = _heads(rng)
    y = torch.randint(0, V, LEAD, generator=rng).to(DEVICE)
    fn = _linear_entries("torch")[entry]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    eager_loss, eager_grads = _loss_and_grad(fn, [h, w], th, tw, y)
    loss, grads = _loss_and_grad(compiled, [h, w], th, tw, y)
    assert torch.equal(loss, eager_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, eager_grads, strict=True))


@pytest.mark.parametrize("entry", ["akl_loss", "distillation_loss", "tvd_loss", "AKLLoss"])
def test_inductor_equals_eager(rng, entry):
    # Inductor generates its own code for the reduction around the operator: equal to rounding.
    s, t, y = _logits(rng)
    fn = _logit_entries("torch")[entry]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    eager_loss, (eager_grad,) = _loss_and_grad(fn, [s], t, y)
    loss, (grad,) = _loss_and_grad(compiled, [s], t, y)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, eager_grad, rtol=1e-6, atol=1e-9)


def test_inductor_fused_linear_equals_eager(rng):
    h, w, th, tw = _heads(rng)
    y = torch.randint(0, V, LEAD, generator=rng).to(DEVICE)
    fn = _linear_entries("torch")["fused_linear_distillation_loss"]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    eager_loss, eager_grads = _loss_and_grad(fn, [h, w], th, tw, y)
    loss, grads = _loss_and_grad(compiled, [h, w], th, tw, y)
    torch.testing.assert_close(loss, eager_loss, rtol=1e-6, atol=1e-7)
    for a, b in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)


class _TinyLM(torch.nn.Module):
    def __init__(self, vocab, width):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.mix = torch.nn.Linear(width, width)
        self.head = torch.nn.Linear(width, vocab, bias=False)

    def hidden(self, ids):
        return torch.tanh(self.mix(self.embed(ids)))

    def forward(self, ids):
        return self.head(self.hidden(ids))


@pytest.mark.parametrize("fused", [False, True], ids=["logits", "fused_linear"])
def test_compiled_training_step(rng, fused):
    """A tiny model trained with its forward pass and the loss compiled as one graph (backward
    and the optimizer step outside, as ``model.compile()`` does): the trajectory of eager."""
    vocab, width = 97, 24
    teacher = _TinyLM(vocab, width).to(DEVICE).requires_grad_(False)
    ids = torch.randint(0, vocab, (4, 9), generator=rng).to(DEVICE)
    labels = torch.randint(0, vocab, (4, 9), generator=rng).to(DEVICE)
    labels[:, -1] = -100
    loss_fn = akl_kernels.DistillationLoss("akl", kd_ratio=0.7)
    fused_fn = akl_kernels.FusedLinearDistillationLoss("akl", kd_ratio=0.7)

    def forward(model):
        with torch.no_grad():
            teacher_logits = teacher(ids)
        if fused:
            return fused_fn(model.hidden(ids), model.head.weight, labels,
                            teacher_logits=teacher_logits)
        return loss_fn(model(ids), teacher_logits, labels)

    curves = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = _TinyLM(vocab, width).to(DEVICE)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        torch._dynamo.reset()
        run = torch.compile(forward, fullgraph=True) if compiled else forward
        losses = []
        for _ in range(4):
            loss = run(model)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.detach())
        curves.append(torch.stack(losses))
    eager, compiled = curves
    assert eager[-1] < eager[0]  # it trains
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_check_values_gates_the_label_check(rng, backend):
    s, t, y = _logits(rng)
    y[1, 4] = V  # outside the vocabulary, not ignored
    with pytest.raises(ValueError, match="labels must lie in"):
        akl_kernels.distillation_loss(s, t, y, backend=backend)
    # The check runs inside the operator, so it holds in a compiled graph too.
    torch._dynamo.reset()
    compiled = torch.compile(akl_kernels.distillation_loss, fullgraph=True, backend="aot_eager")
    with pytest.raises(ValueError, match="labels must lie in"):
        compiled(s, t, y, backend=backend)
    # check_values=False skips it: a wrong loss for that row, but no error and no bad read.
    loss = akl_kernels.distillation_loss(s, t, y, backend=backend, check_values=False)
    assert loss.shape == ()
    h, w, th, tw = _heads(rng)
    with pytest.raises(ValueError, match="labels must lie in"):
        akl_kernels.fused_linear_distillation_loss(h, w, y, teacher_hidden=th, teacher_weight=tw,
                                                   backend=backend)


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("entry", ["akl", "distill"])
def test_cuda_graph_capture_of_a_triton_loss(entry):
    """With check_values=False the Triton path never synchronises: forward and backward of a
    loss call are captured in a CUDA graph and replayed on new data with the eager result."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (512, 32000)
    s = torch.randn(shape, device="cuda", generator=gen).bfloat16().requires_grad_(True)
    t = torch.randn(shape, device="cuda", generator=gen).bfloat16()
    y = torch.randint(0, shape[1], shape[:1], device="cuda", generator=gen)

    def call():
        if entry == "akl":
            loss = akl_kernels.akl_loss(s, t, y, check_values=False)
        else:
            loss = akl_kernels.distillation_loss(s, t, y, check_values=False)
        (grad,) = torch.autograd.grad(loss, s)
        return loss, grad

    torch.cuda.set_sync_debug_mode("error")  # any host sync below raises
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            call()  # warm-up: kernels compiled outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured_loss, captured_grad = call()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    with torch.no_grad():
        s.copy_(torch.randn(shape, device="cuda", generator=gen))
        t.copy_(torch.randn(shape, device="cuda", generator=gen))
    graph.replay()
    eager_loss, eager_grad = call()
    torch.testing.assert_close(captured_loss, eager_loss)
    torch.testing.assert_close(captured_grad, eager_grad)
