"""The text classifier's validation suites, built from params: every target split (train,
val, test and pool) must have a `text` and a `label` column, non-null, non-blank texts
within the length bounds and labels from the target's label set, and `min_per_class` rows
of every label (the pool too, when it has rows). A labelled source gets the same row checks
against its own label set, an unlabelled one the text checks alone, and either needs
`min_source_rows` rows. No normalised text may appear in more than one split, the source
included."""

from __future__ import annotations

import pandas as pd

from tlpipe.expectations import Frame
from tlpipe.labelled_rules import classifier_suite, leakage_frame
from tlpipe.params import DataParams, ValidateParams
from tlpipe.text_rows import identity
from tlpipe.text_rules import text_split_specs


def suite(p: ValidateParams, data: DataParams, splits: dict[str, pd.DataFrame]) -> list[Frame]:
    """Every input's frames and expectations (see the module's docstring)."""
    how = " (lowercased, whitespace collapsed, stripped)"
    leakage = leakage_frame(splits, identity, "text", "text_normalised", "normalised text", how)
    return classifier_suite(p, data, splits, text_split_specs, lambda df: df, leakage)


SUITE = suite
