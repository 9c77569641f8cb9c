"""The pipeline's own cost: a no-op re-run, and a full run's orchestration overhead.

No-op: with every stage up to date, `tlpipe run` is timed end to end, process start
included: it finds nothing stale and starts no flow. `tlpipe run --always` starts the
Prefect flow anyway (its ephemeral API server included), each stage checked with DVC and
skipped. Overhead: each `tlpipe run` records its wall time and the time spent inside stage
computations (.tlpipe/runs/); the latest run that computed every stage, the curve
included, is reported.

    python -m bench.pipeline [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

from bench.common import record, stat
from tlpipe.params import STAGES
from tlpipe.stages import stale_stages
from tlpipe.timing import ROOT

TLPIPE = [sys.executable, "-m", "tlpipe.cli", "run"]


def runs() -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in sorted((ROOT / "runs").glob("*.json"))]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    stale = stale_stages()
    if stale:
        raise SystemExit(f"bench.pipeline: stages are stale ({', '.join(stale)}); run `make run` first")
    noop = []
    for _ in range(args.reps):
        start = time.perf_counter()
        proc = subprocess.run(TLPIPE, capture_output=True, text=True)
        noop.append(time.perf_counter() - start)
        if proc.returncode or "every stage is up to date" not in proc.stdout:
            raise SystemExit(
                f"bench.pipeline: the no-op run did not skip: {proc.stdout[-500:]} {proc.stderr[-2000:]}"
            )
        print(f"no-op run: {noop[-1]:.1f} s", flush=True)
    walls, flows = [], []
    for _ in range(args.reps):
        before = {r["run_id"] for r in runs()}
        start = time.perf_counter()
        proc = subprocess.run([*TLPIPE, "--always"], capture_output=True, text=True)
        walls.append(time.perf_counter() - start)
        if proc.returncode:
            raise SystemExit(f"bench.pipeline: tlpipe run --always failed: {proc.stderr[-2000:]}")
        (new,) = [r for r in runs() if r["run_id"] not in before]
        ran = set(new["stage_seconds"]) & set(STAGES)
        if ran:
            raise SystemExit(f"bench.pipeline: a no-op run computed {sorted(ran)}")
        flows.append(new["wall_seconds"])
        print(f"no-op flow run: {walls[-1]:.1f} s", flush=True)
    full = [r for r in runs() if set(STAGES) <= set(r["stage_seconds"]) and r["curve_runs"]]
    record(
        "pipeline",
        {
            "noop_run_seconds": stat(noop, "s"),
            "noop_flow_command_seconds": stat(walls, "s"),
            "noop_flow_seconds": stat(flows, "s"),
            "full_run": full[-1] if full else None,
        },
    )


if __name__ == "__main__":
    main()
