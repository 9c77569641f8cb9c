"""prepare: read the inputs, form the target's splits and the source corpus."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tlpipe.data import ORIGIN, UNDECODABLE, input_files, input_paths, read_input, sha256_file, undecodable
from tlpipe.errors import DataError
from tlpipe.files import fresh_dir, write_json
from tlpipe.params import TARGET_PARTS, TARGET_SPLITS, DataParams, InputParams, PrepareParams, ValidateParams
from tlpipe.setting import RowRules

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrepareResult:
    # Per input (target, source): its files with their SHA-256, and rows read.
    inputs: dict[str, Any]
    source: str
    duplicates_dropped: dict[str, int]
    counts: dict[str, dict[str, int]]

    def summary(self) -> str:
        rows = ", ".join(f"{name} {sum(by_label.values()):,}" for name, by_label in self.counts.items())
        return f"rows: {rows}; duplicates dropped: {sum(self.duplicates_dropped.values()):,}"


def prepare(
    rules: RowRules, p: PrepareParams, data: DataParams, rows: ValidateParams, root: Path, out_dir: Path
) -> PrepareResult:
    """Read `data.target` (and `data.source`, if any) under `root`; write train / val /
    test / pool / source parquet files and summary.json under `out_dir`.

    Rows are de-duplicated on the setting's row identity (`rules.identity`: for text, the
    normalised text) within each input, and source rows that are also target rows are
    dropped, so no item lands in two splits. The
    target's splits are drawn (seeded, stratified by label), read from its split column,
    or taken from its split files (`p.split.by`); drawn splits leave every other target row
    in `pool`. Without a source, source.parquet has no rows. Under `rows.rows: quarantine`
    the rows that break one of the setting's row-level rules are set aside first, with the rule,
    in quarantine.parquet; rows are not otherwise cleaned: validation decides whether they
    are fit to use. Raises DataError when an input is unusable or the target is too small
    for the requested sizes.
    """
    rng = np.random.default_rng(p.seed)
    raw_target = read_input(data.target, "target", root)
    kept, quarantined = _quarantine(rules, raw_target, "target", rows, data.target.labels, data.target)
    target, dropped_target = _dedupe(rules, kept)
    splits = _target_splits(p, target, rng)

    dropped = {"target": dropped_target}
    inputs = {"target": _describe(data.target, "target", root, len(raw_target))}
    aside = [quarantined]
    if data.source is not None:
        raw = read_input(data.source, "source", root)
        kept, quarantined = _quarantine(rules, raw, "source", rows, data.source_labels, data.source)
        aside.append(quarantined)
        source, dropped["source"] = _dedupe(rules, kept)
        in_target = rules.identity(source).isin(set(rules.identity(target).dropna()))
        dropped["source_in_target"] = int(in_target.sum())
        source = source[~in_target.to_numpy()]
        source = source.iloc[rng.permutation(len(source))]
        if p.source_max_rows is not None:
            source = source.iloc[: p.source_max_rows]
        inputs["source"] = _describe(data.source, "source", root, len(raw))
    else:
        source = pd.DataFrame({rules.item: pd.Series(dtype=object)})
        inputs["source"] = None
    splits["source"] = source

    fresh_dir(out_dir)
    counts: dict[str, dict[str, int]] = {}
    for name, split in splits.items():
        split = split.drop(columns=["split"], errors="ignore").reset_index(drop=True)
        split.to_parquet(out_dir / f"{name}.parquet", index=False)
        counts[name] = (
            {str(k): int(v) for k, v in split["label"].value_counts(dropna=False).sort_index().items()}
            if "label" in split.columns
            else {"<unlabelled>": len(split)}
        )
        log.info("%s: %d rows %s", name, len(split), counts[name])
    quarantine = pd.concat(aside, ignore_index=True)
    quarantine.to_parquet(out_dir / "quarantine.parquet", index=False)
    for name, entry in inputs.items():
        if entry is not None:
            by_rule = quarantine.loc[quarantine["input"] == name, "rule"].value_counts()
            entry["quarantined"] = {str(k): int(v) for k, v in by_rule.sort_index().items()}
            if len(by_rule):
                log.warning("%s: %d rows quarantined %s", name, int(by_rule.sum()), entry["quarantined"])
    result = PrepareResult(inputs=inputs, source=data.source_kind, duplicates_dropped=dropped, counts=counts)
    write_json(out_dir / "summary.json", asdict(result))
    return result


def _quarantine(
    rules: RowRules,
    frame: pd.DataFrame,
    name: str,
    rows: ValidateParams,
    labels: tuple[str, ...] | None,
    inp: InputParams,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(kept, set aside): under `rows: quarantine`, the rows that break a row-level rule,
    each with its input, its file and row in it (0-based, header excluded) and the rule.
    Under `rows: fail` nothing is set aside, but a row with bytes that do not decode fails
    here, naming its file and row (it cannot be stored for validation to report). The kept
    rows lose read_input's bookkeeping columns."""
    internal = [UNDECODABLE, *ORIGIN]
    data_columns = [c for c in frame.columns if c not in internal]
    columns = ["input", "file", "row", "rule", *data_columns]
    if rows.rows != "quarantine":
        bad_bytes = frame[undecodable(frame).to_numpy()]
        if len(bad_bytes):
            where = [
                f"{Path(f).name} row {r}"
                for f, r in zip(bad_bytes[ORIGIN[0]], bad_bytes[ORIGIN[1]], strict=True)
            ]
            shown = ", ".join(where[:5]) + (", ..." if len(where) > 5 else "")
            raise DataError(
                f"data.{name}: {len(bad_bytes)} rows hold bytes that do not decode as {inp.encoding} "
                f"({shown}; rows counted from 0 after the header); set data.{name}.encoding_errors: "
                "replace to keep them as U+FFFD, or validate.rows: quarantine to set them aside"
            )
        return frame[data_columns], _empty(columns)
    rule = rules.broken_rule(frame, rows, labels)
    bad = rule.notna().to_numpy()
    aside = (
        frame[bad].rename(columns={ORIGIN[0]: "file", ORIGIN[1]: "row"}).assign(input=name, rule=rule[bad])
    )
    kept = frame[~bad][data_columns].reset_index(drop=True)
    return kept, aside[columns].astype({"row": "int64"})


