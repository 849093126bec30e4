"""Vocabulary-parallel losses (docs/contract.md §7) on 2 and 3 gloo ranks, and data parallelism
(DDP, FSDP2) on 2: each spawn runs every case once (tests/vocab_parallel_worker.py) and the
tests below check what each rank measured against the single-process loss on the whole rows."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from akl_kernels.config import DIVERGENCES
from akl_kernels.radix_split import search_passes
from tests import vocab_parallel_worker as worker

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

WORLDS = (2, 3)
TOLERANCE = 1e-5  # float32, relative (docs/contract.md §7)


@pytest.fixture(scope="module")
def ranks():
    """{world size: every rank's results}; the processes start once per world size."""
    return {world: worker.spawn(world, "cases") for world in WORLDS}


@pytest.fixture(scope="module")
def data_parallel():
    return worker.spawn(2, "data_parallel")


@pytest.fixture(scope="module")
def compiled():
    return worker.spawn(2, "compiled")


@pytest.mark.parametrize("case", ["compiled-fkl", "compiled-akl", "compiled-fused-akl"])
def test_a_group_inside_torch_compile_is_one_graph_matching_one_process(compiled, case):
    for result in (ranks[case] for ranks in compiled):
        assert max(result.values()) < TOLERANCE, result


def test_a_failing_rank_is_reported_with_its_stderr():
    # What a crash in CI shows: pytest's capture of a spawned child is not in the error.
    with pytest.raises(RuntimeError, match=r"--- rank 1 stderr ---[\s\S]*ValueError: rank 1 fails"):
        worker.spawn(2, "fails_on_the_last_rank")


def test_a_rank_killed_by_a_signal_is_started_again_once(tmp_path, monkeypatch):
    monkeypatch.setenv("AKL_ABORT_MARKER", str(tmp_path / "aborted"))
    with pytest.warns(UserWarning, match="SIGABRT; starting it again"):
        results = worker.spawn(2, "aborts_once")
    assert [r["attempt"] for r in results] == ["second", "second"]


def _every_rank(ranks, world, case):
    return [results[case] for results in ranks[world]]


LOSS_CASES = [
    *DIVERGENCES, *(f"{d}-T2" for d in DIVERGENCES),
    "akl-sum", "akl-none", "rkl-sum", "rkl-none", "akl-ignore7", "akl-crossing", "akl-mu0.2",
    "akl-mu1", "akl-mu0.9-crossing", "akl-bf16-teacher", "akl-all-ignored",
    "fkl-nan-in-an-ignored-row", "akl-nan-in-an-ignored-row", "jsd-nan-in-an-ignored-row",
    "tvd-nan-in-an-ignored-row", "akl-inf-in-a-scored-row", "akl-a-slice-all-neg-inf",
    "distillation-0.0", "distillation-0.5", "distillation-1.0", "distillation-jsd-T2",
    "distillation-parts", "module-distillation", "triton-fkl", "triton-akl", "triton-distillation",
]


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", LOSS_CASES)
def test_the_loss_and_each_slice_of_the_gradient_match_one_process(ranks, world, case):
    for rank, result in enumerate(_every_rank(ranks, world, case)):
        assert result["loss"] <= TOLERANCE, (rank, result)
        assert result["grad"] <= TOLERANCE, (rank, result)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", ["akl-bf16", "fkl-bf16"])
def test_bf16_logits_match_one_process(ranks, world, case):
    # The loss is float32 either way; the gradient is rounded to bf16 (an ulp is 2**-8).
    for result in _every_rank(ranks, world, case):
        assert result["loss"] <= TOLERANCE
        assert result["grad"] <= 1e-2


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", ["heads", "heads-crossing", "heads-bf16"])
def test_akl_heads_are_the_single_process_heads(ranks, world, case):
    for result in _every_rank(ranks, world, case):
        assert result["counts_equal"], result
        assert result["weights"] <= TOLERANCE and result["mass"] <= TOLERANCE


@pytest.mark.parametrize("world", WORLDS)
def test_ties_straddling_a_slice_boundary_follow_the_global_index(ranks, world):
    # 8 equal logits hold nearly all the mass, 2 left of a boundary and 6 right of it (rows
    # [0, :3] of 2 ranks' first boundary, [1, :3] of 3 ranks'): mu = 0.5 takes the first 4 by
    # global index (include_crossing the 5th), as one process. Row [1, 3]'s 345 tied tokens
    # span 3 ranks' middle slice whole: half of them are head.
    for result in _every_rank(ranks, world, "heads"):
        assert result["tied_rows_head"] == [[4, 4, 4], [4, 4, 4]]
        assert result["wide_tie_head"] == 172
    for result in _every_rank(ranks, world, "heads-crossing"):
        assert result["tied_rows_head"] == [[5, 5, 5], [5, 5, 5]]
        assert result["wide_tie_head"] == 173


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", ["fkl", "akl", "distillation", "akl-chunked",
                                  "akl-recompute", "distillation-recompute",
                                  "akl-teacher-logits"])
