"""Run timings: stage computations logged from any process, summed against wall time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tlpipe.timing import RUN_ID, clocked, summarise


def _lines(root: Path, run_id: str) -> list[dict]:
    return [json.loads(line) for line in (root / "timings" / f"{run_id}.jsonl").read_text().splitlines()]


def test_clocked_logs_only_inside_a_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(RUN_ID, raising=False)
    with clocked("prepare", root=tmp_path):
        pass
    assert not (tmp_path / "timings").exists()
    monkeypatch.setenv(RUN_ID, "r1")
    with pytest.raises(ValueError), clocked("finetune", root=tmp_path):
        raise ValueError("a failing stage is timed too")
    (rec,) = _lines(tmp_path, "r1")
    assert rec["name"] == "finetune" and rec["end"] >= rec["start"]


def test_summary_counts_the_curve_by_its_span(tmp_path: Path) -> None:
    (tmp_path / "timings").mkdir()
    recs = [
        {"name": "prepare", "start": 0.0, "end": 2.0},
        {"name": "curve-transfer-50-seed0", "start": 10.0, "end": 30.0},
        {"name": "curve-scratch-50-seed0", "start": 11.0, "end": 25.0},  # in parallel
        {"name": "curve-transfer-100-seed0", "start": 31.0, "end": 40.0},
        {"name": "evaluate", "start": 41.0, "end": 44.0},
    ]
    (tmp_path / "timings" / "r2.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    s = summarise("r2", wall_seconds=50.0, root=tmp_path)
    assert s["stage_seconds"] == {"prepare": 2.0, "evaluate": 3.0, "curve": 30.0}
    assert s["curve_runs"] == 3
    assert s["overhead_seconds"] == pytest.approx(15.0)
    assert s["overhead_fraction"] == pytest.approx(0.3)
    assert json.loads((tmp_path / "runs" / "r2.json").read_text()) == s


def test_a_stage_beside_the_curve_is_not_counted_twice(tmp_path: Path) -> None:
    (tmp_path / "timings").mkdir()
    recs = [
        {"name": "finetune", "start": 0.0, "end": 5.0},
        {"name": "export", "start": 6.0, "end": 16.0},  # on the pool, beside the curve
        {"name": "curve-transfer-50-seed0", "start": 6.0, "end": 30.0},
        {"name": "curve-scratch-50-seed0", "start": 16.0, "end": 40.0},
        {"name": "evaluate", "start": 41.0, "end": 44.0},
    ]
    (tmp_path / "timings" / "r3.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    s = summarise("r3", wall_seconds=50.0, root=tmp_path)
    assert s["stage_seconds"] == {"finetune": 5.0, "export": 10.0, "evaluate": 3.0, "curve": 34.0}
    assert s["computed_seconds"] == pytest.approx(5.0 + 34.0 + 3.0)
    assert s["overhead_seconds"] == pytest.approx(8.0)
