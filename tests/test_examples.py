"""The examples run end to end (a seconds-long smoke configuration of distill_tiny)."""

from __future__ import annotations

import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
pytest.importorskip("matplotlib")

from examples import distill_tiny


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
