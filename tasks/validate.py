"""validate: gate the prepared splits with Great Expectations suites built from params.yaml.

Each input gets the suite its setting builds for what it is (for text classification: see
tlpipe.settings.text_classification.rules); without a source the report says "no source".
With `validate.rows: quarantine`, at most `max_quarantine_share` of each input's rows may
have been set aside by prepare. The results go to report.json (a DVC metric), report.md and
GX Data Docs under data_docs/; the source's own checks go to source.json too, which pretrain
depends on: a change to the target's checks or to the curve's sizes leaves it as it is, so
it does not retrain the source model.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from tlpipe.curve import CurveNeed
from tlpipe.data import SPLITS, read_split, texts
from tlpipe.errors import GateFailed
from tlpipe.expectations import DOCS_SITE, Check, Frame, Spec, gx_context, quiet_gx, run_frame
from tlpipe.params import DataParams, ValidateParams

log = logging.getLogger(__name__)


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

    def summary(self) -> str:
        passed = len(self.checks) - len(self.failed)
        failed = "".join(f"; failed {c.split}: {c.check}" for c in self.failed)
        return f"{passed} of {len(self.checks)} checks passed{failed}; report {self.report_path}"


def validate(
    suite: Callable[[ValidateParams, DataParams, dict[str, pd.DataFrame]], list[Frame]],
    p: ValidateParams,
    data: DataParams,
    prepare_dir: Path,
    out_dir: Path,
    curve: CurveNeed | None = None,
) -> ValidateResult:
    """Validate prepare_dir/{train,val,test,pool,source}.parquet with Great Expectations,
    each input with the suite the setting's `suite` builds for it, plus the quarantine's,
    and, given the `curve`'s need, that train + pool hold its largest size.

    Writes out_dir/report.json, out_dir/source.json (the source's checks alone),
    out_dir/report.md and Data Docs under out_dir/data_docs/, then
    raises GateFailed naming every failed expectation (split, column, rows) if any failed.
    Raises DataError if a split file is missing.
    """
    quiet_gx()
    names = [n for n in SPLITS if n != "source" or data.source_kind != "none"]
    splits = {name: read_split(prepare_dir, name) for name in names}
    frames = suite(p, data, splits)
    if p.rows == "quarantine":
        frames += _quarantine_frames(p, data, prepare_dir)
    if curve is not None and curve.largest is not None:
        frames.append(_curve_frame(curve, splits))

    out_dir.mkdir(parents=True, exist_ok=True)
    docs_dir = out_dir / "data_docs"
    shutil.rmtree(docs_dir, ignore_errors=True)
    context = gx_context(docs_dir)
    checks = tuple(check for frame in frames for check in run_frame(context, frame))
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


def _quarantine_frames(p: ValidateParams, data: DataParams, prepare_dir: Path) -> list[Frame]:
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

        spec = Spec(
            "quarantine_share",
            None,
            f"at most {p.max_quarantine_share:.1%} of {name}'s rows ({allowed} of {read}) are quarantined",
            gxe.ExpectTableRowCountToBeBetween(min_value=0, max_value=allowed),
            explain,
            counts,
        )
        frames.append(Frame(f"{name}_quarantine", f"{name}_quarantine", rows, (spec,)))
    return frames


def _curve_frame(curve: CurveNeed, splits: dict[str, pd.DataFrame]) -> Frame:
    """train + pool hold the curve's largest size, so a size beyond the data fails here and
    not in the middle of evaluate. Tokens are not known before pretrain trains the
    tokenizer: a text makes at most one per UTF-8 byte, a leading space and its end-of-text,
    so a size beyond that bound fails here, and one between it and the real count fails when
    evaluate draws it, saying so the same way."""
    import great_expectations.expectations as gxe

    need, unit = curve.largest, curve.unit
    rows = pd.concat([splits["train"], splits["pool"]], ignore_index=True)
    if unit == "rows":
        data = pd.DataFrame({"row": range(len(rows))})
        expectation = gxe.ExpectTableRowCountToBeBetween(min_value=need)
        holds = "hold"
    else:
        data = pd.DataFrame({"at_most": [len(t.encode()) + 2 for t in texts(rows)]})
        expectation = gxe.ExpectColumnSumToBeBetween(column="at_most", min_value=need)
        holds = "make at most"

    def counts(r: dict[str, Any]) -> tuple[int, int]:
        n = int(r["result"]["observed_value"])
        return max(0, need - n), n

    def explain(r: dict[str, Any], u: int, n: int) -> str:
        asked = f"{curve.key} asks for {need} training {unit}; train + pool {holds} {n}"
        return asked + (f" ({u} short): lower it or add target rows" if u else "")

    spec = Spec("curve_sizes", None, f"train + pool hold {need} {unit}", expectation, explain, counts)
    return Frame("curve", "train+pool", data, (spec,))


# The splits whose checks source.json holds: what the source model is trained on.
SOURCE_SPLITS = ("source", "source_quarantine")


def _write_report(result: ValidateResult) -> None:
    """report.json: nested by split then check, so `dvc metrics` shows every count; and
    source.json, the same for the source's splits alone."""
    checks = _nested(result.checks)
    report = {
        "success": result.success,
        "source": result.source,
        "expectations": len(result.checks),
        "failed": len(result.failed),
        "checks": checks,
    }
    result.report_path.write_text(json.dumps(report, indent=2) + "\n")
    own = [c for c in result.checks if c.split in SOURCE_SPLITS]
    source = {
        "success": all(c.success for c in own),
        "source": result.source,
        "expectations": len(own),
        "checks": _nested(own),
    }
    (result.report_path.parent / "source.json").write_text(json.dumps(source, indent=2) + "\n")


def _nested(found: Iterable[Check]) -> dict[str, dict[str, dict[str, Any]]]:
    checks: dict[str, dict[str, dict[str, Any]]] = {}
    for c in found:
        checks.setdefault(c.split, {})[c.check] = {
            "success": c.success,
            "unexpected_count": c.unexpected_count,
            "element_count": c.element_count,
            "expectation": c.expectation,
            "column": c.column,
            "description": c.description,
            "summary": c.summary,
        }
    return checks


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
