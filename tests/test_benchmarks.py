"""The benchmark suite runs here and compares like with like (no timing is asserted)."""

import itertools
import json
import os
import statistics
import subprocess
import sys

import pytest

from benchmarks import cli
from benchmarks.implementations import IMPLEMENTATIONS
from benchmarks.measure import Case


def _run(args, **env):
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                          env=os.environ | env, check=False, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def test_cli_measures_every_implementation_on_the_same_inputs(tmp_path):
    # The flat teacher only (the peaked one changes the inputs, not the tooling: the plan's
    # tests cover which losses it adds); every case is a fresh process, so each one counts.
    _run(["-m", "benchmarks", "--device", "cpu", "--n", "24", "--vocab", "1003", "--repeats",
          "1", "--impls", "torch", "official", "official+compile", "kl_div", "--compile-losses",
          "akl", "--teachers", "flat", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "bench_cpu.json").read_text())
    records = result["records"]
    assert result["meta"]["device_name"].startswith("CPU") and result["meta"]["torch"]
    # 2 dtypes x (torch 3 + official 3 + compiled akl 1 + kl_div fkl 1)
    assert len(records) == 2 * 8 and not result["skipped"]
    for r in records:
        assert "error" not in r, r
        assert r["forward_ms"] > 0 and r["forward_backward_ms"] > 0 and r["peak_extra_bytes"] >= 0
        same = [o for o in records if cli._same_inputs(o, r)]
        official = next(o for o in same if o["impl"] == "official")
        # Every implementation computes the same quantity: the benchmark compares like with like.
        # (kl_div returns a bf16 loss for bf16 inputs: 8 bits of mantissa.)
        tol = 1e-2 if r["dtype"] == "bfloat16" else 1e-4
        assert abs(r["loss"] - official["loss"]) <= tol * abs(official["loss"]), (r, official)
        assert r["speedup_vs_official"] > 0 and r["memory_vs_official"] >= 0
    table = (tmp_path / "bench_cpu.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| 24 | 1003 |")]
    assert len(rows) == len(records)  # one table row per case
    assert "## Summary" in table
    assert "## Parity" in table
    for dtype in ("bfloat16", "float32"):
        assert (tmp_path / f"bench_cpu_{dtype}.png").stat().st_size > 10_000
    # --resume keeps what an earlier run measured: nothing is left to measure here.
    (tmp_path / "earlier.json").write_text((tmp_path / "bench_cpu.json").read_text())
    _run(["-m", "benchmarks", "--device", "cpu", "--n", "24", "--vocab", "1003",
          "--impls", "torch", "official", "official+compile", "kl_div", "--compile-losses",
          "akl", "--teachers", "flat", "--no-parity", "--resume", str(tmp_path / "earlier.json"),
          "--out", str(tmp_path)])
    resumed = json.loads((tmp_path / "bench_cpu.json").read_text())
    assert resumed["meta"]["resumed"]["cases_kept"] == len(records)
    assert [r["forward_ms"] for r in resumed["records"]] == [r["forward_ms"] for r in records]


def test_rounds_pair_the_ratios_round_by_round(tmp_path):
    """--rounds 3: each case measured three times (fresh processes), the cases of the same
    inputs back to back; the record's times are the medians of its rounds', and the ratios
    the medians of the per-round ratios."""
    _run(["-m", "benchmarks", "--device", "cpu", "--n", "24", "--vocab", "1003", "--repeats",
          "1", "--rounds", "3", "--impls", "torch", "official", "kl_div", "--losses", "fkl",
          "--dtypes", "float32", "--teachers", "flat", "--no-parity", "--no-plot", "--out",
          str(tmp_path)])
    result = json.loads((tmp_path / "bench_cpu.json").read_text())
    by_impl = {r["impl"]: r for r in result["records"]}
    assert sorted(by_impl) == ["kl_div", "official", "torch"]
    for r in by_impl.values():
        assert r["rounds"] == 3 and len(r["forward_backward_ms_rounds"]) == 3
        assert r["forward_backward_ms"] == statistics.median(r["forward_backward_ms_rounds"])
    mine, official = by_impl["torch"], by_impl["official"]
    assert mine["speedup_vs_official"] == pytest.approx(statistics.median(
        o / m for o, m in zip(official["forward_backward_ms_rounds"],
                              mine["forward_backward_ms_rounds"], strict=True)))
    assert "in 3 rounds" in (tmp_path / "bench_cpu.md").read_text()


