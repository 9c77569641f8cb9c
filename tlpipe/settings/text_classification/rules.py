"""The text classifier's validation suites, built from params: every target split (train,
val, test and pool) must have a `text` and a `label` column, non-null, non-blank texts
within the length bounds and labels from the target's label set, and `min_per_class` rows
of every label (the pool too, when it has rows). A labelled source gets the same row checks
against its own label set, an unlabelled one the text checks alone, and either needs
`min_source_rows` rows. No normalised text may appear in more than one split, the source
included."""

from __future__ import annotations

import pandas as pd

from tlpipe.expectations import Frame, Spec
from tlpipe.labelled_rules import (
    classifier_suite,
    exists_specs,
    label_specs,
    leakage_frame,
    min_source_rows_spec,
)
from tlpipe.params import DataParams, ValidateParams
from tlpipe.settings.text_classification.rows import identity


def suite(p: ValidateParams, data: DataParams, splits: dict[str, pd.DataFrame]) -> list[Frame]:
    """Every input's frames and expectations (see the module's docstring)."""
    how = " (lowercased, whitespace collapsed, stripped)"
    leakage = leakage_frame(splits, identity, "text", "text_normalised", "normalised text", how)
    return classifier_suite(p, data, splits, _split_specs, lambda df: df, leakage)


def _split_specs(
    p: ValidateParams, labels: tuple[str, ...] | None, split: str, df: pd.DataFrame
) -> tuple[Spec, ...]:
    """The row checks of one split: its columns, its texts and, when `labels` is given, its
    labels; a source also needs `min_source_rows` rows. (Undecodable bytes never get here:
    prepare fails on them, or sets them aside.)"""
    import great_expectations.expectations as gxe

    specs = exists_specs(("text", "label") if labels is not None else ("text",), len(df))
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
        specs += label_specs(labels)
    if split == "source":
        specs.append(min_source_rows_spec(p))
    return tuple(specs)


SUITE = suite
