"""`tlpipe predict` on 100k rows: rows/s and peak memory, and that memory stays flat.

The input is a CSV of tweets drawn (seeded, with replacement) from the bundled corpus.
Each run is the real command in its own process; its peak resident memory comes from the
kernel's accounting of that process (wait4). Memory is compared against a 10k-row input:
streaming means the 100k-row run needs no more than the 10k-row one.

    python -m bench.predict [--rows 100000] [--reps 5] [--precision int8 [fp32]]

The default serves the int8 model, the fast path; fp32 runs at the batch-32 rate that
bench/infer.py measures.
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bench.common import pin_threads, ratio, record, run_measured, stat, threads_from_env
from tlpipe.data import read_input
from tlpipe.params import load_params

BUNDLE = Path("outputs/export/bundle")


def make_input(path: Path, rows: int, seed: int = 0) -> None:
    target = load_params().data.target.model_copy(update={"select": None})
    texts = read_input(target, "target")["text"].dropna().to_numpy()
    pick = np.random.default_rng(seed).integers(0, len(texts), rows)
    # Quote every field: pandas leaves a lone "\r" unquoted, and readers take it for a line end.
    pd.DataFrame({"text": texts[pick]}).to_csv(path, index=False, quoting=csv.QUOTE_ALL)


def run_predict(input_path: Path, output: Path, precision: str, threads: int) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB) of one `tlpipe predict` process."""
    cmd = [
        sys.executable, "-m", "tlpipe.cli", "predict", "--bundle", str(BUNDLE), "--input", str(input_path),
        "--output", str(output), "--precision", precision, "--threads", str(threads),
    ]  # fmt: skip
    seconds, peak, _ = run_measured(cmd)
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--precision", nargs="+", default=["int8"])
    args = parser.parse_args()
    threads = threads_from_env()
    pin_threads(threads)
    out: dict[str, Any] = {"threads": threads, "rows": args.rows, "small_rows": args.small}
    with tempfile.TemporaryDirectory() as tmp:
        big, small, dest = Path(tmp, "big.csv"), Path(tmp, "small.csv"), Path(tmp, "out.jsonl")
        make_input(big, args.rows)
        make_input(small, args.small)
        for precision in args.precision:
            runs = [run_predict(big, dest, precision, threads) for _ in range(args.reps)]
            lines = sum(1 for _ in dest.open())
            if lines != args.rows:
                raise RuntimeError(f"{precision}: {lines} predictions for {args.rows} rows")
            small_runs = [run_predict(small, dest, precision, threads) for _ in range(args.reps)]
            big_mem, small_mem = stat([m for _, m in runs], "MiB"), stat([m for _, m in small_runs], "MiB")
            out[precision] = {
                "rows_per_s": stat([args.rows / s for s, _ in runs], "rows/s"),
                "peak_rss": big_mem,
                "peak_rss_small": small_mem,
                "memory_growth": ratio(big_mem, small_mem),
            }
            speed = out[precision]["rows_per_s"]["median"]
            print(f"{precision}: {speed:.0f} rows/s, {big_mem['median']:.0f} MiB at {args.rows} rows, "
                  f"{small_mem['median']:.0f} at {args.small}", flush=True)  # fmt: skip
    record("predict", out)


if __name__ == "__main__":
    main()
