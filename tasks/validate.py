"""validate: gate the prepared splits with Great Expectations suites built from params.yaml.

Each input gets the suite that fits what it is. Every target split (train, val, test and
pool) must have a `text` and a `label` column, non-null, non-blank texts within the length
bounds and labels from the target's label set, and `min_per_class` rows of every label (the
pool too, when it has rows). A labelled source gets the same row checks against its own
label set, an unlabelled one the text checks alone, and either needs `min_source_rows`
rows; without a source the report says "no source". No normalised text may appear in more
than one split, the source included. The results go to report.json (a DVC metric),
report.md and GX Data Docs under data_docs/.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from tlpipe.data import SPLITS, normalise_text, read_split
from tlpipe.errors import GateFailed
from tlpipe.params import TARGET_PARTS, DataParams, ValidateParams

# Great Expectations takes seconds to import: it is imported where it is used, so that
# importing this module (as the Prefect flow does) stays cheap.
if TYPE_CHECKING:
    from great_expectations.data_context import AbstractDataContext
    from great_expectations.expectations import Expectation

# The split name under which the cross-split leakage check is reported.
ALL = "all"
DOCS_SITE = "tlpipe"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Check:
    """The outcome of one expectation on one split (or on all splits, for leakage)."""

    split: str
    check: str
    expectation: str
    column: str | None
    success: bool
    unexpected_count: int
    element_count: int
    description: str
    summary: str

    @property
    def where(self) -> str:
        return f"{self.split}.{self.column}" if self.column else self.split


@dataclass(frozen=True)
class ValidateResult:
    success: bool
    checks: tuple[Check, ...]
    report_path: Path
    data_docs_index: Path
    # What the source is: labelled, unlabelled or none (no source-side checks ran).
    source: str = "labelled"

    @property
    def failed(self) -> tuple[Check, ...]:
        return tuple(c for c in self.checks if not c.success)


@dataclass(frozen=True)
class _Spec:
    """One expectation to run, with how to read its GX result back as counts and words."""

    check: str
    column: str | None
    description: str
    expectation: Expectation
    # (GX result dict, unexpected, element) -> one line on what was found.
    explain: Callable[[dict[str, Any], int, int], str]
    # GX result dict -> (unexpected, element); None: the result's own map counts.
    counts: Callable[[dict[str, Any]], tuple[int, int]] | None = None


@dataclass(frozen=True)
class _Frame:
    """A dataframe validated as one GX batch, with the suite run on it."""

    name: str
    split: str
    data: pd.DataFrame
    specs: tuple[_Spec, ...]


def validate(p: ValidateParams, data: DataParams, prepare_dir: Path, out_dir: Path) -> ValidateResult:
    """Validate prepare_dir/{train,val,test,pool,source}.parquet with Great Expectations,
    each input with the suite that fits it (see the module's docstring).

    Writes out_dir/report.json, out_dir/report.md and Data Docs under out_dir/data_docs/, then
    raises GateFailed naming every failed expectation (split, column, rows) if any failed.
    Raises DataError if a split file is missing.
    """
    _quiet_gx()
    names = [n for n in SPLITS if n != "source" or data.source_kind != "none"]
    splits = {name: read_split(prepare_dir, name) for name in names}
    frames = _frames(p, data, splits, prepare_dir)

    out_dir.mkdir(parents=True, exist_ok=True)
    docs_dir = out_dir / "data_docs"
    shutil.rmtree(docs_dir, ignore_errors=True)
    context = _context(docs_dir)
    checks = tuple(check for frame in frames for check in _run(context, frame))
    context.build_data_docs(site_names=[DOCS_SITE])

    success = all(c.success for c in checks)
    result = ValidateResult(
        success, checks, out_dir / "report.json", docs_dir / "index.html", data.source_kind
    )
    _write_report(result)
    _write_markdown(result, out_dir / "report.md")
    if not success:
        raise GateFailed(_failure_message(result))
    log.info("validation passed: %d expectations met; see %s", len(checks), result.report_path)
    return result


def _quiet_gx() -> None:
    """GX logs at INFO while it imports and runs; keep it to warnings unless told otherwise."""
    gx_logger = logging.getLogger("great_expectations")
    if gx_logger.level == logging.NOTSET:
        gx_logger.setLevel(logging.WARNING)


def _frames(
    p: ValidateParams, data: DataParams, splits: dict[str, pd.DataFrame], prepare_dir: Path
) -> list[_Frame]:
    frames = []
    for name, df in splits.items():
        labels = data.labels if name in TARGET_PARTS else data.source_labels
        frames.append(_Frame(name, name, df, _split_specs(p, labels, name, df)))
        # An empty pool (every target row in train, val or test) has no classes to count.
        if name in TARGET_PARTS and "label" in df.columns and not (name == "pool" and df.empty):
            frames.append(_label_counts_frame(p, data.labels, name, df))
    frames.append(_leakage_frame(splits))
    if p.rows == "quarantine":
        frames += _quarantine_frames(p, data, prepare_dir)
    return frames


def _quarantine_frames(p: ValidateParams, data: DataParams, prepare_dir: Path) -> list[_Frame]:
    """Per input, its quarantined rows as a GX batch: at most max_quarantine_share of the rows
    read may have been set aside."""
    import great_expectations.expectations as gxe

    aside = pd.read_parquet(prepare_dir / "quarantine.parquet")
    inputs = json.loads((prepare_dir / "summary.json").read_text())["inputs"]
    frames = []
    for name in ("target", "source") if data.source is not None else ("target",):
        rows = aside[aside["input"] == name][["row", "rule"]].reset_index(drop=True)
        read = int(inputs[name]["rows"])
        allowed = int(p.max_quarantine_share * read)
        by_rule = ", ".join(f"{rule}: {k}" for rule, k in rows["rule"].value_counts().sort_index().items())

        def explain(r: dict[str, Any], u: int, n: int, read: int = read, by_rule: str = by_rule) -> str:
            line = f"{n} of {read} rows quarantined" + (f" ({by_rule})" if n else "")
            return line + (f", {u} over the {p.max_quarantine_share:.1%} allowed" if u else "")

        def counts(r: dict[str, Any], allowed: int = allowed) -> tuple[int, int]:
            n = int(r["result"]["observed_value"])
            return max(0, n - allowed), n

        spec = _Spec(
            "quarantine_share",
            None,
            f"at most {p.max_quarantine_share:.1%} of {name}'s rows ({allowed} of {read}) are quarantined",
            gxe.ExpectTableRowCountToBeBetween(min_value=0, max_value=allowed),
            explain,
            counts,
        )
        frames.append(_Frame(f"{name}_quarantine", f"{name}_quarantine", rows, (spec,)))
    return frames


def _split_specs(
    p: ValidateParams, labels: tuple[str, ...] | None, split: str, df: pd.DataFrame
) -> tuple[_Spec, ...]:
    """The row checks of one split: its columns, its texts and, when `labels` is given, its
    labels; a source also needs `min_source_rows` rows. (Undecodable bytes never get here:
    prepare fails on them, or sets them aside.)"""
    import great_expectations.expectations as gxe

    n = len(df)

    def exists_counts(result: dict[str, Any]) -> tuple[int, int]:
        # A missing column fails every row: none of them can be checked.
        return (0 if result["success"] else n), n

    specs = [
        _Spec(
            f"{col}_exists",
            col,
            f"column '{col}' is present",
            gxe.ExpectColumnToExist(column=col),
            lambda r, u, n, col=col: (
                f"column '{col}' is missing from all {n} rows" if u else f"column '{col}' is present"
            ),
            exists_counts,
        )
        for col in (("text", "label") if labels is not None else ("text",))
    ]
    # Checks on a missing column would only repeat that it is missing (as a GX traceback).
    if "text" in df.columns:
        specs += [
            _Spec(
                "text_not_null",
                "text",
                "text is never null",
                gxe.ExpectColumnValuesToNotBeNull(column="text"),
                lambda r, u, n: f"{u} of {n} rows have a null text",
            ),
            _Spec(
                "text_not_blank",
                "text",
                "text is never empty or whitespace only",
                gxe.ExpectColumnValuesToMatchRegex(column="text", regex=r"\S"),
                lambda r, u, n: f"{u} of {n} rows have an empty or whitespace-only text",
            ),
            _Spec(
                "text_length",
                "text",
                f"text has {p.min_chars} to {p.max_chars} characters",
                gxe.ExpectColumnValueLengthsToBeBetween(
                    column="text", min_value=p.min_chars, max_value=p.max_chars
                ),
                lambda r, u, n: (
                    f"{u} of {n} rows have a text shorter than {p.min_chars} "
                    f"or longer than {p.max_chars} characters"
                ),
            ),
        ]
    if labels is not None and "label" in df.columns:
        specs += [
            _Spec(
                "label_not_null",
                "label",
                "label is never null",
                gxe.ExpectColumnValuesToNotBeNull(column="label"),
                lambda r, u, n: f"{u} of {n} rows have a null label",
            ),
            _Spec(
                "label_in_set",
                "label",
                f"label is one of {', '.join(labels)}",
                gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(labels)),
                lambda r, u, n: f"{u} of {n} rows have a label outside {', '.join(labels)}" + _examples(r),
            ),
        ]
    if split == "source":

        def row_counts(result: dict[str, Any]) -> tuple[int, int]:
            rows = int(result["result"]["observed_value"])
            return max(0, p.min_source_rows - rows), rows

        specs.append(
            _Spec(
                "min_source_rows",
                None,
                f"source has at least {p.min_source_rows} rows",
                gxe.ExpectTableRowCountToBeBetween(min_value=p.min_source_rows),
                lambda r, u, n: (
                    f"{n} rows, needs at least {p.min_source_rows} ({u} short)" if u else f"{n} rows"
                ),
                row_counts,
            )
        )
    return tuple(specs)


def _examples(result: dict[str, Any], limit: int = 5) -> str:
    found = sorted({str(v) for v in result["result"].get("partial_unexpected_list") or []})
    return f" (found {', '.join(map(repr, found[:limit]))})" if found else ""


def _label_counts_frame(p: ValidateParams, labels: tuple[str, ...], split: str, df: pd.DataFrame) -> _Frame:
    """GX has no per-class minimum: validate a (label, count) frame of the split instead."""
    import great_expectations.expectations as gxe

    counts = df["label"].value_counts().reindex(list(labels), fill_value=0)
    data = pd.DataFrame({"label": list(labels), "count": counts.to_numpy(dtype="int64")})
    short = data[data["count"] < p.min_per_class]
    detail = ", ".join(f"{row.label}: {row.count}" for row in short.itertuples())
    spec = _Spec(
        "min_per_class",
        "label",
        f"every label has at least {p.min_per_class} rows in {split}",
        gxe.ExpectColumnValuesToBeBetween(column="count", min_value=p.min_per_class),
        lambda r, u, n: (
            f"{u} of {n} labels have fewer than {p.min_per_class} rows" + (f" ({detail})" if u else "")
        ),
    )
    return _Frame(f"{split}_label_counts", split, data, (spec,))


def _leakage_frame(splits: dict[str, pd.DataFrame]) -> _Frame:
    """One row per (split, normalised text): a text in k splits makes k non-unique rows."""
    import great_expectations.expectations as gxe

    parts = [
        pd.DataFrame({"split": name, "text_normalised": normalise_text(df["text"])})
        for name, df in splits.items()
        if "text" in df.columns
    ]
    columns = ["split", "text_normalised"]
    data = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=columns, dtype=str)
    data = data.dropna()
    # Blank texts are the not-blank check's to report; duplicates within a split are not leaks.
    data = data[data["text_normalised"] != ""].drop_duplicates().reset_index(drop=True)
    data["text_normalised"] = data["text_normalised"].astype(str)

    leaked = data[data.duplicated("text_normalised", keep=False)]
    pairs = leaked.groupby("text_normalised")["split"].agg(lambda s: "/".join(sorted(s, key=SPLITS.index)))
    per_pair = pairs.value_counts().sort_index()
    detail = ", ".join(f"{pair}: {k} text{'s' if k > 1 else ''}" for pair, k in per_pair.items())
    spec = _Spec(
        "no_leakage",
        "text",
        "no normalised text (lowercased, whitespace collapsed, stripped) appears in more "
        f"than one of {', '.join(SPLITS)}",
        gxe.ExpectColumnValuesToBeUnique(column="text_normalised"),
        lambda r, u, n: (
            f"{u} of {n} rows share their normalised text with another split" + (f" ({detail})" if u else "")
        ),
    )
    return _Frame("leakage", ALL, data, (spec,))


def _context(docs_dir: Path) -> AbstractDataContext:
    """An in-memory GX context, quiet and offline, whose one Data Docs site is docs_dir."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    config = DataContextConfig(
        store_backend_defaults=InMemoryStoreBackendDefaults(),
        analytics_enabled=False,
        progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
        data_docs_sites={
            DOCS_SITE: {
                "class_name": "SiteBuilder",
                "show_how_to_buttons": False,
                "store_backend": {
                    "class_name": "TupleFilesystemStoreBackend",
                    "base_directory": str(docs_dir.resolve()),
                },
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            }
        },
    )
    return gx.get_context(mode="ephemeral", project_config=config)


