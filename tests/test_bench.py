"""docs/benchmarks.md is exactly what bench/report.py renders from bench/results.json; the
benchmarks take turns in alternating order."""

from __future__ import annotations

import json

from bench.report import render
from tests.conftest import REPO


def test_benchmarks_page_matches_results() -> None:
    results = json.loads((REPO / "bench/results.json").read_text())
    assert (REPO / "docs/benchmarks.md").read_text() == render(results)


def test_in_turns_reverses_the_order_each_round() -> None:
    from bench.common import in_turns

    assert list(in_turns(["a", "b", "c"], 3)) == [
        (0, "a"), (0, "b"), (0, "c"), (1, "c"), (1, "b"), (1, "a"), (2, "a"), (2, "b"), (2, "c"),
    ]  # fmt: skip
