"""The examples run end to end in seconds-long smoke configurations: distill_tiny,
distill_offline, vocab_parallel under torchrun and trl_gkd --quick."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("matplotlib")

from examples import distill_offline, distill_tiny


def test_distill_tiny_quick(tmp_path):
    results = distill_tiny.run(quick=True, out=tmp_path)
    assert set(results) == {"teacher", *distill_tiny.STUDENTS}
    for name, metrics in results.items():
        assert all(math.isfinite(v) for v in metrics.values()), name
        assert 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["rouge_l"] <= 1.0
        assert metrics["kl"] >= 0.0 and (metrics["kl"] > 0.0) == (name != "teacher")
    assert (tmp_path / "distill_tiny.md").read_text().count("\n| ") == 6  # header + 5 models
    assert (tmp_path / "distill_tiny.png").stat().st_size > 10_000


def test_rouge_l():
    assert distill_tiny.rouge_l([1, 2, 3], [1, 2, 3]) == 1.0
    assert distill_tiny.rouge_l([1, 2, 3], [4, 5]) == 0.0
    # LCS of (1 2 3 4) and (1 3 4 5) is (1 3 4): P = R = 3/4
    assert distill_tiny.rouge_l([1, 2, 3, 4], [1, 3, 4, 5]) == pytest.approx(0.75)


def test_distill_offline_quick(tmp_path):
    pytest.importorskip("datasets")
    results = distill_offline.run(quick=True, out=tmp_path)
    plan = distill_offline.student_plan(64)
    assert set(results) == {"teacher", "untrained student", *plan}
    for name, metrics in results.items():
        assert all(math.isfinite(v) for v in metrics.values()), name
        assert 0.0 <= metrics["accuracy"] <= 1.0 and metrics["kl"] >= 0.0
        assert (metrics["seconds"] > 0.0) if name in plan else "seconds" not in metrics
    untrained = results["untrained student"]["kl"]
    for name in plan:  # even six steps at k = 4 move every student toward the teacher
        assert 0.0 < results[name]["kl"] < untrained, name
    # At k = V both tails are the dense loss: the same student as online, up to rounding (the
    # teacher's logits from batches of 8 online, of 64 in the cache).
    online = results[distill_offline.ONLINE]["kl"]
    for tail in distill_offline.TAILS:
        assert results[f"offline k=64 (V) {tail}"]["kl"] == pytest.approx(online, rel=1e-4)
    # Below V the tails differ: renormalising teaches nothing of the mass outside the k tokens,
    # which the held-out KL (over the whole vocabulary) counts.
    assert results["offline k=4 bucket"]["kl"] < results["offline k=4 renormalize"]["kl"]
    assert results[distill_offline.ONLINE]["teacher_seconds"] > 0.0
    table = (tmp_path / "distill_offline.md").read_text()
    assert table.count("\n| ") == 1 + len(results)  # header + a row per model
    assert all(f"| {name} |" in table for name in results)
    assert (tmp_path / "distill_offline.png").stat().st_size > 10_000


def test_first_k_of_the_cache_is_the_cache_written_at_k(tmp_path):
    """Cutting the k = V cache to its first k entries gives what the writer at k writes."""
    pytest.importorskip("datasets")
    sequences = distill_tiny.HiddenMarkovLanguage().sample(12, 10, seed=3)
    teacher = distill_tiny.gpt2(64, 1, 32, 2, 10, seed=0)
    full, _, _ = distill_offline.write_cache(teacher, sequences, tmp_path / "k64", 64)
    cut = distill_offline.first_k(full, 4)
    written, _, _ = distill_offline.write_cache(teacher, sequences, tmp_path / "k4", 4)
    assert cut.features == written.features
    assert cut.to_dict() == written.to_dict()


def test_vocab_parallel_example_under_torchrun_matches_one_process():
    """The README's ``torchrun --nproc-per-node 2 -m examples.vocab_parallel`` on CPU: the
    loss curve of 2 gloo ranks, each holding half of both LM heads, is one process's."""
    import subprocess
    import sys
    from pathlib import Path

    from examples import vocab_parallel

    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "examples.vocab_parallel", "--steps", "4"],
        cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
        check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "slices of [501, 500]" in done.stdout
    curve = [float(line.split()[-1]) for line in done.stdout.splitlines()
             if line.startswith("step")]
    single = vocab_parallel.run(steps=4)
    assert len(curve) == 4 and curve[-1] < curve[0]
    assert curve == pytest.approx(single, rel=1e-5)


def test_trl_gkd_example_quick(tmp_path):
    """examples/trl_gkd.py --quick: every trainer case runs in its own process and reports a
    step time, a peak and a loss; the library's JSD is the stock trainer's, step by step."""
    pytest.importorskip("trl")
    import json

    from examples import trl_gkd

    assert trl_gkd.main(["--quick", "--out", str(tmp_path)]) == 0
    records = {r["case"]: r for r in json.loads((tmp_path / "trl_gkd.json").read_text())
               ["records"]}
    assert set(records) == set(trl_gkd.CASES)
    for name in ("jsd", "jsd-fused"):
        assert records[name]["last_loss"] == pytest.approx(records["stock"]["last_loss"],
                                                           rel=1e-4)
    assert all(r["step_ms"] > 0 and r["peak_mib"] > 0 for r in records.values())
    assert "| akl-fused |" in (tmp_path / "trl_gkd.md").read_text()