def _run(context: AbstractDataContext, frame: _Frame) -> list[Check]:
    """Run frame's suite on it as a pandas batch; one Check per spec, in spec order."""
    import great_expectations as gx
    from great_expectations.core.run_identifier import RunIdentifier

    source = context.data_sources.add_pandas(frame.name)
    batch = source.add_dataframe_asset(frame.name).add_batch_definition_whole_dataframe(frame.name)
    suite = context.suites.add(gx.ExpectationSuite(name=frame.name))
    for spec in frame.specs:
        spec.expectation.description = spec.description
        spec.expectation.meta = {"check": spec.check}
        suite.add_expectation(spec.expectation)
    definition = context.validation_definitions.add(
        gx.ValidationDefinition(name=frame.name, data=batch, suite=suite)
    )
    outcome = definition.run(
        batch_parameters={"dataframe": frame.data},
        run_id=RunIdentifier(run_name="validate"),
    )
    # GX does not keep the suite's order in its results: match them back by our check name.
    by_check = {r.expectation_config.meta["check"]: r.to_json_dict() for r in outcome.results}
    return [_check(frame, spec, by_check[spec.check]) for spec in frame.specs]


def _check(frame: _Frame, spec: _Spec, result: dict[str, Any]) -> Check:
    success = bool(result["success"])
    error = result.get("exception_info") or {}
    if error.get("raised_exception"):
        unexpected, element = 0, len(frame.data)
        summary = f"could not be evaluated: {error.get('exception_message')}"
    else:
        if spec.counts is not None:
            unexpected, element = spec.counts(result)
        else:
            unexpected = int(result["result"]["unexpected_count"])
            element = int(result["result"]["element_count"])
        summary = spec.explain(result, unexpected, element)
    return Check(
        split=frame.split,
        check=spec.check,
        expectation=result["expectation_config"]["type"],
        column=spec.column,
        success=success,
        unexpected_count=unexpected,
        element_count=element,
        description=spec.description,
        summary=summary,
    )


