"""Data validation throughput on a 1M-row file, and memory against file size.

The raw file is the bundled corpus resampled (seeded, with replacement) to N rows, each
text made unique with a row number so de-duplication keeps them all. Each repetition is a
fresh process running the prepare stage (read, de-duplicate, split) and then the validate
stage (Great Expectations over every split) on it; rows/s is over the validated rows, and
peak resident memory is the process's own (wait4), compared with a file a quarter the size.

    python -m bench.validate [--rows 1000000] [--reps 5]
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.common import ratio, record, run_measured, stat, threads_from_env
from tlpipe.data import read_input
from tlpipe.params import load_params


def make_raw(path: Path, rows: int, seed: int = 0) -> None:
    target = load_params().data.target
    corpus = read_input(target.model_copy(update={"select": None}), "target")
    pick = np.random.default_rng(seed).integers(0, len(corpus), rows)
    frame = corpus.iloc[pick].reset_index(drop=True)
    frame["text"] = frame["text"] + " r" + pd.Series(np.arange(rows)).astype(str)
    frame = frame.rename(columns=dict(target.columns))
    # Quote every field: pandas leaves a lone "\r" unquoted, and readers take it for a line end.
    frame.to_csv(path, index=False, quoting=csv.QUOTE_ALL)


def child(raw: Path, work: Path) -> None:
    """One repetition, in its own process: prepare then validate; seconds of each as JSON."""
    from tasks.prepare import prepare
    from tasks.validate import validate
    from tlpipe.setting import validation_suite
    from tlpipe.settings.text_classification.rows import ROWS

    params = load_params()
    # The synthetic file split into target and source as params split the bundled corpus.
    inputs = {
        name: getattr(params.data, name).model_copy(update={"path": str(raw), "sha256": None})
        for name in ("target", "source")
    }
    data = params.data.model_copy(update=inputs)
    start = time.perf_counter()
    prepare(ROWS, params.prepare, data, params.validate_, Path("/"), work / "prepare")
    prepared = time.perf_counter()
    result = validate(
        validation_suite(params.setting), params.validate_, data, work / "prepare", work / "validate"
    )
    done = time.perf_counter()
    rows = sum(c.element_count for c in result.checks if c.check == "text_not_null")
    print(json.dumps({"prepare_s": prepared - start, "validate_s": done - prepared, "rows": rows}))


def run_child(raw: Path, work: Path) -> dict[str, Any]:
    _, peak, out = run_measured([sys.executable, "-m", "bench.validate", "--child", str(raw), str(work)])
    return {**json.loads(out.strip().splitlines()[-1]), "peak_rss_mib": peak}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--child", nargs=2, type=Path, metavar=("RAW", "WORK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    out: dict[str, Any] = {"threads": threads_from_env(), "file_rows": args.rows}
    with tempfile.TemporaryDirectory() as tmp:
        for label, rows in (("full", args.rows), ("quarter", args.rows // 4)):
            raw = Path(tmp, f"raw-{rows}.csv")
            make_raw(raw, rows)
            runs = [run_child(raw, Path(tmp, f"work-{rows}-{i}")) for i in range(args.reps)]
            out[label] = {
                "file_rows": rows,
                "file_mib": raw.stat().st_size / 2**20,
                "validated_rows": runs[0]["rows"],
                "validate_rows_per_s": stat([r["rows"] / r["validate_s"] for r in runs], "rows/s"),
                "prepare_rows_per_s": stat([rows / r["prepare_s"] for r in runs], "rows/s"),
                "peak_rss": stat([r["peak_rss_mib"] for r in runs], "MiB"),
            }
            print(f"{rows} rows: {out[label]['validate_rows_per_s']['median']:.0f} rows/s validated, "
                  f"peak {out[label]['peak_rss']['median']:.0f} MiB", flush=True)  # fmt: skip
    out["memory_growth"] = ratio(out["full"]["peak_rss"], out["quarter"]["peak_rss"])
    record("validate", out)


if __name__ == "__main__":
    main()
