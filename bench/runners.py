"""evaluate's curve on each task runner: the process pool against a local Dask cluster.

The run's folder is the workspace of these params (`tlpipe run --set ...` would use it),
made once and brought up to date by an untimed run. Each turn deletes its
outputs/evaluate/ and runs `tlpipe run --runner R` in it, so the earlier stages are up to
date and the curve is what runs; the turns go process, dask, then dask, process, and so on
(`bench.common.in_turns`). The run's record (.tlpipe/runs/<run id>.json) gives the curve's
span (the first run's start to the last run's end, on whichever workers) and the command's
wall time (the Dask cluster's start included). Every turn's records must equal the first's,
less their training seconds.

    python -m bench.runners [--rounds 2] [--set KEY=VALUE ...]

The default `--set` values make a curve of 14 runs (2 sizes, 2 seeds, both arms and the
reference, 2 tuning runs); with none the params file's own curve runs as it is.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from bench.common import in_turns, record, run_measured, stat
from flows.runners import RUNNERS
from tlpipe.curve import curve_workers
from tlpipe.timing import ROOT
from tlpipe.workspace import parse_override, workspace

# A short curve: both arms and the reference at two sizes and two seeds; the control's
# grid cut to two cells.
SHORT = [
    "evaluate.sizes=[50, 200]",
    "evaluate.seeds=[0, 1]",
    "evaluate.gate_size=200",
    "evaluate.tune_size=200",
    "evaluate.scratch_lrs=[5.0e-04, 1.0e-03]",
    "evaluate.scratch_models=[{hidden_size: 128, num_layers: 2, num_heads: 2, intermediate_size: 512}]",
]


def run_ids() -> set[str]:
    return {p.stem for p in (ROOT / "runs").glob("*.json")}


def records(root: Path) -> dict[str, dict[str, Any]]:
    """The curve's run records, less the seconds each trained."""
    return {
        path.stem: {k: v for k, v in json.loads(path.read_text()).items() if k != "train_seconds"}
        for path in sorted((root / "outputs/evaluate/runs").glob("*.json"))
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--set", dest="set_", action="append", default=None, help="KEY=VALUE")
    args = parser.parse_args()
    sets = SHORT if args.set_ is None else args.set_
    overrides = dict(parse_override(text) for text in sets)
    project = Path.cwd()
    # A run in the workspace's own folder takes its params.yaml as it is: outputs deleted
    # there stay deleted (a run given the overrides would check them out of the cache).
    with workspace(project, None, overrides) as root:
        pass
    tlpipe = [sys.executable, "-m", "tlpipe.cli", "run"]
    run_measured(tlpipe, cwd=root)
    curve: dict[str, list[float]] = {name: [] for name in RUNNERS}
    wall: dict[str, list[float]] = {name: [] for name in RUNNERS}
    first: dict[str, dict[str, Any]] | None = None
    runs = 0
    for _, runner in in_turns(RUNNERS, args.rounds):
        shutil.rmtree(root / "outputs/evaluate", ignore_errors=True)
        before = run_ids()
        seconds, _, _ = run_measured([*tlpipe, "--runner", runner], cwd=root)
        (new,) = run_ids() - before
        summary = json.loads((ROOT / "runs" / f"{new}.json").read_text())
        if "curve" not in summary["stage_seconds"]:
            raise SystemExit(f"bench.runners: run {new} ran no curve: {summary['stage_seconds']}")
        curve[runner].append(summary["stage_seconds"]["curve"])
        wall[runner].append(seconds)
        runs = summary["curve_runs"]
        found = records(root)
        if first is None:
            first = found
        elif found != first:
            differ = sorted(k for k in first.keys() | found.keys() if first.get(k) != found.get(k))
            raise SystemExit(f"bench.runners: {runner}'s records differ from the first turn's: {differ}")
        print(f"{runner}: curve {curve[runner][-1]:.1f} s, command {seconds:.1f} s", flush=True)
    stats = {
        name: {"curve_seconds": stat(curve[name], "s"), "command_seconds": stat(wall[name], "s")}
        for name in RUNNERS
    }
    record(
        "runners",
        {
            "overrides": sets,
            "curve_runs": runs,
            "workers": curve_workers(),
            "runners": stats,
            "dask_vs_process": {
                key: stats["dask"][key]["median"] / stats["process"][key]["median"]
                for key in ("curve_seconds", "command_seconds")
            },
            "same_records": True,
        },
    )


if __name__ == "__main__":
    main()