def _write_report(result: ValidateResult) -> None:
    """report.json: nested by split then check, so `dvc metrics` shows every count."""
    checks: dict[str, dict[str, dict[str, Any]]] = {}
    for c in result.checks:
        checks.setdefault(c.split, {})[c.check] = {
            "success": c.success,
            "unexpected_count": c.unexpected_count,
            "element_count": c.element_count,
            "expectation": c.expectation,
            "column": c.column,
            "description": c.description,
            "summary": c.summary,
        }
    report = {
        "success": result.success,
        "source": result.source,
        "expectations": len(result.checks),
        "failed": len(result.failed),
        "checks": checks,
    }
    result.report_path.write_text(json.dumps(report, indent=2) + "\n")


def _write_markdown(result: ValidateResult, path: Path) -> None:
    verdict = "passed" if result.success else "FAILED"
    passed = len(result.checks) - len(result.failed)
    lines = [
        f"# Validation {verdict}: {passed} of {len(result.checks)} expectations met",
        "",
        "Source: "
        + (
            "none (no source: the source-side checks did not run)."
            if result.source == "none"
            else f"{result.source}."
        ),
        "",
        "| split | column | check | expectation | result | unexpected | of | finding |",
        "|---|---|---|---|---|---:|---:|---|",
    ]
    for c in result.checks:
        lines.append(
            f"| {c.split} | {c.column or ''} | {c.check} | `{c.expectation}` | "
            f"{'ok' if c.success else '**failed**'} | {c.unexpected_count} | "
            f"{c.element_count} | {c.summary.replace('|', '/')} |"
        )
    lines += [
        "",
        f"Great Expectations Data Docs: `{result.data_docs_index.name}` under "
        f"`{result.data_docs_index.parent.name}/`.",
        "",
    ]
    path.write_text("\n".join(lines))


def _failure_message(result: ValidateResult) -> str:
    lines = [f"validation failed: {len(result.failed)} of {len(result.checks)} expectations"]
    lines += [f"  - {c.where}: {c.expectation} ({c.check}) — {c.summary}" for c in result.failed]
    lines.append(f"  see {result.report_path} and {result.data_docs_index}")
    return "\n".join(lines)


if __name__ == "__main__":
    from tasks.wiring import main

    main("validate")
