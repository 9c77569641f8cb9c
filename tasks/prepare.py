"""prepare: split the raw data into a source corpus and a small labelled target task."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from tlpipe.data import normalise_text, read_raw, sha256_file, target_mask
from tlpipe.errors import DataError
from tlpipe.params import DataParams, PrepareParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareResult:
    raw_sha256: str
    raw_rows: int
    duplicates_dropped: int
    counts: dict[str, dict[str, int]]


def prepare(p: PrepareParams, data: DataParams, root: Path, out_dir: Path) -> PrepareResult:
    """Read `data.path` under `root`; write source/train/val/test/pool parquet files.

    Texts are de-duplicated on their normalised form before splitting, so no text lands in
    two splits. Rows matching `p.target_pattern` form the target domain: test, val and train
    are drawn from it (seeded), the rest of it is `pool` (labelled target rows held back for
    data-efficiency curves); every other row is the source corpus. Rows are not otherwise
    cleaned: validation decides whether they are fit to use. Raises DataError when the raw
    file is unusable or the target domain is too small for the requested sizes.
    """
    raw = read_raw(data, root)
    key = normalise_text(raw["text"])
    dup = key.notna() & key.duplicated(keep="first")
    frame = raw[~dup].reset_index(drop=True)
    log.info("read %d rows from %s, dropped %d duplicate texts", len(raw), data.path, int(dup.sum()))

    is_target = target_mask(frame["text"], p.target_pattern)
    rng = np.random.default_rng(p.seed)
    target = frame[is_target].iloc[rng.permutation(int(is_target.sum()))]
    source = frame[~is_target].iloc[rng.permutation(int((~is_target).sum()))]
    if p.source_max_rows is not None:
        source = source.iloc[: p.source_max_rows]

    sizes = {"test": p.target_test_size, "val": p.target_val_size, "train": p.target_train_size}
    needed = sum(sizes.values())
    if len(target) < needed:
        raise DataError(
            f"prepare.target_pattern matches {len(target)} rows after de-duplication, "
            f"but test+val+train sizes need {needed} ({sizes})"
        )
    splits: dict[str, pd.DataFrame] = {"source": source}
    start = 0
    for name, size in sizes.items():
        splits[name] = target.iloc[start : start + size]
        start += size
    splits["pool"] = target.iloc[start:]

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    counts: dict[str, dict[str, int]] = {}
    for name, split in splits.items():
        split.reset_index(drop=True).to_parquet(out_dir / f"{name}.parquet", index=False)
        counts[name] = {
            str(k): int(v) for k, v in split["label"].value_counts(dropna=False).sort_index().items()
        }
        log.info("%s: %d rows %s", name, len(split), counts[name])
    result = PrepareResult(
        raw_sha256=sha256_file(root / data.path),
        raw_rows=len(raw),
        duplicates_dropped=int(dup.sum()),
        counts=counts,
    )
    (out_dir / "summary.json").write_text(json.dumps(asdict(result), indent=2, sort_keys=True) + "\n")
    return result


if __name__ == "__main__":
    from tlpipe.entry import main

    main("prepare", lambda params, out: prepare(params.prepare, params.data, Path("."), out))
