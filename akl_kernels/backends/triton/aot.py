"""Ahead-of-time compilation of every kernel specialisation, no GPU needed.

The Triton interpreter forgives what the compiler rejects (types, layouts, register limits).
``check_all`` builds each specialisation that ``backend="triton"`` can launch for sm_80 and
sm_90 with Triton's bundled ptxas and prints, as JSON lines, the registers, stack, local and
shared memory of each (read with the bundled cuobjdump):
``python -m akl_kernels.backends.triton.aot`` (with TRITON_INTERPRET unset; the interpreter's
kernels cannot be compiled).
"""

from __future__ import annotations

import itertools
import json
import multiprocessing
import os
import re
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from akl_kernels.backends.interface import triton_interpreter_enabled
from akl_kernels.backends.triton import launch
from akl_kernels.backends.triton.forward_kernel import _divergence_forward_kernel
from akl_kernels.backends.triton.grad_kernel import _divergence_grad_kernel
from akl_kernels.backends.triton.topk import K_BLOCK as TOPK_K_BLOCK
from akl_kernels.backends.triton.topk import (
    _dense_grad_kernel,
    _student_side_kernel,
    _token_grad_kernel,
)

LOGIT_TYPES = ("fp32", "bf16", "fp16")


def _forward_source(s_type, t_type, head_split, pointwise, with_ce, settings, search):
    signature = {
        "s_ptr": f"*{s_type}", "t_ptr": f"*{t_type}", "valid_ptr": "*i8", "loss_ptr": "*fp32",
        "stats_ptr": "*fp32", "head_ptr": "*fp32", "count_ptr": "*i32", "labels_ptr": "*i64",
        "parts_ptr": "*fp32", "reads_ptr": "*i32", "V": "i32", "stride_s": "i32",
        "stride_t": "i32", "inv_t": "fp32",
        "fkl_weight": "fp32", "pointwise": "i32", "param": "fp32", "log_wp": "fp32",
        "log_wq": "fp32", "a0": "fp32", "t_scale": "fp32", "kd_ratio": "fp32", "mu": "fp32",
        "span": "fp32", "include_crossing": "i32",
        "HEAD_SPLIT": "constexpr", "RADIX": "constexpr", "COUNT_READS": "constexpr",
        "POINTWISE": "constexpr", "WITH_CE": "constexpr",
        "BLOCK": "constexpr", "SEARCH_BLOCK": "constexpr", "PIVOTS": "constexpr",
    }
    constexprs = dict(HEAD_SPLIT=head_split, RADIX=search == "radix", COUNT_READS=False,
                      POINTWISE=pointwise, WITH_CE=with_ce,
                      BLOCK=settings["BLOCK"], SEARCH_BLOCK=settings["SEARCH_BLOCK"],
                      PIVOTS=settings["PIVOTS"])
    return ASTSource(_divergence_forward_kernel, signature, constexprs=constexprs)


def _backward_source(s_type, t_type, pointwise, with_ce, settings, grad_type=None):
    signature = {
        "s_ptr": f"*{s_type}", "t_ptr": f"*{t_type}", "stats_ptr": "*fp32", "coef_ptr": "*fp32",
        "grad_ptr": f"*{grad_type or s_type}", "labels_ptr": "*i64", "V": "i32", "stride_s": "i32",
        "stride_t": "i32", "inv_t": "fp32", "pointwise": "i32", "param": "fp32", "log_wp": "fp32",
        "log_wq": "fp32", "a0": "fp32", "t_scale": "fp32", "kd_scale": "fp32",
        "ce_weight": "fp32",
        "POINTWISE": "constexpr", "WITH_CE": "constexpr", "BLOCK": "constexpr",
    }
    constexprs = dict(POINTWISE=pointwise, WITH_CE=with_ce, BLOCK=settings["BLOCK"])
    return ASTSource(_divergence_grad_kernel, signature, constexprs=constexprs)


def _topk_sources(s_type, with_ce, side_blocks, grad_blocks, grad_type=None):
    """The sparse teacher's kernels (K_BLOCK fixed: ``topk.K_BLOCK``): the student sweep and
    the gradient sweep per BLOCK, the k tokens' gradient. With ``grad_type`` (the fused linear
    losses' float32 tiles, the gradient in the weight's dtype) the two gradient kernels only."""
    grad_type = grad_type or s_type
    arrow = "" if grad_type == s_type else f"->{grad_type}"
    side = {"s_ptr": f"*{s_type}", "idx_ptr": "*i64", "side_ptr": "*fp32", "V": "i32",
            "K": "i32", "stride_s": "i32", "inv_t": "fp32", "t_scale": "fp32",
            "WITH_CE": "constexpr", "BLOCK": "constexpr", "K_BLOCK": "constexpr"}
    tokens = {"s_ptr": f"*{s_type}", "idx_ptr": "*i64", "g_cat_ptr": "*fp32",
              "coef_ptr": "*fp32", "live_ptr": "*i8", "labels_ptr": "*i64",
              "grad_ptr": f"*{grad_type}", "V": "i32", "K": "i32", "stride_s": "i32",
              "WITH_CE": "constexpr", "K_BLOCK": "constexpr"}
    dense = {"s_ptr": f"*{s_type}", "coef_ptr": "*fp32", "live_ptr": "*i8",
             "labels_ptr": "*i64", "grad_ptr": f"*{grad_type}", "V": "i32", "stride_s": "i32",
             "inv_t": "fp32", "WITH_CE": "constexpr", "BLOCK": "constexpr"}
    kb = TOPK_K_BLOCK
    for block in side_blocks if not arrow else ():
        yield (f"topk_side[{s_type},ce={with_ce},BLOCK={block},K_BLOCK={kb}]",
               ASTSource(_student_side_kernel, side,
                         constexprs=dict(WITH_CE=with_ce, BLOCK=block, K_BLOCK=kb)), 4)
    yield (f"topk_tokens[{s_type}{arrow},ce={with_ce},K_BLOCK={kb}]",
           ASTSource(_token_grad_kernel, tokens, constexprs=dict(WITH_CE=with_ce, K_BLOCK=kb)),
           1)
    for block in grad_blocks:
        yield (f"topk_grad[{s_type}{arrow},ce={with_ce},BLOCK={block}]",
               ASTSource(_dense_grad_kernel, dense,
                         constexprs=dict(WITH_CE=with_ce, BLOCK=block)), 4)


