"""The text classifier's validation suites, built from params: every target split (train,
val, test and pool) must have a `text` and a `label` column, non-null, non-blank texts
within the length bounds and labels from the target's label set, and `min_per_class` rows
of every label (the pool too, when it has rows). A labelled source gets the same row checks
against its own label set, an unlabelled one the text checks alone, and either needs
`min_source_rows` rows. No normalised text may appear in more than one split, the source
included."""

from __future__ import annotations

from typing import Any

import pandas as pd

from tlpipe.data import SPLITS
from tlpipe.expectations import ALL, Frame, Spec, examples
from tlpipe.params import TARGET_PARTS, DataParams, ValidateParams
from tlpipe.settings.text_classification.rows import identity


def suite(p: ValidateParams, data: DataParams, splits: dict[str, pd.DataFrame]) -> list[Frame]:
    """Every input's frames and expectations (see the module's docstring)."""
    frames = []
    for name, df in splits.items():
        labels = data.labels if name in TARGET_PARTS else data.source_labels
        frames.append(Frame(name, name, df, _split_specs(p, labels, name, df)))
        # An empty pool (every target row in train, val or test) has no classes to count.
        if name in TARGET_PARTS and "label" in df.columns and not (name == "pool" and df.empty):
            frames.append(_label_counts_frame(p, data.labels, name, df))
    frames.append(_leakage_frame(splits))
    return frames


def _split_specs(
    p: ValidateParams, labels: tuple[str, ...] | None, split: str, df: pd.DataFrame
) -> tuple[Spec, ...]:
    """The row checks of one split: its columns, its texts and, when `labels` is given, its
    labels; a source also needs `min_source_rows` rows. (Undecodable bytes never get here:
    prepare fails on them, or sets them aside.)"""
    import great_expectations.expectations as gxe

    n = len(df)

    def exists_counts(result: dict[str, Any]) -> tuple[int, int]:
        # A missing column fails every row: none of them can be checked.
        return (0 if result["success"] else n), n

    specs = [
        Spec(
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
            Spec(
                "text_not_null",
                "text",
                "text is never null",
                gxe.ExpectColumnValuesToNotBeNull(column="text"),
                lambda r, u, n: f"{u} of {n} rows have a null text",
            ),
            Spec(
                "text_not_blank",
                "text",
                "text is never empty or whitespace only",
                gxe.ExpectColumnValuesToMatchRegex(column="text", regex=r"\S"),
                lambda r, u, n: f"{u} of {n} rows have an empty or whitespace-only text",
            ),
            Spec(
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
            Spec(
                "label_not_null",
                "label",
                "label is never null",
                gxe.ExpectColumnValuesToNotBeNull(column="label"),
                lambda r, u, n: f"{u} of {n} rows have a null label",
            ),
            Spec(
                "label_in_set",
                "label",
                f"label is one of {', '.join(labels)}",
                gxe.ExpectColumnValuesToBeInSet(column="label", value_set=list(labels)),
                lambda r, u, n: f"{u} of {n} rows have a label outside {', '.join(labels)}" + examples(r),
            ),
        ]
    if split == "source":

        def row_counts(result: dict[str, Any]) -> tuple[int, int]:
            rows = int(result["result"]["observed_value"])
            return max(0, p.min_source_rows - rows), rows

        specs.append(
            Spec(
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


def _label_counts_frame(p: ValidateParams, labels: tuple[str, ...], split: str, df: pd.DataFrame) -> Frame:
    """GX has no per-class minimum: validate a (label, count) frame of the split instead."""
    import great_expectations.expectations as gxe

    counts = df["label"].value_counts().reindex(list(labels), fill_value=0)
    data = pd.DataFrame({"label": list(labels), "count": counts.to_numpy(dtype="int64")})
    short = data[data["count"] < p.min_per_class]
    detail = ", ".join(f"{row.label}: {row.count}" for row in short.itertuples())
    spec = Spec(
        "min_per_class",
        "label",
        f"every label has at least {p.min_per_class} rows in {split}",
        gxe.ExpectColumnValuesToBeBetween(column="count", min_value=p.min_per_class),
        lambda r, u, n: (
            f"{u} of {n} labels have fewer than {p.min_per_class} rows" + (f" ({detail})" if u else "")
        ),
    )
    return Frame(f"{split}_label_counts", split, data, (spec,))


def _leakage_frame(splits: dict[str, pd.DataFrame]) -> Frame:
    """One row per (split, normalised text): a text in k splits makes k non-unique rows."""
    import great_expectations.expectations as gxe

    parts = [
        pd.DataFrame({"split": name, "text_normalised": identity(df)})
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
    spec = Spec(
        "no_leakage",
        "text",
        "no normalised text (lowercased, whitespace collapsed, stripped) appears in more "
        f"than one of {', '.join(SPLITS)}",
        gxe.ExpectColumnValuesToBeUnique(column="text_normalised"),
        lambda r, u, n: (
            f"{u} of {n} rows share their normalised text with another split" + (f" ({detail})" if u else "")
        ),
    )
    return Frame("leakage", ALL, data, (spec,))


SUITE = suite