def _empty(columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame({c: pd.Series(dtype="int64" if c == "row" else "string") for c in columns})


def _dedupe(rules: RowRules, frame: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """The frame without rows whose identity repeats an earlier row's; and how many."""
    key = rules.identity(frame)
    dup = key.notna() & key.duplicated(keep="first")
    return frame[~dup.to_numpy()].reset_index(drop=True), int(dup.sum())


def _describe(inp: InputParams, name: str, root: Path, rows: int) -> dict[str, Any]:
    """What lineage records of an input: where it came from, each file's SHA-256, its rows."""
    files = {}
    for path in input_paths(inp):
        for f in input_files(path, inp.format, root, f"data.{name}.path"):
            files[f.relative_to(root).as_posix() if f.is_relative_to(root) else str(f)] = sha256_file(f)
    return {"path": inp.path, "files": files, "rows": rows, "select": inp.select and inp.select.model_dump()}


def _target_splits(
    p: PrepareParams, target: pd.DataFrame, rng: np.random.Generator
) -> dict[str, pd.DataFrame]:
    if p.split.by == "draw":
        return _draw(p, target, rng)
    values = target["split"].fillna("<null>").astype(str)
    unknown = values[~values.isin(TARGET_PARTS)].value_counts()
    if len(unknown):
        found = ", ".join(f"{v!r}: {n} rows" for v, n in unknown.items())
        raise DataError(
            f"the target's split column holds values other than {', '.join(TARGET_PARTS)} ({found})"
        )
    splits = {name: target[(values == name).to_numpy()] for name in TARGET_PARTS}
    empty = [name for name in TARGET_SPLITS if splits[name].empty]
    if empty:
        raise DataError(f"the target has no {' / '.join(empty)} rows (prepare.split.by is {p.split.by!r})")
    return splits


def _draw(p: PrepareParams, target: pd.DataFrame, rng: np.random.Generator) -> dict[str, pd.DataFrame]:
    """test, val and train drawn in that order, each stratified by label (largest remainder)
    when `stratify` and the target has labels; the rest is pool."""
    sizes = {"test": p.split.test, "val": p.split.val, "train": p.split.train}
    needed = sum(sizes.values())
    if len(target) < needed:
        raise DataError(
            f"the target has {len(target)} rows after de-duplication, but the test + val + train "
            f"sizes need {needed} ({sizes}); lower prepare.split sizes"
        )
    shuffled = target.iloc[rng.permutation(len(target))]
    if not p.split.stratify or "label" not in shuffled.columns:
        groups = {"": shuffled}
    else:
        key = shuffled["label"].fillna("<null>").astype(str)
        groups = {label: shuffled[(key == label).to_numpy()] for label in sorted(key.unique())}
    taken = dict.fromkeys(groups, 0)
    picked: dict[str, list[pd.DataFrame]] = {name: [] for name in sizes}
    for name, size in sizes.items():
        left = {g: len(rows) - taken[g] for g, rows in groups.items()}
        for g, k in _quotas(left, size).items():
            picked[name].append(groups[g].iloc[taken[g] : taken[g] + k])
            taken[g] += k
    splits = {name: _mix(pd.concat(parts), rng) for name, parts in picked.items()}
    splits["pool"] = _mix(pd.concat([rows.iloc[taken[g] :] for g, rows in groups.items()]), rng)
    return {name: splits[name] for name in TARGET_PARTS}


def _quotas(available: dict[str, int], size: int) -> dict[str, int]:
    """`size` rows shared among groups in proportion to what each has left (largest
    remainder, never more than a group has)."""
    total = sum(available.values())
    exact = {g: size * n / total for g, n in available.items()}
    quota = {g: min(available[g], int(x)) for g, x in exact.items()}
    for g in sorted(exact, key=lambda g: exact[g] - int(exact[g]), reverse=True):
        if sum(quota.values()) >= size:
            break
        if quota[g] < available[g]:
            quota[g] += 1
    return quota


def _mix(frame: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    """A stratified split's rows in a seeded random order, not grouped by label."""
    return frame.iloc[rng.permutation(len(frame))]


if __name__ == "__main__":
    from tasks.wiring import main

    main("prepare")