def specialisations():
    """(name, ASTSource, num_warps) for every launch ``launch`` can choose, every dtype."""
    forward_launches, backward_launches = launch.launch_space()
    pairs = list(itertools.product(LOGIT_TYPES, LOGIT_TYPES))
    for with_ce, ((head, point, search), settings), (s, t) in itertools.product(
            (False, True), forward_launches, pairs):
        # The cross-entropy's code reads the student's dtype only, the radix search's the
        # teacher's only (it is not the default yet): those variants compile for s == t.
        if (with_ce or search == "radix") and s != t:
            continue
        split = f"head_split={head}" + (f",search={search}" if head else "")
        name = (f"forward[{s},{t},{split},pointwise={point},ce={with_ce},"
                f"BLOCK={settings['BLOCK']}]")
        yield (name, _forward_source(s, t, head, point, with_ce, settings, search),
               settings["num_warps"])
    for with_ce, settings, (s, t), point in itertools.product(
            (False, True), backward_launches, pairs, (False, True)):
        if with_ce and s != t:
            continue
        name = f"grad[{s},{t},pointwise={point},ce={with_ce},BLOCK={settings['BLOCK']}]"
        yield name, _backward_source(s, t, point, with_ce, settings), settings["num_warps"]
    side_blocks = sorted({launch.topk_launch(b)["BLOCK"] for b in launch.launch_blocks()})
    grad_blocks = sorted({launch.backward_launch(b)["BLOCK"] for b in launch.launch_blocks()})
    for s, with_ce in itertools.product(LOGIT_TYPES, (False, True)):
        yield from _topk_sources(s, with_ce, side_blocks, grad_blocks)
    for grad, with_ce in itertools.product(("bf16", "fp16"), (False, True)):
        yield from _topk_sources("fp32", with_ce, side_blocks, grad_blocks, grad_type=grad)
    # The fused linear losses' backward: float32 logits tiles, the gradient written in the
    # weight's dtype for the gradient GEMMs (akl_kernels/fused_linear_sweeps.py).
    for with_ce, settings, grad, point in itertools.product(
            (False, True), backward_launches, ("bf16", "fp16"), (False, True)):
        name = (f"grad[fp32,fp32->{grad},pointwise={point},ce={with_ce},"
                f"BLOCK={settings['BLOCK']}]")
        yield name, _backward_source("fp32", "fp32", point, with_ce, settings, grad), \
            settings["num_warps"]


def compile_for(source, num_warps, arch):
    return triton.compile(source, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=num_warps))


def resource_usage(compiled) -> dict:
    """Registers, stack and shared memory of a compiled kernel, read from its cubin."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                             "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        out = subprocess.run([cuobjdump, "--dump-resource-usage", cubin.name],
                             capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {k.lower(): int(v) for k, v in fields.items()}


def _compile_share(task):
    """The records of every ``workers``-th specialisation from ``worker`` on."""
    worker, workers, archs = task
    records = []
    for index, (name, source, warps) in enumerate(specialisations()):
        if index % workers != worker:
            continue
        for arch in archs:
            record = dict(kernel=name, arch=arch, num_warps=warps)
            try:
                record.update(resource_usage(compile_for(source, warps, arch)))
            except Exception as exc:  # reported, and failed by tests/test_aot_compile.py
                record["error"] = f"{type(exc).__name__}: {exc}"[-2000:]
            records.append(record)
    return records


def check_all(archs=(80, 90), workers=None):
    """Compile everything, one process per core (the compiler is single-threaded); one JSON
    line per (specialisation, arch) with its resources or error."""
    workers = workers or os.cpu_count() or 1
    tasks = [(worker, workers, archs) for worker in range(workers)]
    with multiprocessing.get_context("fork").Pool(workers) as pool:
        for records in pool.imap_unordered(_compile_share, tasks):
            for record in records:
                print(json.dumps(record), flush=True)


if __name__ == "__main__":
    if triton_interpreter_enabled():
        raise SystemExit("unset TRITON_INTERPRET: the interpreter cannot compile kernels")
    check_all()
