"""The row checks of a text input (both text settings'), as Great Expectations specs: its
columns, its texts within the length bounds and, when labelled, its labels; a source also
needs `min_source_rows` rows. The same rules as `tlpipe.text_rows`, which prepare applies
under quarantine."""

from __future__ import annotations

import pandas as pd

from tlpipe.expectations import Spec
from tlpipe.labelled_rules import exists_specs, label_specs, min_source_rows_spec
from tlpipe.params import ValidateParams


def text_split_specs(
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