def test_time_ratio_is_the_median_of_the_rounds_ratios():
    drifting = {"forward_backward_ms": 20.0, "forward_backward_ms_rounds": [10.0, 20.0, 40.0]}
    other = {"forward_backward_ms": 30.0, "forward_backward_ms_rounds": [20.0, 40.0, 30.0]}
    assert cli.time_ratio(drifting, other) == pytest.approx(0.5)  # not 20 / 30
    assert cli.time_ratio({"forward_backward_ms": 2.0}, other) == pytest.approx(2.0 / 30.0)
    runs = [dict(vars(Case("torch", "fkl", 8, 100, "float32", "flat", "cpu")), round=r,
                 forward_ms=f, forward_backward_ms=2 * f, peak_extra_bytes=p)
            for r, (f, p) in enumerate([(3.0, 10), (1.0, 30), (2.0, 20)])]
    (combined,) = cli.combine_rounds(runs)
    assert combined["forward_ms"] == 2.0 and combined["forward_backward_ms"] == 4.0
    assert combined["forward_ms_rounds"] == [3.0, 1.0, 2.0]
    assert combined["peak_extra_bytes"] == 30 and "round" not in combined
    failed = cli.combine_rounds([runs[0], dict(runs[1], error="boom")])
    assert [r.get("error") for r in failed] == ["boom"]


def test_quick_mode_is_the_small_grid(tmp_path):
    args = cli.parse_args(["--device", "cpu", "--quick", "--out", str(tmp_path)])
    cases, skipped = cli.plan(args, "cpu")
    assert {c.impl for c in cases} == {"torch", "official", "kl_div"}
    assert {(c.n, c.vocab) for c in cases} == {(256, 32000)} and not skipped  # none asked


def test_the_report_leaves_the_checkout_clean_unless_asked():
    # The default output folder is one git ignores; committed results need an explicit --out.
    args = cli.parse_args(["--device", "cpu"])
    assert args.out == cli.Path("benchmarks/results/local/cpu")
    ignored = subprocess.run(["git", "check-ignore", "-q", str(args.out / "bench_cpu.md")],
                             cwd=cli.Path(__file__).resolve().parents[1], check=False)
    assert ignored.returncode == 0


def test_a_missing_plotting_library_is_said_before_any_case_runs(monkeypatch, tmp_path):
    real_find_spec = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec",
                        lambda name: None if name == "matplotlib" else real_find_spec(name))
    monkeypatch.setattr(cli, "plan", lambda *a: pytest.fail("cases were planned"))
    with pytest.raises(SystemExit, match="matplotlib"):
        cli.main(["--device", "cpu", "--quick", "--out", str(tmp_path)])


def test_plan_shrinks_rows_to_fit_and_times_the_library_on_them(monkeypatch):
    args = cli.parse_args(["--device", "cpu", "--n", "4096", "--vocab", "128256", "--dtypes",
                           "float32", "--teachers", "flat", "--losses", "akl"])
    monkeypatch.setattr(cli, "free_memory_bytes", lambda device: 16 * 2**30)
    cases, skipped = cli.plan(args, "cpu")
    official = [c for c in cases if c.impl == "official"]
    assert [c.n for c in official] == [1024]  # 48 B/element + inputs: 4096 and 2048 rows do not fit
    library = {c.n for c in cases if c.impl == "torch"}
    assert library == {4096, 1024}
    assert {s["impl"] for s in skipped} == {"triton", "liger_jsd", "liger_kldiv"}  # CUDA only


def test_rows_that_fit_halves_until_it_fits():
    per_row = 1000 * (2 * 4 + IMPLEMENTATIONS["official"].bytes_per_element(4))
    assert cli.rows_that_fit("official", 64, 1000, "float32", 64 * per_row / 0.8) == 64
    assert cli.rows_that_fit("official", 64, 1000, "float32", 63 * per_row / 0.8) == 32
    assert cli.rows_that_fit("official", 64, 1000, "float32", 0) == 0


def test_a_failing_case_is_reported_not_hidden(monkeypatch):
    from benchmarks import measure

    case = Case("no-such-impl", "akl", 4, 100, "float32", "flat", "cpu")
    record = measure.measure(case, repeats=1)
    assert "error" in record and "no-such-impl" in record["error"]


@pytest.mark.parametrize("selection", ["not compile"])
def test_pytest_benchmark_suite_runs(selection):
    out = _run(["-m", "pytest", "benchmarks/", "--benchmark-disable", "-q", "-p",
                "no:cacheprovider", "-k", selection], AKL_BENCH_SHAPES="8x500")
    assert " passed" in out and "failed" not in out


