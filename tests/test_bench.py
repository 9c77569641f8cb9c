"""docs/benchmarks.md is exactly what bench/report.py renders from bench/results.json."""

from __future__ import annotations

import json

from bench.report import render
from tests.conftest import REPO


def test_benchmarks_page_matches_results() -> None:
    results = json.loads((REPO / "bench/results.json").read_text())
    assert (REPO / "docs/benchmarks.md").read_text() == render(results)