def test_fused_linear_over_column_parallel_heads(ranks, world, case):
    for result in _every_rank(ranks, world, f"fused-{case}"):
        assert result["loss"] <= TOLERANCE, result
        assert result["grad_weight"] <= TOLERANCE and result["grad_bias"] <= TOLERANCE
        # The partial sums, all-reduced as the column-parallel layer does, are the gradient.
        assert result["grad_hidden"] <= TOLERANCE
        # One round of the slice widths, then the rounds of each forward row chunk; none in
        # backward (either strategy).
        assert result["backward_rounds"] == 0
        assert result["forward_rounds"] >= 4


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case", ["fkl", "akl", "distillation", "akl-replicated"])
def test_dtensor_logits_take_the_same_path(ranks, world, case):
    for result in _every_rank(ranks, world, f"dtensor-{case}"):
        assert result["loss"] <= TOLERANCE and result["grad"] <= TOLERANCE
        expected = "Replicate()" if case.endswith("replicated") else "Shard(dim=2)"
        assert expected in result["grad_placements"]


@pytest.mark.parametrize("case,kind,words", [
    ("topk-with-group", "ValueError", "TopKTeacher takes no process_group"),
    ("fused-topk-with-group", "ValueError", "TopKTeacher takes no process_group"),
    ("dtensor-and-group", "ValueError", "process_group must be None"),
    ("dtensor-and-tensor", "TypeError", "both be DTensors"),
    ("dtensor-placements-differ", "ValueError", "teacher_logits must be placed"),
    ("dtensor-sharded-rows", "ValueError", "student_logits as a DTensor must be sharded on"),
])
def test_bad_group_inputs_are_refused_by_name(ranks, case, kind, words):
    for result in _every_rank(ranks, 2, f"error-{case}"):
        assert result is not None and result[0] == kind and words in result[1], result
        assert result[2] == 0  # refused before any collective


def test_a_process_group_of_the_wrong_type_is_refused():
    import akl_kernels as ak

    s, t = torch.randn(3, 10), torch.randn(3, 10)
    with pytest.raises(TypeError, match=r"process_group must be a torch\.distributed"):
        ak.akl_loss(s, t, process_group="world")
    with pytest.raises(TypeError, match="process_group"):
        ak.AKLLoss(process_group=0)


def _documented_rounds(case, teacher_dtype):
    """docs/vocab_parallel.md: 3 rounds, and for AKL with mu < 1 one per search pass and the
    tie round."""
    akl = case in ("akl", "akl-bf16", "distillation")
    return 3 + (search_passes(teacher_dtype) + 1 if akl else 0)


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("case,teacher_dtype", [
    ("fkl", torch.float32), ("jsd", torch.float32), ("akl", torch.float32),
    ("akl-bf16", torch.bfloat16), ("akl-mu1", torch.float32),
    ("distillation", torch.float32)])
def test_collectives_per_call_are_the_documented_rounds(ranks, world, case, teacher_dtype):
    for result in _every_rank(ranks, world, f"collectives-{case}"):
        calls, n = result["forward"], result["rows"]
        assert len(calls) == _documented_rounds(case, teacher_dtype)
        assert result["backward"] == 0
        # Round 1: the maxima of both models and the slice widths; then only sums.
        assert calls[0][:2] == ("max", 2 * n + world)
        assert all(op == "sum" for op, *_ in calls[1:])
        assert calls[-1][1] == n * 15  # the row sums (chunked.N_SUMS columns)
        histograms = calls[2:-2]
        if histograms:  # one [N, 2**width] per digit of the key, then the [N, P] tie counts
            assert [c[1] for c in histograms] == [n * 2**11, n * 2**11, n * 2**10] or \
                [c[1] for c in histograms] == [n * 2**8, n * 2**8]
            assert calls[-2][1] == n * world
        assert max(c[1] for c in calls) <= n * 2**11 + world  # O(N x bins): never N x V


@pytest.mark.parametrize("wrapper", ["ddp", "fsdp2"])
@pytest.mark.parametrize("counts", ["equal", "unequal"])
def test_data_parallel_training_matches_one_process(data_parallel, wrapper, counts):
    """5 AKL steps of a tiny GPT-2 on 2 ranks against one process on the global batch: a
    mean per rank with equal valid counts, the sum over the all-reduced count otherwise."""
    for result in data_parallel:
        got = result[f"{wrapper}-{counts}"]
        single, parallel = torch.tensor(got["single"]), torch.tensor(got["parallel"])
        assert single[-1] < single[0]  # it trains
        assert torch.allclose(parallel, single, rtol=TOLERANCE, atol=0), (single, parallel)
    valid = [result[f"{wrapper}-{counts}"]["valid_here"] for result in data_parallel]
    assert (valid[0] == valid[1]) == (counts == "equal")


def test_a_mean_per_rank_with_unequal_counts_is_not_the_global_mean(data_parallel):
    # The rule above is needed: averaging per-rank means weighs rank 0's fewer tokens more.
    got = data_parallel[0]["ddp-unequal-mean-per-rank"]
    single, parallel = torch.tensor(got["single"]), torch.tensor(got["parallel"])
    assert ((parallel - single).abs() / single).max() > 1e-3
