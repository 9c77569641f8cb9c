"""Where a run's wall time goes: stage computation against orchestration.

Every stage computation (and every curve run, in whichever worker process it ran) appends
one line to `.tlpipe/timings/<run id>.jsonl`; `tlpipe run` sets the run id, then sums the
lines against the flow's wall time and writes `.tlpipe/runs/<run id>.json`.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

RUN_ID = "TLPIPE_RUN_ID"
ROOT = Path(".tlpipe")


@contextlib.contextmanager
def clocked(name: str, root: Path = ROOT) -> Iterator[None]:
    """Time the block and append it to the current run's timings (no-op outside a run)."""
    run_id = os.environ.get(RUN_ID)
    start = time.time()
    try:
        yield
    finally:
        if run_id:
            path = root / "timings" / f"{run_id}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            line = json.dumps({"name": name, "start": start, "end": time.time()}) + "\n"
            with path.open("a") as f:  # one short O_APPEND write: safe across processes
                f.write(line)


def summarise(run_id: str, wall_seconds: float, root: Path = ROOT) -> dict[str, Any]:
    """The run's stage computations and its orchestration overhead (the wall time when no
    computation ran).

    Curve runs overlap on the worker pool, so the curve counts by its span (first start to
    last end); every other computation counts by its own duration. A computation that ran
    beside another (export beside the curve) is not counted twice in `computed_seconds`.
    """
    path = root / "timings" / f"{run_id}.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    stages: dict[str, float] = {}
    curve = [rec for rec in lines if rec["name"].startswith("curve-")]
    spans = [(rec["start"], rec["end"]) for rec in lines if not rec["name"].startswith("curve-")]
    for rec in lines:
        if not rec["name"].startswith("curve-"):
            stages[rec["name"]] = stages.get(rec["name"], 0.0) + rec["end"] - rec["start"]
    if curve:
        span = (min(r["start"] for r in curve), max(r["end"] for r in curve))
        stages["curve"] = span[1] - span[0]
        spans.append(span)
    computed = _covered(spans)
    summary = {
        "run_id": run_id,
        "wall_seconds": wall_seconds,
        "stage_seconds": stages,
        "curve_runs": len(curve),
        "computed_seconds": computed,
        "overhead_seconds": wall_seconds - computed,
        "overhead_fraction": (wall_seconds - computed) / wall_seconds if wall_seconds else 0.0,
    }
    out = root / "runs" / f"{run_id}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def _covered(spans: list[tuple[float, float]]) -> float:
    """The length of the union of the (start, end) intervals."""
    total, reach = 0.0, -float("inf")
    for start, end in sorted(spans):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total