def test_fused_linear_benchmark_runs_and_agrees(tmp_path):
    """benchmarks.fused_linear on a tiny shape: fused and unfused in fresh processes, with the
    same loss value and a table."""
    import json

    from benchmarks import fused_linear as bench

    rc = bench.main(["--shape", "64", "16", "300", "--impls", "fused", "unfused",
                     "--kinds", "akl", "--repeats", "1", "--out", str(tmp_path)])
    assert rc == 0
    records = json.loads((tmp_path / "fused_linear.json").read_text())["records"]
    assert [r["impl"] for r in records] == ["fused", "unfused"]
    assert abs(records[0]["loss"] - records[1]["loss"]) <= 1e-4 * abs(records[1]["loss"])
    assert all(r["peak_extra_bytes"] > 0 and r["forward_backward_ms"] > 0 for r in records)
    assert "| akl | fused |" in (tmp_path / "fused_linear.md").read_text()


def test_the_peaked_teacher_times_only_the_losses_that_depend_on_it():
    args = cli.parse_args(["--device", "cpu", "--n", "24", "--vocab", "1003", "--impls", "torch",
                           "official"])
    cases, _ = cli.plan(args, "cpu")
    assert {c.kind for c in cases if c.teacher == "peaked"} == {"akl"}
    assert {c.kind for c in cases if c.teacher == "flat"} == {"fkl", "rkl", "akl"}


def test_the_head_search_benchmark_times_both_searches_and_counts_their_reads(tmp_path):
    from benchmarks import head_search

    records = head_search.main(["--device", "cpu", "--n", "2", "--vocab", "300", "--dtypes",
                                "bfloat16", "float32", "--teachers", "flat", "--out",
                                str(tmp_path)])
    assert [r["dtype"] for r in records] == ["bfloat16", "float32"]
    for r, passes in zip(records, (2, 3), strict=True):
        assert r["radix_reads_max"] == r["radix_reads_mean"] == 1 + passes + 1
        assert r["pivot_reads_max"] >= 3
        assert r["akl_pivot_ms"] > 0 and r["akl_radix_ms"] > 0 and r["fkl_ms"] > 0
    assert "AKL radix" in (tmp_path / "head_search.md").read_text()


def test_sparse_teacher_benchmark_runs_and_agrees(tmp_path):
    """benchmarks.sparse_teacher on a tiny shape: the library and the plain PyTorch FKL in fresh
    processes compute the same loss, and the report says what each costs."""
    from benchmarks import sparse_teacher as bench

    assert bench.main(["--device", "cpu", "--shape", "32", "500", "8", "--repeats", "1",
                       "--out", str(tmp_path)]) == 0
    records = json.loads((tmp_path / "sparse_teacher.json").read_text())["records"]
    by_impl = {(r["impl"], r["kind"]): r for r in records}
    assert set(by_impl) == {("torch", "fkl"), ("plain", "fkl"), ("torch", "akl")}
    assert by_impl["torch", "fkl"]["loss"] == pytest.approx(by_impl["plain", "fkl"]["loss"],
                                                            rel=1e-5)
    assert all(r["forward_backward_ms"] > 0 and r["peak_extra_bytes"] >= 0 for r in records)
    assert "| fkl | plain |" in (tmp_path / "sparse_teacher.md").read_text()


def test_vocab_parallel_benchmark_counts_the_documented_rounds(tmp_path):
    """benchmarks.vocab_parallel on a tiny shape: 2 gloo ranks, the rounds of each call
    recorded (3 for FKL; AKL 7 with a float32 teacher, 6 with bf16; none in backward) and the
    wall time beside one process's."""
    from benchmarks import vocab_parallel as bench

    assert bench.main(["--n", "8", "--vocab", "300", "--ranks", "2", "--repeats", "1",
                       "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "vocab_parallel.json").read_text())
    rounds = {key: len(entry["forward"]) for key, entry in record["ranks"]["2"].items()}
    assert rounds == {"fkl-float32": 3, "akl-float32": 7, "fkl-bfloat16": 3,
                      "akl-bfloat16": 6}
    assert all(not entry["backward"] for entry in record["ranks"]["2"].values())
    assert record["single_process_ms"]["akl"] > 0
    assert record["ranks"]["2"]["akl-float32"]["ms"] > 0
    assert "| akl | float32 | 2 | 7 | 0 |" in (tmp_path / "vocab_parallel.md").read_text()


def test_vocab_parallel_benchmark_slices_cover_the_vocabulary_evenly():
    from benchmarks.vocab_parallel import slice_bounds

    for world in range(1, 6):
        for vocab in range(world, 40):
            bounds = [slice_bounds(vocab, world, rank) for rank in range(world)]
            assert bounds[0][0] == 0 and bounds[-1][1] == vocab
            assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds))
            widths = [hi - lo for lo, hi in bounds]
            assert min(widths) >= 1 and max(widths) - min(widths) <= 1, (vocab, world, widths)
