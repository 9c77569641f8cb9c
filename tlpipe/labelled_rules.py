"""The validation checks every classification setting shares, as Great Expectations specs
and frames (`tlpipe.expectations`): a column is present, labels are non-null and from the
label set, every label has `min_per_class` rows in a split, a source has
`min_source_rows` rows, and no item (the setting's row identity) is in two splits."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pandas as pd

from tlpipe.data import SPLITS
from tlpipe.expectations import ALL, Frame, Spec, examples
from tlpipe.params import TARGET_PARTS, DataParams, ValidateParams

# A split's row checks: (params, its label set or None, split name, its rows) -> specs.
SplitSpecs = Callable[[ValidateParams, "tuple[str, ...] | None", str, pd.DataFrame], "tuple[Spec, ...]"]


def classifier_suite(
    p: ValidateParams,
    data: DataParams,
    splits: dict[str, pd.DataFrame],
    split_specs: SplitSpecs,
    checked: Callable[[pd.DataFrame], pd.DataFrame],
    leakage: Frame,
) -> list[Frame]:
    """A classification setting's suite: each split's `checked` rows (what GX validates of
    them) under its `split_specs`, against the target's label set or the source's own; the
    per-class minimum of every target part (an empty pool has no classes to count); then
    the `leakage` frame across all splits."""
    frames = []
    for name, df in splits.items():
        labels = data.labels if name in TARGET_PARTS else data.source_labels
        frames.append(Frame(name, name, checked(df), split_specs(p, labels, name, df)))
        if name in TARGET_PARTS and "label" in df.columns and not (name == "pool" and df.empty):
            frames.append(label_counts_frame(p, data.labels, name, df))
    frames.append(leakage)
    return frames


def exists_specs(columns: tuple[str, ...], n: int) -> list[Spec]:
    """One check per column that it is present (a missing one fails every row)."""
    import great_expectations.expectations as gxe

    def exists_counts(result: dict[str, Any]) -> tuple[int, int]:
        return (0 if result["success"] else n), n

    return [
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
        for col in columns
    ]


def label_specs(labels: tuple[str, ...]) -> list[Spec]:
    """The label is never null and always one of `labels`."""
    import great_expectations.expectations as gxe

    return [
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


def min_rows_spec(check: str, what: str, minimum: int, unit: str = "rows") -> Spec:
    """A table (`what`: "source", "train") has at least `minimum` rows."""
    import great_expectations.expectations as gxe

    def row_counts(result: dict[str, Any]) -> tuple[int, int]:
        rows = int(result["result"]["observed_value"])
        return max(0, minimum - rows), rows

    return Spec(
        check,
        None,
        f"{what} has at least {minimum} {unit}",
        gxe.ExpectTableRowCountToBeBetween(min_value=minimum),
        lambda r, u, n: f"{n} {unit}, needs at least {minimum} ({u} short)" if u else f"{n} {unit}",
        row_counts,
    )


def min_source_rows_spec(p: ValidateParams) -> Spec:
    """The source has at least `min_source_rows` rows."""
    return min_rows_spec("min_source_rows", "source", p.min_source_rows)


def label_counts_frame(p: ValidateParams, labels: tuple[str, ...], split: str, df: pd.DataFrame) -> Frame:
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


def leakage_frame(
    splits: dict[str, pd.DataFrame],
    identity: Callable[[pd.DataFrame], pd.Series],
    item: str,
    key: str,
    what: str,
    how: str = "",
) -> Frame:
    """One row per (split, item identity): an item in k splits makes k non-unique rows.
    `item` is the column the identity is made from, `key` the name the identity column
    takes, `what` how the check names it ("normalised text") and `how` what that means."""
    import great_expectations.expectations as gxe

    parts = [
        pd.DataFrame({"split": name, key: identity(df)}) for name, df in splits.items() if item in df.columns
    ]
    data = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=["split", key], dtype=str)
    data = data.dropna()
    # A blank item is a row check's to report; duplicates within a split are not leaks.
    data = data[data[key] != ""].drop_duplicates().reset_index(drop=True)
    data[key] = data[key].astype(str)

    leaked = data[data.duplicated(key, keep=False)]
    pairs = leaked.groupby(key)["split"].agg(lambda s: "/".join(sorted(s, key=SPLITS.index)))
    per_pair = pairs.value_counts().sort_index()
    detail = ", ".join(f"{pair}: {k} {item}{'s' if k > 1 else ''}" for pair, k in per_pair.items())
    spec = Spec(
        "no_leakage",
        item,
        f"no {what}{how} appears in more than one of {', '.join(SPLITS)}",
        gxe.ExpectColumnValuesToBeUnique(column=key),
        lambda r, u, n: (
            f"{u} of {n} rows share their {what} with another split" + (f" ({detail})" if u else "")
        ),
    )
    return Frame("leakage", ALL, data, (spec,))
